"""What a benchmark runs and how its samples become a Record: shared by the offline bench
(arm_int4/bench.py), the server client (arm_int4/bench_server.py), llama.cpp and tune.

Light on purpose (stdlib + arm_int4's own light modules): options.py reads the defaults below,
and nothing here starts an engine or imports torch/vLLM.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import __version__
from .checkpoint import FLOAT_BYTES, CheckpointFacts, kv_bytes_per_token
from .errors import UsageError
from .kernels import Kernel
from .report import Record

__all__ = [
    "BATCHES",
    "GENS",
    "INT4_READ_BYTES",
    "OFFLINE_EXCLUDED",
    "PROMPTS",
    "REPETITIONS",
    "SEED",
    "SERVER_EXCLUDED",
    "WARMUP",
    "X86_KERNEL_READ_BYTES",
    "Test",
    "Workload",
    "bytes_per_step",
    "environment",
    "failed_records",
    "fill_record",
    "git_commit",
    "kernel_note",
    "mean_sd",
    "model_bytes",
    "percentile",
    "quant_label",
    "short",
    "to_stderr",
]

# Defaults, written once (the CLI's BenchOptions reads these): llama-bench's spirit.
PROMPTS, GENS, BATCHES, REPETITIONS, WARMUP, SEED = (128, 512), (128,), (1, 8), 3, 1, 0
# Bytes a decode step reads per int4 weight: KleidiAI's packed layout holds two per byte on Arm;
# vLLM's x86 reference fallback keeps an fp32-sized packed weight (measured, see NOTES). That is W4A8;
# W4A16 (CPUWNA16) reads its pack-quantized int32 words as stored, eight values each, on any CPU.
INT4_READ_BYTES = {"aarch64": 0.5, "x86_64": 4}
W4A16_READ_BYTES = 0.5
# arm_int4's X86W4A8LinearKernel (x86_w4a8.py) decodes from int8 [K, N] channelwise and from two int4
# values per byte groupwise (x86_w4a8_gemm.pack; + 8 bytes of sum and scale per 32-value group).
X86_KERNEL_READ_BYTES = {"channelwise": 1.0, "groupwise": 0.5}
OFFLINE_EXCLUDED = (
    "tokenization (prompts are token ids) and detokenization (off); engine start; random prompt generation"
)
SERVER_EXCLUDED = (
    "prompt tokenization (prompts are token ids); included: HTTP, SSE framing and the server's detokenization"
)


def to_stderr(msg: str) -> None:
    """The default progress sink: stderr, flushed (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)  # noqa: T201 (the library's one progress sink)


def short(v) -> str:
    """A figure for a progress line: one decimal, '-' when missing."""
    return "-" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------------------- the workload
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


# ------------------------------------------------------------------------------- facts in a record
def git_commit() -> Optional[str]:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def environment(machine) -> dict:
    """The Record fields that describe where a run happened (machine: a hardware.Machine)."""
    return dict(
        cpu=machine.cpu_name,
        arch=machine.arch,
        cpu_features=list(machine.features),
        logical_cpus=machine.logical_cpus,
        usable_cpus=machine.usable_cpus(),
        mem_total_bytes=machine.mem_total_bytes,
        torch_version=machine.torch_version,
        vllm_version=machine.vllm_version,
        python_version=platform.python_version(),
        arm_int4_version=__version__,
        git_commit=git_commit(),
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _config_json(path) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg.get("text_config") or cfg


def bytes_per_step(
    facts: CheckpointFacts, dtype: str, arch: str, batch: int, context: float, kernel: Optional[str] = None
) -> int:
    """Bytes one decode step reads: every weight once (int4 at INT4_READ_BYTES, or at
    X86_KERNEL_READ_BYTES when `kernel`, the label vLLM's log gave, is arm_int4's x86 kernel; floats
    at the serving dtype; an untied input embedding only gives one row per token, so it is left out)
    plus, per sequence, K and V for `context` tokens."""
    cfg = _config_json(facts.path)
    floats = facts.float_values
    if cfg.get("tie_word_embeddings") is False and cfg.get("vocab_size") and cfg.get("hidden_size"):
        floats -= cfg["vocab_size"] * cfg["hidden_size"]
    w4a16 = facts.scheme is not None and facts.scheme.preset == "w4a16"
    per_int4 = W4A16_READ_BYTES if w4a16 else INT4_READ_BYTES.get(arch, 4)
    if not w4a16 and facts.scheme is not None and Kernel.of(kernel) is Kernel.W4A8_X86:
        # a mixed (--budget) checkpoint: counted at the channelwise layout's bytes, the larger of the two
        per_int4 = X86_KERNEL_READ_BYTES.get(getattr(facts.scheme, "granularity", "channelwise"), 1.0)
    weights = facts.quantized_values * per_int4 + floats * FLOAT_BYTES[dtype] + facts.other_bytes
    return int(weights + batch * (kv_bytes_per_token(facts, dtype) or 0) * context)


def model_bytes(path) -> int:
    """Bytes of the checkpoint's safetensors files on disk."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quant_label(facts: CheckpointFacts) -> str:
    """'W4A8 channelwise-mse' for our checkpoints, else the quant method or the float dtype."""
    if facts.scheme:
        return f"{facts.scheme.preset} {facts.scheme.label}"
    return facts.quant_method or str(facts.config_dtype or "unknown dtype")


def kernel_note(facts: CheckpointFacts, machine) -> Optional[str]:
    """Before a run, for a W4A8 checkpoint on a machine without KleidiAI: what its numbers will not
    show (hardware's prediction; records then carry what vLLM's log says it ran, kernels.describe)."""
    k = Kernel.of(machine.int4_kernel)
    if not facts.scheme or facts.scheme.preset != "w4a8" or k is None or k.is_kleidiai:
        return None
    if k.is_x86_fallback:
        return (
            f"x86 reference fallback, not an Arm figure: INT4 runs on vLLM's {k.class_name} without KleidiAI (Arm only)"
        )
    if k.is_x86:
        return (
            f"x86 figure, not an Arm figure: INT4 runs on arm_int4's {k.class_name} (Arm's W4A8 math on x86 "
            "GEMMs); Arm servers run KleidiAI"
        )
    return f"INT4 runs on {k.display}: not KleidiAI, so not what Arm servers with KleidiAI reach"


def failed_records(spec: str, workload: Workload, env: dict, error: str) -> list:
    """One Record per test of `workload` for a model that could not run at all."""
    return [
        Record(
            model=spec,
            model_name=os.path.basename(spec.rstrip("/")) or spec,
            quantization=None,
            quantized=False,
            test=t.name,
            prompt_tokens=t.prompt,
            gen_tokens=t.gen,
            batch=t.batch,
            repetitions=workload.repetitions,
            warmup=workload.warmup,
            error=error,
            **env,
        )
        for t in workload.tests()
    ]


# ------------------------------------------------------------------------------- statistics
def mean_sd(xs) -> tuple:
    """(mean, sample sd) of the non-None values; sd 0.0 for one value, (None, None) for none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def percentile(xs, q: float) -> Optional[float]:
    """Percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = q / 100 * (len(xs) - 1)
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def fill_record(rec: Record, reps: list, step_bytes: Optional[int], bw: Optional[float]) -> None:
    """Per-repetition samples -> mean/sd/percentiles on `rec`. reps: worker format (seconds):
    [{"wall_s": float, "ttft_s": [per request], "tpot_s": [per request or None],
      "gen_tokens": [per request], "cached_tokens": int (optional)}]."""
    b, p = rec.batch, rec.prompt_tokens
    names = ("ttft_ms", "tpot_ms", "prefill_tok_s", "decode_tok_s", "total_tok_s", "output_tok_s", "achieved_gbs")
    samples: dict[str, list] = {name: [] for name in names}
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
        mean, sd = mean_sd(xs)
        setattr(rec, name, mean)
        setattr(rec, name + "_sd", sd)
        setattr(rec, name + "_samples", xs)
    rec.ttft_ms_requests = [t * 1e3 for r in reps for t in r["ttft_s"]]
    rec.tpot_ms_requests = [t * 1e3 for r in reps for t in r["tpot_s"] if t is not None]
    for name in ("ttft_ms", "tpot_ms"):
        setattr(rec, name + "_p50", percentile(getattr(rec, name + "_requests"), 50))
        setattr(rec, name + "_p99", percentile(getattr(rec, name + "_requests"), 99))
    rec.cached_tokens = sum(r.get("cached_tokens", 0) for r in reps)
    if bw and rec.achieved_gbs is not None:
        rec.bandwidth_pct = rec.achieved_gbs / bw * 100
        if max(x for x in samples["achieved_gbs"] if x is not None) > bw:
            rec.notes = rec.notes + [
                f"{rec.model_name} {rec.test}: decode reads faster than the triad bandwidth: "
                "not physical (weights cache-resident, or tokens streamed in bursts)"
            ]
