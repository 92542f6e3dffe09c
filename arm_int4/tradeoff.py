"""Accuracy against size for several variants of one model (`arm-int4 eval A B C --plot F.png`):
size on disk, bits per weight, perplexity and its Δ over the baseline, decode tok/s from bench
records when given, and the Pareto front (no other variant is both smaller and more accurate).

Bits per weight are counted as stored, over every parameter of the checkpoint (embeddings, norms
and lm_head included, as llama.cpp counts its BPW): a quantized weight's values count 4 bits each
(whatever container holds them: int8 for W4A8 int-quantized, int32 words for pack-quantized), its
scales, zero points and GPTQ g_idx at their stored width; every other tensor at its dtype's width.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from .checkpoint import read_checkpoint
from .workload import model_bytes

__all__ = ["INT4_BITS", "weight_bits", "pareto_front", "rows", "format_markdown", "plot", "bench_decode"]

INT4_BITS = 4


def weight_bits(model_dir) -> tuple[int, int]:
    """(parameters, bits) of a checkpoint, from read_checkpoint's count of its safetensors headers
    (see the module doc): int4 values, float parameters as stored, everything else (scales, zero
    points, g_idx, weight_shape) as stored and not counted as parameters."""
    f = read_checkpoint(model_dir)
    return f.quantized_values + f.float_values, INT4_BITS * f.quantized_values + 8 * (f.float_bytes + f.other_bytes)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (size, perplexity) points: True where no other point is at least as small and as accurate
    and strictly better in one of the two."""
    return [
        not any((s2 <= s and p2 <= p) and (s2 < s or p2 < p) for j, (s2, p2) in enumerate(points) if j != i)
        for i, (s, p) in enumerate(points)
    ]


def bench_decode(path: str) -> dict:
    """{model dir: decode tok/s at batch 1} from a bench JSON file (`arm-int4 bench --json FILE`, or
    the demo's demo-bench.json); the first batch-1 record of each model that succeeded."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--bench {path}: not a bench JSON file ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "model" in r for r in records):
        raise ValueError(f"--bench {path}: not a list of bench records (write one with arm-int4 bench --json FILE)")
    out: dict = {}
    for r in records:
        if r.get("batch") == 1 and r.get("error") is None and r.get("decode_tok_s"):
            out.setdefault(str(Path(r["model"]).resolve()), r["decode_tok_s"])
    return out


def rows(ppl_records: Sequence[dict], decode: Optional[dict] = None) -> list:
    """One row per scored model: {model_name, quantization, size_bytes, params, bits_per_weight, ppl,
    delta_ppl, decode_tok_s, pareto}."""
    out = []
    for r in ppl_records:
        params, bits = weight_bits(r["model"])
        out.append(
            {
                "model_name": r["model_name"],
                "quantization": r["quantization"],
                "size_bytes": model_bytes(r["model"]),
                "params": params,
                "bits_per_weight": bits / params if params else None,
                "ppl": r["ppl"],
                "delta_ppl": r.get("delta_ppl"),
                "decode_tok_s": (decode or {}).get(str(Path(r["model"]).resolve())),
            }
        )
    for row, on in zip(out, pareto_front([(x["size_bytes"], x["ppl"]) for x in out]), strict=True):
        row["pareto"] = on
    return out


def format_markdown(table: Sequence[dict]) -> str:
    lines = [
        "| model | quantization | size (MiB) | bits/weight | ppl | Δ ppl | decode tok/s b1 | Pareto front |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in table:
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        delta = "" if r["delta_ppl"] is None else f"{r['delta_ppl']:+.4f}"
        dec = "" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        lines.append(
            f"| {r['model_name']} | {r['quantization']} | {r['size_bytes'] / 2**20:.1f} | {bpw} | "
            f"{r['ppl']:.4f} | {delta} | {dec} | {'yes' if r['pareto'] else ''} |"
        )
    return "\n".join(lines)


def plot(table: Sequence[dict], path: str, caption: str = "") -> str:
    """Perplexity against size on disk, one labelled point per model, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table:
        x, y = r["size_bytes"] / 2**20, r["ppl"]
        ax.scatter([x], [y], marker="o" if r["pareto"] else "x", color="C0" if r["pareto"] else "C3", zorder=3)
        label = f"{r['model_name']}\n{r['quantization']}"
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((r["size_bytes"] / 2**20, r["ppl"]) for r in table if r["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), color="C0", alpha=0.6, label="Pareto front (o)")
        ax.legend(fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)  # never a half-written PNG under the name asked for
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
