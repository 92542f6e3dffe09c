"""W4A8 or W4A16 on this CPU: which INT4 path vLLM runs for each, and which is faster here.

vLLM 0.32 runs W4A16 only on x86 CPUs with AVX-512 (arm_int4.kernels.w4a16_runs); elsewhere W4A8
is the only INT4 path and the verdict says so.

`arm-int4 bench` appends every successful offline record to a history file in the cache
(~/.cache/arm-int4/bench/history.jsonl); `arm-int4 info` reads the records measured on this
machine (same CPU name, architecture and usable CPU count) and compares W4A8 with W4A16 on the
same test (prompt, generation, batch) of the same bench run (`bench M-W4A8 M-W4A16`: their
checkpoints have different names, the run's start time is shared) by decode tok/s. Without such a pair it says what it
expects and why, marked as expected, and how to measure it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from . import kernels
from .models import cache_home

__all__ = ["history_path", "append_history", "load_history", "w4a16_kernel", "int4_verdict"]

_KEEP = ("quantization", "test", "prompt_tokens", "gen_tokens", "batch", "mode", "config", "decode_tok_s")
_WHERE = ("cpu", "arch", "usable_cpus", "vllm_version", "time", "int4_kernel", "model_name")


def history_path() -> Path:
    return cache_home() / "bench" / "history.jsonl"


def append_history(records, path: Optional[Path] = None) -> None:
    """Append the successful offline records (best effort: a read-only cache only costs a note)."""
    from .report import to_dict

    rows = [to_dict(r) for r in records if r.error is None and r.mode == "offline" and r.decode_tok_s]
    if not rows:
        return
    path = path or history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for d in rows:
                f.write(json.dumps({k: d.get(k) for k in _KEEP + _WHERE}) + "\n")
    except OSError as e:
        print(f"arm-int4: bench history not written ({path}: {e.strerror})", file=sys.stderr)  # noqa: T201 (a note)


def load_history(machine, path: Optional[Path] = None) -> list[dict]:
    """This machine's records from the history (malformed lines are skipped)."""
    path = path or history_path()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if (d.get("cpu"), d.get("arch"), d.get("usable_cpus")) == (
            machine.cpu_name,
            machine.arch,
            machine.usable_cpus(),
        ):
            out.append(d)
    return out


def w4a16_kernel(machine) -> Optional[str]:
    """What vLLM runs for a W4A16 (CompressedTensorsWNA16) checkpoint here; None without vLLM."""
    if not machine.vllm_version:
        return None
    if not kernels.w4a16_runs(machine):
        return f"none: {kernels.WNA16_RULE}"
    isa = "amx ISA with bfloat16" if "amx_tile" in machine.features else "vec ISA"
    return f"{kernels.W4A16_KERNEL} ({isa})"


def _preset(d: dict) -> str:
    q = (d.get("quantization") or "").lower()
    return "w4a8" if q.startswith("w4a8") else "w4a16" if q.startswith("w4a16") else ""


def int4_verdict(machine, history: list[dict]) -> str:
    """One line: which of W4A8 / W4A16 is faster for decode on this machine, measured if possible."""
    if not kernels.w4a16_runs(machine):
        return "W4A8: the only INT4 path vLLM 0.32 runs on this CPU (its W4A16 GEMM is built for AVX-512 x86 only)"
    best: dict = {}
    for d in history:
        p = _preset(d)
        if p and d.get("decode_tok_s"):
            key = (d.get("test"), d.get("time"))  # one bench run: its records share the start time
            if d["decode_tok_s"] > best.get((p, key), {}).get("decode_tok_s", 0):
                best[(p, key)] = d
    pairs = [(best[("w4a8", k)], best[("w4a16", k)]) for (p, k) in best if p == "w4a8" and ("w4a16", k) in best]
    if pairs:
        a8, a16 = max(pairs, key=lambda ab: ab[0].get("time") or "")  # the most recent pair
        fast, slow = (a8, a16) if a8["decode_tok_s"] >= a16["decode_tok_s"] else (a16, a8)
        f_tok, s_tok = fast["decode_tok_s"], slow["decode_tok_s"]
        return (
            f"{_preset(fast).upper()} faster here: decode {f_tok:.1f} vs {s_tok:.1f} tok/s "
            f"({_preset(slow).upper()}), measured by arm-int4 bench ({a8['test']}, {a8.get('model_name')} vs "
            f"{a16.get('model_name')}, {(a8.get('time') or '')[:10]})"
        )
    # only AVX-512 x86 gets here. With arm_int4's x86 kernel W4A8 is no longer the reference fallback
    # and which preset decodes faster is not known without measuring.
    if (k := kernels.Kernel.of(machine.int4_kernel)) and k.is_x86 and not k.is_x86_fallback:
        return (
            f"not measured here: W4A8 runs arm_int4's {k.class_name}, W4A16 vLLM's {kernels.W4A16_KERNEL}; "
            "measure: arm-int4 bench MODEL-W4A8 MODEL-W4A16"
        )
    # W4A8 on vLLM's reference fallback (issue 15 measured decode on a Xeon: W4A8 0.12x BF16, W4A16 0.54x)
    return (
        "W4A16 expected faster (not measured here): W4A8 runs vLLM's x86 reference fallback; "
        "measure: arm-int4 bench MODEL-W4A8 MODEL-W4A16"
    )
