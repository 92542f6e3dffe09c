"""Speed of vLLM on this CPU: prompt lengths x generation lengths x batch sizes, as Records.

Method (also in docs/bench.md; every record says what it excludes):
- One fresh engine subprocess per configuration (arm_int4/workers/bench_worker.py), started with the
  same EngineSpec `arm-int4 serve` would use (launch.plan), max-model-len sized to the workload.
- Per test: `warmup` untimed batches of the test's own shape, then `repetitions` timed ones.
  A batch is B requests of P random prompt token ids (fresh per request: no tokenization, no
  prefix-cache hits), each generating exactly N tokens (ignore_eos, greedy, no detokenization).
- TTFT and TPOT come from vLLM's per-request stats. prefill tok/s = B*P / slowest TTFT;
  decode tok/s = B / mean TPOT (all streams); total tok/s = B*(P+N) / wall time.
- GB/s = decode steps/s x bytes read per step (weights touched + KV at the mean context), next
  to this machine's triad bandwidth (arm_int4.bandwidth): decode cannot read faster than memory.
`--server URL` (arm_int4/bench_server.py) times a running OpenAI server instead.
"""

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from . import bandwidth, hardware, kernels, launch, models, runner
from .checkpoint import FLOAT_BYTES, CheckpointFacts, kv_bytes_per_token, weights_in_memory
from .errors import ArmInt4Error
from .report import Record

# The workload, its defaults and the record helpers live in .workload (bench_server and tune share them).
from .workload import (
    BATCHES,
    GENS,
    INT4_READ_BYTES,
    OFFLINE_EXCLUDED,
    PROMPTS,
    REPETITIONS,
    SEED,
    SERVER_EXCLUDED,
    WARMUP,
    Test,
    Workload,
    bytes_per_step,
    environment,
    failed_records,
    fill_record,
    kernel_note,
    model_bytes,
    quant_label,
    short,
    to_stderr,
)

__all__ = [
    "PROMPTS",
    "GENS",
    "BATCHES",
    "REPETITIONS",
    "WARMUP",
    "SEED",
    "Test",
    "Workload",
    "engine_for",
    "run_plan",
    "run",
    "environment",
    "bytes_per_step",
    "INT4_READ_BYTES",
    "OFFLINE_EXCLUDED",
    "SERVER_EXCLUDED",
]


def _provenance(path) -> Optional[str]:
    """The note arm_int4.models writes beside the converted default model (quantize copies it)."""
    try:
        with open(os.path.join(path, "arm-int4-provenance.json"), encoding="utf-8") as f:
            return json.load(f).get("note")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------- statistics
def engine_for(machine: hardware.Machine, model_dir, request: launch.EngineRequest, workload: Workload) -> tuple:
    """(CheckpointFacts, EngineSpec) as `arm-int4 serve` would plan `request`, max-model-len sized to the
    workload unless the request or its profile sets one: a smaller KV cache, same kernels."""
    if request.max_model_len is None and request.profile.max_model_len is None:
        request = request.replace(max_model_len=workload.max_model_len)
    facts = launch.read_checkpoint(model_dir)
    return facts, launch.plan(machine, facts, request, can_bind=runner.can_set_affinity())


def _base_record(facts, test: Test, workload: Workload, where: dict, **kw) -> Record:
    return Record(
        model=facts.path,
        model_name=facts.name,
        quantization=quant_label(facts),
        quantized=bool(facts.quant_method),
        test=test.name,
        prompt_tokens=test.prompt,
        gen_tokens=test.gen,
        batch=test.batch,
        repetitions=workload.repetitions,
        warmup=workload.warmup,
        **where,
        **kw,
    )


def run_plan(
    plan: launch.EngineSpec,
    facts: CheckpointFacts,
    workload: Workload,
    *,
    machine: hardware.Machine,
    bandwidth_gbs: Optional[float] = None,
    label: str = "",
    log_dir=None,
    env_info: Optional[dict] = None,
    progress: Callable[[str], None] = to_stderr,
) -> list:
    """Run every test of `workload` in one fresh engine configured by `plan`; one Record per test.

    Never raises for a failing engine or test: the Record carries `error`. The vLLM log goes to
    log_dir (kept), or to a temporary file kept only when something failed. `label` names the
    configuration in the records (Record.config), e.g. a tune candidate."""
    env_info = env_info or environment(machine)
    tests, name = workload.tests(), facts.name + (f" [{label}]" if label else "")
    tag = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", label) if label else ""  # "all-2t eager" -> "-all-2t-eager"
    log = Path(log_dir or tempfile.gettempdir()) / (
        f"{'' if log_dir else 'arm-int4-bench-'}{re.sub(r'[^A-Za-z0-9_.-]+', '-', facts.name)}{tag}"
        f"-{os.getpid()}-{time.time_ns()}.log"  # a hub model's name is org/name: no "/" in a file name
    )
    job = {
        "model": facts.path,
        "tests": [[t.prompt, t.gen, t.batch] for t in tests],
        "warmup": workload.warmup,
        "repetitions": workload.repetitions,
        "seed": workload.seed,
        "rss_interval_s": 0.25,
    }
    warn = kernel_note(facts, machine)
    if warn:
        progress(f"warning: {facts.name}: {warn}")
    progress(f"{name}: starting vLLM for {len(tests)} test(s) (log: {log})")
    shown = 0

    def on_update(result: dict) -> None:
        nonlocal shown
        for entry in result.get("tests", [])[shown:]:
            progress(
                f"{name}: {Test(*_entry_key(entry)).name}: "
                + (f"failed: {entry['error']}" if entry["error"] else _quick(entry))
            )
        shown = len(result.get("tests", []))

    run = runner.run_worker("bench", job, plan=plan, log=log, on_update=on_update)
    result, failure, log = run.result, run.error, run.log
    ran = kernels.describe(run.linear_kernels, machine, plan.dtype)  # from vLLM's log, not predicted
    expected = kernels.Kernel.of(machine.int4_kernel)  # what kernel_note warned about
    if warn and ran and expected and expected.class_name not in run.linear_kernels:
        warn = f"{warn} — but vLLM's log says it ran {ran}"
    dtype = plan.dtype if plan.dtype in FLOAT_BYTES else "bfloat16"
    common = dict(
        weights_in_memory_bytes=weights_in_memory(facts, dtype, machine.arch),
        model_bytes=model_bytes(facts.path),
        kv_bytes_per_token=kv_bytes_per_token(facts, dtype),
        bandwidth_gbs=bandwidth_gbs,
        dtype=plan.dtype,
        threads=plan.threads_per_rank,
        engine_args=plan.to_llm_kwargs(),
        env=dict(plan.env),
        config=label,
        int4_kernel=ran,
        excluded=OFFLINE_EXCLUDED,
        notes=[n for n in (_provenance(facts.path), warn) if n],
        load_s=result.get("load_s"),
        linear_kernels=run.linear_kernels,
    )
    where = {
        **env_info,
        "vllm_version": result.get("vllm_version") or env_info.get("vllm_version"),
        "torch_version": result.get("torch_version") or env_info.get("torch_version"),
    }
    done = {_entry_key(e): e for e in result.get("tests", [])}
    records = []
    for t in tests:
        rec = _base_record(facts, t, workload, where, **common)
        e = done.get((t.prompt, t.gen, t.batch))
        if e is None or e["error"]:
            rec.error = f"{(e or {}).get('error') or 'not run: ' + (failure or 'no result')} (vLLM log: {log})"
        else:
            rec.peak_rss_bytes = e["peak_rss_bytes"]
            rec.bytes_per_step = bytes_per_step(
                facts, dtype, machine.arch, t.batch, t.prompt + t.gen / 2, kernel=rec.int4_kernel
            )
            fill_record(rec, e["reps"], rec.bytes_per_step, bandwidth_gbs)
        records.append(rec)
    if any(r.error for r in records):
        progress(f"{name}: failed; vLLM log kept: {log}")
    elif not log_dir:
        log.unlink(missing_ok=True)
    return records


def _entry_key(e: dict) -> tuple:
    return e["prompt"], e["gen"], e["batch"]


def _quick(entry) -> str:
    """A one-line progress summary of a worker test entry."""
    rec = Record(
        model="",
        model_name="",
        quantization=None,
        quantized=False,
        test="",
        prompt_tokens=entry["prompt"],
        gen_tokens=entry["gen"],
        batch=entry["batch"],
    )
    fill_record(rec, entry["reps"], None, None)
    return (
        f"prefill {short(rec.prefill_tok_s)} tok/s, decode {short(rec.decode_tok_s)} tok/s, "
        f"TTFT {short(rec.ttft_ms)} ms"
    )


def run(
    model_specs,
    workload: Workload = Workload(),
    request: Optional[launch.EngineRequest] = None,
    *,
    machine: Optional[hardware.Machine] = None,
    log_dir=None,
    refresh_bandwidth: bool = False,
    progress: Callable[[str], None] = to_stderr,
) -> list:
    """Bench each MODEL (dir, hub id or 'default') in turn, one engine at a time, each planned from
    `request` (None: the defaults) on `machine` (None: detected). A model that cannot be resolved or
    planned is recorded as failed and the others still run."""
    machine = machine or hardware.detect()
    request = request or launch.EngineRequest()
    env, bw, records = environment(machine), None, []
    for spec in model_specs:
        try:
            facts, plan = engine_for(machine, models.resolve(spec, progress=progress), request, workload)
        except ArmInt4Error as exc:
            progress(f"error: {spec}: {exc}")
            records += failed_records(spec, workload, env, str(exc))
            continue
        if bw is None:  # measured before any engine runs, once per machine (cached)
            bw = bandwidth.machine_bandwidth(machine, refresh=refresh_bandwidth, progress=progress)["triad_gbs"]
        records += run_plan(
            plan, facts, workload, machine=machine, bandwidth_gbs=bw, log_dir=log_dir, env_info=env, progress=progress
        )
    return records
