"""Speed of vLLM on this CPU: prompt lengths x generation lengths x batch sizes, as Records.

Method (also in docs/bench.md; every record says what it excludes):
- One fresh engine subprocess per configuration (arm_int4/workers/bench_worker.py), started with the
  same Plan `arm-int4 serve` would use (launch.plan), max-model-len sized to the workload.
- Per test: `warmup` untimed batches of the test's own shape, then `repetitions` timed ones.
  A batch is B requests of P random prompt token ids (fresh per request: no tokenization, no
  prefix-cache hits), each generating exactly N tokens (ignore_eos, greedy, no detokenization).
- TTFT and TPOT come from vLLM's per-request stats. prefill tok/s = B*P / slowest TTFT;
  decode tok/s = B / mean TPOT (all streams); total tok/s = B*(P+N) / wall time.
- GB/s = decode steps/s x bytes read per step (weights touched + KV at the mean context), next
  to this machine's triad bandwidth (arm_int4.bandwidth): decode cannot read faster than memory.
`--server URL` (arm_int4/bench_server.py) times a running OpenAI server instead.
"""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import __version__, bandwidth, hardware, kernels, launch, models, runner
from .checkpoint import FLOAT_BYTES, CheckpointFacts, kv_bytes_per_token, weights_in_memory
from .errors import ArmInt4Error, UsageError
from .report import Record

__all__ = ["PROMPTS", "GENS", "BATCHES", "REPETITIONS", "WARMUP", "SEED", "Test", "Workload",
           "plan_for", "run_plan", "run", "environment", "bytes_per_step", "INT4_READ_BYTES"]

# Defaults, written once (the CLI's BenchOptions reads these): llama-bench's spirit.
PROMPTS, GENS, BATCHES, REPETITIONS, WARMUP, SEED = (128, 512), (128,), (1, 8), 3, 1, 0
# Bytes a decode step reads per int4 weight: KleidiAI's packed layout holds two per byte on Arm;
# vLLM's x86 reference fallback keeps an fp32-sized packed weight (measured, see NOTES).
INT4_READ_BYTES = {"aarch64": 0.5, "x86_64": 4}
# vLLM's log: "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int"
OFFLINE_EXCLUDED = ("tokenization (prompts are token ids) and detokenization (off); engine start; "
                    "random prompt generation")
SERVER_EXCLUDED = ("prompt tokenization (prompts are token ids); included: HTTP, SSE framing and the "
                   "server's detokenization")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Test:
    prompt: int
    gen: int
    batch: int

    @property
    def name(self) -> str:
        return f"pp{self.prompt} tg{self.gen} b{self.batch}"


@dataclass(frozen=True)
class Workload:
    prompts: tuple = PROMPTS
    gens: tuple = GENS
    batches: tuple = BATCHES
    repetitions: int = REPETITIONS
    warmup: int = WARMUP
    seed: int = SEED

    def __post_init__(self):
        for name in ("prompts", "gens", "batches"):
            vals = tuple(getattr(self, name))
            if not vals or any(type(v) is not int or v < 1 for v in vals):
                raise UsageError(f"--{name[:-1]} {' '.join(map(str, vals)) or '(none)'}: give whole numbers >= 1")
            object.__setattr__(self, name, vals)
        if self.repetitions < 1 or self.warmup < 0:
            raise UsageError(f"--repetitions {self.repetitions} / --warmup {self.warmup}: need >= 1 / >= 0")

    def tests(self) -> list:
        return [Test(p, n, b) for p in self.prompts for n in self.gens for b in self.batches]

    @property
    def max_model_len(self) -> int:
        return max(self.prompts) + max(self.gens)


# ------------------------------------------------------------------------------- facts
def git_commit() -> Optional[str]:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def environment(machine: hardware.Machine) -> dict:
    """The Record fields that describe where a run happened."""
    return dict(cpu=machine.cpu_name, arch=machine.arch, cpu_features=list(machine.features),
                logical_cpus=machine.logical_cpus, usable_cpus=machine.usable_cpus(),
                mem_total_bytes=machine.mem_total_bytes, torch_version=machine.torch_version,
                vllm_version=machine.vllm_version, python_version=platform.python_version(),
                arm_int4_version=__version__, git_commit=git_commit(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _config_json(path) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg.get("text_config") or cfg


def bytes_per_step(facts: CheckpointFacts, dtype: str, arch: str, batch: int, context: float) -> int:
    """Bytes one decode step reads: every weight once (int4 at INT4_READ_BYTES, floats at the
    serving dtype; an untied input embedding only gives one row per token, so it is left out)
    plus, per sequence, K and V for `context` tokens."""
    cfg = _config_json(facts.path)
    floats = facts.float_values
    if cfg.get("tie_word_embeddings") is False and cfg.get("vocab_size") and cfg.get("hidden_size"):
        floats -= cfg["vocab_size"] * cfg["hidden_size"]
    weights = facts.quantized_values * INT4_READ_BYTES.get(arch, 4) + floats * FLOAT_BYTES[dtype] + facts.other_bytes
    return int(weights + batch * (kv_bytes_per_token(facts, dtype) or 0) * context)


def _model_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _quant_label(facts: CheckpointFacts) -> str:
    if facts.scheme:
        return f"{facts.scheme.preset} {facts.scheme.label}"
    return facts.quant_method or str(facts.config_dtype or "unknown dtype")


def _provenance(path) -> Optional[str]:
    """The note arm_int4.models writes beside the converted default model (quantize copies it)."""
    try:
        with open(os.path.join(path, "arm-int4-provenance.json"), encoding="utf-8") as f:
            return json.load(f).get("note")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------- statistics
def _mean_sd(xs) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pct(xs, q: float) -> Optional[float]:
    """Percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = q / 100 * (len(xs) - 1)
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def _fill(rec: Record, reps: list, step_bytes: Optional[int], bw: Optional[float]) -> None:
    """Per-repetition samples -> mean/sd/percentiles on `rec`. reps: worker format (seconds)."""
    b, p = rec.batch, rec.prompt_tokens
    samples = {"ttft_ms": [], "tpot_ms": [], "prefill_tok_s": [], "decode_tok_s": [], "total_tok_s": [],
               "output_tok_s": [], "achieved_gbs": []}
    for r in reps:
        tpots = [t for t in r["tpot_s"] if t is not None]
        samples["ttft_ms"].append(statistics.fmean(r["ttft_s"]) * 1e3)
        samples["prefill_tok_s"].append(b * p / max(r["ttft_s"]))
        samples["total_tok_s"].append(b * p / r["wall_s"] + sum(r["gen_tokens"]) / r["wall_s"])
        samples["output_tok_s"].append(sum(r["gen_tokens"]) / r["wall_s"])
        tpot = statistics.fmean(tpots) if tpots else None
        samples["tpot_ms"].append(tpot * 1e3 if tpot else None)
        decode = b / tpot if tpot else None
        samples["decode_tok_s"].append(decode)
        samples["achieved_gbs"].append(decode / b * step_bytes / 1e9 if decode and step_bytes else None)
    for name, xs in samples.items():
        mean, sd = _mean_sd(xs)
        setattr(rec, name, mean)
        setattr(rec, name + "_sd", sd)
        setattr(rec, name + "_samples", xs)
    rec.ttft_ms_requests = [t * 1e3 for r in reps for t in r["ttft_s"]]
    rec.tpot_ms_requests = [t * 1e3 for r in reps for t in r["tpot_s"] if t is not None]
    for name in ("ttft_ms", "tpot_ms"):
        setattr(rec, name + "_p50", _pct(getattr(rec, name + "_requests"), 50))
        setattr(rec, name + "_p99", _pct(getattr(rec, name + "_requests"), 99))
    rec.cached_tokens = sum(r.get("cached_tokens", 0) for r in reps)
    if bw and rec.achieved_gbs is not None:
        rec.bandwidth_pct = rec.achieved_gbs / bw * 100
        if max(x for x in samples["achieved_gbs"] if x is not None) > bw:
            rec.notes = rec.notes + [f"{rec.model_name} {rec.test}: decode reads faster than the triad bandwidth: "
                                     "not physical (weights cache-resident, or tokens streamed in bursts)"]


# ------------------------------------------------------------------------------- offline engine
def plan_for(model_dir, machine: hardware.Machine, workload: Workload, profile: Optional[launch.Profile] = None, *,
             ranks: Optional[int] = None, reserve: Optional[int] = None, kv_cache_gib: Optional[int] = None, extra_args=()) -> tuple:
    """(CheckpointFacts, Plan) as `arm-int4 serve` would plan it, max-model-len sized to the workload
    (unless the profile sets one): a smaller KV cache, same kernels."""
    return launch.engine_plan(model_dir, machine, profile, ranks=ranks, reserve=reserve, kv_cache_gib=kv_cache_gib,
                              max_model_len=None if profile and profile.max_model_len else workload.max_model_len,
                              extra_args=extra_args, can_bind=runner.can_set_affinity())


def _kernel_note(facts: CheckpointFacts, machine: hardware.Machine) -> Optional[str]:
    """Before the run, for a W4A8 checkpoint on a machine without KleidiAI: what its numbers will not
    show (from hardware's prediction; the records then carry what vLLM's log says it ran)."""
    k = machine.int4_kernel or ""
    if not facts.scheme or facts.scheme.preset != "w4a8" or not ("fallback" in k or "reference" in k
                                                                 or k.startswith("none")):
        return None
    kernel = k.split(" (")[0]
    if "fallback" in k:
        return f"x86 reference fallback, not an Arm figure: INT4 runs on vLLM's {kernel} without KleidiAI (Arm only)"
    return f"INT4 runs on {k}: not KleidiAI, so not what Arm servers with KleidiAI reach"


def _base_record(facts, test: Test, workload: Workload, where: dict, **kw) -> Record:
    return Record(model=facts.path, model_name=facts.name, quantization=_quant_label(facts),
                  quantized=bool(facts.quant_method), test=test.name, prompt_tokens=test.prompt, gen_tokens=test.gen,
                  batch=test.batch, repetitions=workload.repetitions, warmup=workload.warmup, **where, **kw)


def run_plan(plan: launch.Plan, facts: CheckpointFacts, workload: Workload, *, machine: hardware.Machine,
             bandwidth_gbs: Optional[float] = None, label: str = "", log_dir=None, env_info: Optional[dict] = None,
             progress: Callable[[str], None] = _stderr) -> list:
    """Run every test of `workload` in one fresh engine configured by `plan`; one Record per test.

    Never raises for a failing engine or test: the Record carries `error`. The vLLM log goes to
    log_dir (kept), or to a temporary file kept only when something failed. `label` names the
    configuration in the records (Record.config), e.g. a tune candidate."""
    env_info = env_info or environment(machine)
    tests, name = workload.tests(), facts.name + (f" [{label}]" if label else "")
    tag = "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", label) if label else ""  # "all-2t eager" -> "-all-2t-eager"
    log = Path(log_dir or tempfile.gettempdir()) / (
        f"{'' if log_dir else 'arm-int4-bench-'}{facts.name}{tag}-{os.getpid()}-{time.time_ns()}.log")
    job = {"model": facts.path, "tests": [[t.prompt, t.gen, t.batch] for t in tests], "warmup": workload.warmup,
           "repetitions": workload.repetitions, "seed": workload.seed, "rss_interval_s": 0.25}
    warn = _kernel_note(facts, machine)
    if warn:
        progress(f"warning: {facts.name}: {warn}")
    progress(f"{name}: starting vLLM for {len(tests)} test(s) (log: {log})")
    shown = 0

    def on_update(result: dict) -> None:
        nonlocal shown
        for entry in result.get("tests", [])[shown:]:
            progress(f"{name}: {Test(*_entry_key(entry)).name}: " + (
                f"failed: {entry['error']}" if entry["error"] else _quick(entry)))
        shown = len(result.get("tests", []))

    run = runner.run_worker("bench", job, plan=plan, log=log, on_update=on_update)
    result, failure, log = run.result, run.error, run.log
    ran = kernels.describe(run.linear_kernels, machine, plan.dtype)  # from vLLM's log, not predicted
    if warn and ran and ran.split(" (")[0] != warn.split("vLLM's ")[-1].split(" ")[0]:
        warn = f"{warn} — but vLLM's log says it ran {ran}"
    dtype = plan.dtype if plan.dtype in FLOAT_BYTES else "bfloat16"
    common = dict(
        weights_in_memory_bytes=weights_in_memory(facts, dtype, machine.arch), model_bytes=_model_bytes(facts.path),
        kv_bytes_per_token=kv_bytes_per_token(facts, dtype), bandwidth_gbs=bandwidth_gbs, dtype=plan.dtype,
        threads=plan.threads_per_rank, engine_args=plan.engine_kwargs(), env=dict(plan.env), config=label,
        int4_kernel=ran, excluded=OFFLINE_EXCLUDED,
        notes=[n for n in (_provenance(facts.path), warn) if n], load_s=result.get("load_s"),
        linear_kernels=run.linear_kernels)
    where = {**env_info, "vllm_version": result.get("vllm_version") or env_info.get("vllm_version"),
             "torch_version": result.get("torch_version") or env_info.get("torch_version")}
    done = {_entry_key(e): e for e in result.get("tests", [])}
    records = []
    for t in tests:
        rec = _base_record(facts, t, workload, where, **common)
        e = done.get((t.prompt, t.gen, t.batch))
        if e is None or e["error"]:
            rec.error = f"{(e or {}).get('error') or 'not run: ' + (failure or 'no result')} (vLLM log: {log})"
        else:
            rec.peak_rss_bytes = e["peak_rss_bytes"]
            rec.bytes_per_step = bytes_per_step(facts, dtype, machine.arch, t.batch, t.prompt + t.gen / 2)
            _fill(rec, e["reps"], rec.bytes_per_step, bandwidth_gbs)
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
    rec = Record(model="", model_name="", quantization=None, quantized=False, test="", prompt_tokens=entry["prompt"],
                 gen_tokens=entry["gen"], batch=entry["batch"])
    _fill(rec, entry["reps"], None, None)
    return (f"prefill {_short(rec.prefill_tok_s)} tok/s, decode {_short(rec.decode_tok_s)} tok/s, "
            f"TTFT {_short(rec.ttft_ms)} ms")


def _short(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _failed(spec: str, workload: Workload, env: dict, error: str) -> list:
    return [Record(model=spec, model_name=os.path.basename(spec.rstrip("/")) or spec, quantization=None,
                   quantized=False, test=t.name, prompt_tokens=t.prompt, gen_tokens=t.gen, batch=t.batch,
                   repetitions=workload.repetitions, warmup=workload.warmup, error=error, **env)
            for t in workload.tests()]


def run(model_specs, workload: Workload = Workload(), *, profile: Optional[launch.Profile] = None,
        ranks: Optional[int] = None, reserve: Optional[int] = None, kv_cache_gib: Optional[int] = None, extra_args=(), log_dir=None,
        refresh_bandwidth: bool = False, progress: Callable[[str], None] = _stderr) -> list:
    """Bench each MODEL (dir, hub id or 'default') in turn, one engine at a time. A model that
    cannot be resolved or planned is recorded as failed and the others still run."""
    machine = hardware.detect()
    env, bw, records = environment(machine), None, []
    for spec in model_specs:
        try:
            facts, plan = plan_for(models.resolve(spec, progress=progress), machine, workload, profile,
                                   ranks=ranks, reserve=reserve, kv_cache_gib=kv_cache_gib, extra_args=extra_args)
        except ArmInt4Error as exc:
            progress(f"error: {spec}: {exc}")
            records += _failed(spec, workload, env, str(exc))
            continue
        if bw is None:  # measured before any engine runs, once per machine (cached)
            bw = bandwidth.machine_bandwidth(machine, refresh=refresh_bandwidth, progress=progress)["triad_gbs"]
        records += run_plan(plan, facts, workload, machine=machine, bandwidth_gbs=bw, log_dir=log_dir,
                            env_info=env, progress=progress)
    return records
