"""One flat result record, several printers: markdown (stdout), JSON, JSON lines, CSV and a PNG plot.

Printers know nothing of measuring: everything they print is in the records, environment
included (llama-bench's design), so a JSON file printed later reads the same as the run did.
"""

import csv
import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from . import kernels

__all__ = [
    "Record",
    "METRICS",
    "to_dict",
    "format_json",
    "format_jsonl",
    "format_csv",
    "format_markdown",
    "plot",
    "check_targets",
    "emit",
    "exit_code",
    "baseline_name",
]

# Statistics carried as mean + `_sd` + `_samples` (one sample per repetition).
METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "tpot_ms", "total_tok_s", "output_tok_s", "achieved_gbs")


@dataclass
class Record:
    """One (model, configuration, test). Units are in the names; None = not measured or not applicable."""

    model: str  # the directory (or server URL)
    model_name: str
    quantization: Optional[str]  # from config.json: "bfloat16", "w4a8 mse-channelwise", ...
    quantized: bool
    test: str  # "pp128 tg128 b1": b concurrent requests of 128 prompt tokens, 128 generated each
    prompt_tokens: int
    gen_tokens: int
    batch: int
    mode: str = "offline"  # offline: vLLM's LLM in a subprocess; server: an OpenAI server over HTTP
    config: str = ""  # a caller's label for the engine configuration (tune), "" for the plan's
    repetitions: int = 0
    warmup: int = 0
    # ---- results: mean, sample sd (0 for one sample) and the per-repetition samples
    prefill_tok_s: Optional[float] = None  # batch * prompt tokens / slowest TTFT of the batch
    prefill_tok_s_sd: Optional[float] = None
    prefill_tok_s_samples: list = field(default_factory=list)
    decode_tok_s: Optional[float] = None  # all streams: batch / mean TPOT
    decode_tok_s_sd: Optional[float] = None
    decode_tok_s_samples: list = field(default_factory=list)
    ttft_ms: Optional[float] = None  # per repetition: mean over the batch's requests
    ttft_ms_sd: Optional[float] = None
    ttft_ms_samples: list = field(default_factory=list)
    ttft_ms_p50: Optional[float] = None  # over every request of every repetition
    ttft_ms_p99: Optional[float] = None
    ttft_ms_requests: list = field(default_factory=list)
    tpot_ms: Optional[float] = None  # (last token time - first token time) / (tokens - 1)
    tpot_ms_sd: Optional[float] = None
    tpot_ms_samples: list = field(default_factory=list)
    tpot_ms_p50: Optional[float] = None
    tpot_ms_p99: Optional[float] = None
    tpot_ms_requests: list = field(default_factory=list)
    total_tok_s: Optional[float] = None  # batch * (prompt + generated) / wall time of the batch
    total_tok_s_sd: Optional[float] = None
    total_tok_s_samples: list = field(default_factory=list)
    output_tok_s: Optional[float] = None  # generated tokens / wall time
    output_tok_s_sd: Optional[float] = None
    output_tok_s_samples: list = field(default_factory=list)
    achieved_gbs: Optional[float] = None  # decode steps/s * bytes_per_step / 1e9
    achieved_gbs_sd: Optional[float] = None
    achieved_gbs_samples: list = field(default_factory=list)
    bandwidth_gbs: Optional[float] = None  # this machine's triad (arm_int4.bandwidth)
    bandwidth_pct: Optional[float] = None  # achieved_gbs / bandwidth_gbs * 100
    peak_rss_bytes: Optional[int] = None  # summed RSS of the engine's processes during the test
    model_bytes: Optional[int] = None  # safetensors files on disk
    weights_in_memory_bytes: Optional[int] = None  # arm_int4.checkpoint.weights_in_memory
    bytes_per_step: Optional[int] = None  # read per decode step: weights touched + KV at mean context
    kv_bytes_per_token: Optional[int] = None
    load_s: Optional[float] = None  # engine start, once per configuration
    cached_tokens: Optional[int] = None  # prefix-cache hits (0 expected: prompts are fresh)
    # ---- configuration
    dtype: Optional[str] = None
    threads: Optional[int] = None
    engine_args: dict = field(default_factory=dict)  # LLM(...) keyword arguments
    env: dict = field(default_factory=dict)  # environment variables the plan set
    linear_kernels: list = field(default_factory=list)  # from vLLM's log ("Using X for Y")
    int4_kernel: Optional[str] = (
        None  # the quantized linear kernel vLLM's log says it ran (kernels.describe); None: dense
    )
    # ---- environment
    cpu: Optional[str] = None
    arch: Optional[str] = None
    cpu_features: list = field(default_factory=list)
    logical_cpus: Optional[int] = None
    usable_cpus: Optional[int] = None
    mem_total_bytes: Optional[int] = None
    torch_version: Optional[str] = None
    vllm_version: Optional[str] = None
    python_version: Optional[str] = None
    arm_int4_version: Optional[str] = None
    git_commit: Optional[str] = None
    time: Optional[str] = None  # ISO 8601, UTC
    excluded: str = ""  # what the timings leave out (tokenization, HTTP, ...)
    notes: list = field(default_factory=list)  # provenance and kernel warnings
    error: Optional[str] = None  # set when this test failed; the results are then None


def to_dict(r) -> dict:
    return dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type) else dict(r)


def format_json(records) -> str:
    return json.dumps([to_dict(r) for r in records], indent=1) + "\n"


def format_jsonl(records) -> str:
    return "".join(json.dumps(to_dict(r)) + "\n" for r in records)


def format_csv(records) -> str:
    """One row per record; list and dict fields are JSON text in their cell."""
    rows = [to_dict(r) for r in records]
    names = list(dict.fromkeys(k for row in rows for k in row)) or [f.name for f in dataclasses.fields(Record)]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return out.getvalue()


def _n(x) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _pm(r: Record, name: str) -> str:
    mean, sd = getattr(r, name), getattr(r, name + "_sd")
    return "-" if mean is None else f"{_n(mean)} ± {_n(sd or 0.0)}"


def _bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _who(r: Record) -> str:
    return r.model_name + (f" [{r.config}]" if r.config else "")


def baseline_name(records) -> Optional[str]:
    """The side-by-side baseline: the first unquantized model, else the first model."""
    ok = [r for r in records if r.error is None]
    first = next((r for r in ok if not r.quantized), ok[0] if ok else None)
    return _who(first) if first else None


def _side_by_side(records, metric: str, title: str) -> list:
    ok = [r for r in records if r.error is None]
    who = list(dict.fromkeys(_who(r) for r in ok))
    base = baseline_name(records)
    if len(who) < 2 or base is None:
        return []
    quant = {_who(r): r.quantization or "" for r in ok}
    # the quantization in brackets unless the name already says it ("…-w4a8dyn-mse-channelwise")
    label = {w: w if quant[w].split(" ")[-1] in w else f"{w} ({quant[w]})" for w in who}
    head = ["test", label[base]]
    for w in who:
        if w != base:
            head += [label[w], "×"]
    lines = [
        f"### {title}, side by side (× = speed-up over {base})",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
    ]
    cell = {(_who(r), r.test): r for r in ok}
    for test in dict.fromkeys(r.test for r in records):
        b = cell.get((base, test))
        row = [test, _pm(b, metric) if b else "-"]
        for w in who:
            if w == base:
                continue
            r = cell.get((w, test))
            v, bv = (getattr(r, metric) if r else None), (getattr(b, metric) if b else None)
            row += [_pm(r, metric) if r else "-", f"{v / bv:.2f}×" if v and bv else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def format_markdown(records) -> str:
    """The run as markdown: environment, method, one row per record, side-by-side speed-ups, notes."""
    if not records:
        return "no results\n"
    r0 = next((r for r in records if r.error is None), records[0])
    out = ["## arm-int4 bench", ""]
    bw = f"; memory bandwidth (triad) {r0.bandwidth_gbs:.1f} GB/s" if r0.bandwidth_gbs else ""
    out.append(
        f"- machine: {r0.cpu or 'unknown CPU'} ({r0.arch}), {r0.usable_cpus} usable of {r0.logical_cpus} "
        f"logical CPUs, {' '.join(r0.cpu_features) or 'no listed ISA features'}{bw}"
    )
    out.append(
        f"- software: vLLM {r0.vllm_version}, torch {r0.torch_version}, Python {r0.python_version}, "
        f"arm-int4 {r0.arm_int4_version} (git {r0.git_commit or 'unknown'})"
    )
    modes = {r.mode for r in records}
    out.append(
        f"- method: {r0.warmup} untimed warm-up batch(es), then {r0.repetitions} timed repetitions per test; "
        "mean ± sd over repetitions, p50/p99 over all requests; "
        + " / ".join(
            text
            for mode, text in (
                ("offline", "vLLM's offline engine in a fresh subprocess per configuration"),
                ("server", "an OpenAI server over HTTP, one client per concurrent request"),
                (
                    "llamacpp",
                    "llama.cpp (llama-cpp-python) in a subprocess, batch B = B parallel sequences in one context",
                ),
            )
            if mode in modes
        )
    )
    for ex in dict.fromkeys(r.excluded for r in records if r.excluded):
        out.append(f"- not timed: {ex}")
    starts = {_who(r): r.load_s for r in records if r.load_s is not None}
    if starts:
        out.append("- engine start (untimed): " + "; ".join(f"{w} {s:.0f} s" for w, s in starts.items()))
    out += [
        "- test ppP tgN bB: B concurrent requests of P prompt tokens, N generated each; decode tok/s = B / TPOT "
        "(all streams); prefill tok/s = B·P / slowest TTFT; total tok/s = B·(P+N) / wall time; GB/s = decode "
        "steps/s × (weights read + KV read per step)",
        "",
    ]
    cfg = any(r.config for r in records)
    head = (
        ["model"]
        + (["config"] if cfg else [])
        + [
            "quantization",
            "test",
            "prefill tok/s",
            "decode tok/s",
            "TTFT ms p50/p99",
            "TPOT ms p50/p99",
            "total tok/s",
            "GB/s (% of triad)",
            "peak RSS",
            "model size",
        ]
    )
    out += ["| " + " | ".join(head) + " |", "|---|" + ("---|" if cfg else "") + "---|---|" + "---:|" * 8]
    for r in records:
        if r.error is not None:
            row = [r.model_name] + ([r.config] if cfg else []) + [r.quantization or "-", r.test, "failed"] + ["-"] * 7
        else:
            gbs = (
                "-"
                if r.achieved_gbs is None
                else _n(r.achieved_gbs) + (f" ({r.bandwidth_pct:.0f}%)" if r.bandwidth_pct is not None else "")
            )
            row = (
                [r.model_name]
                + ([r.config] if cfg else [])
                + [
                    r.quantization or "-",
                    r.test,
                    _pm(r, "prefill_tok_s"),
                    _pm(r, "decode_tok_s"),
                    f"{_n(r.ttft_ms_p50)} / {_n(r.ttft_ms_p99)}",
                    f"{_n(r.tpot_ms_p50)} / {_n(r.tpot_ms_p99)}",
                    _pm(r, "total_tok_s"),
                    gbs,
                    _bytes(r.peak_rss_bytes),
                    _bytes(r.model_bytes),
                ]
            )
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out += _side_by_side(records, "decode_tok_s", "decode tok/s")
    out += _side_by_side(records, "prefill_tok_s", "prefill tok/s")
    if any(r.batch > 1 for r in records):  # aggregate throughput: generated tokens / wall time, all streams
        out += _side_by_side(records, "output_tok_s", "output tok/s")
    for note in dict.fromkeys(n for r in records for n in r.notes):
        out.append(f"> note: {note}")
    failed = [r for r in records if r.error is not None]
    if failed:
        tests: dict = {}
        for r in failed:  # one line per model and error, naming its tests
            tests.setdefault((_who(r), r.error), []).append(r.test)
        out += ["", "### failed", ""] + [f"- {who} ({', '.join(t)}): {err}" for (who, err), t in tests.items()]
    return "\n".join(out).rstrip() + "\n"


def plot(records, path: str) -> str:
    """Grouped bars (one group per test, one bar per model, sd as error bars): prefill and decode tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None]
    tests = list(dict.fromkeys(r.test for r in ok))
    who = list(dict.fromkeys(_who(r) for r in ok))
    cell = {(_who(r), r.test): r for r in ok}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(tests) * max(1, len(who)) / 2 + 4), 4.5))
    width = 0.8 / max(1, len(who))
    panels = (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s (all streams)"))
    for ax, (metric, title) in zip(axes, panels, strict=False):
        for i, w in enumerate(who):
            vals = [getattr(cell.get((w, t)), metric, None) or 0 for t in tests]
            errs = [getattr(cell.get((w, t)), metric + "_sd", None) or 0 for t in tests]
            ax.bar([x + i * width for x in range(len(tests))], vals, width, yerr=errs, capsize=3, label=w)
        ax.set_xticks([x + width * (len(who) - 1) / 2 for x in range(len(tests))], tests, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(who))), fontsize=7)
    r0 = ok[0] if ok else None
    caption = f"{r0.cpu} ({r0.arch}), vLLM {r0.vllm_version}" if r0 else "no successful results"
    if any(kernels.is_x86_fallback(r.int4_kernel) for r in ok):
        caption += " — INT4 on the x86 reference fallback, not an Arm figure"
    elif any((k := kernels.Kernel.of(r.int4_kernel)) and k.is_x86 for r in ok):
        caption += " — INT4 on arm_int4's x86 kernel, not an Arm figure"
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * ((len(who) + 2) // 3), 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_FORMATS = {"json": format_json, "jsonl": format_jsonl, "csv": format_csv}


def check_targets(
    *,
    json_path: Optional[str] = None,
    csv_path: Optional[str] = None,
    jsonl_path: Optional[str] = None,
    plot_path: Optional[str] = None,
) -> None:
    """Refuse output paths that cannot work before anything is measured (UsageError, one line)."""
    from .errors import UsageError

    targets = {"--json": json_path, "--jsonl": jsonl_path, "--csv": csv_path, "--plot": plot_path}
    to_stdout = [k for k, v in targets.items() if v == "-"]
    if len(to_stdout) > 1 or plot_path == "-":
        raise UsageError(
            f"{' and '.join(to_stdout)} both ask for stdout ('-'): send at most one text format there"
            if plot_path != "-"
            else "--plot needs a FILE.png, not stdout"
        )
    if plot_path and not plot_path.lower().endswith(".png"):
        raise UsageError(f"--plot {plot_path}: the file name must end in .png")
    for flag, path in targets.items():
        parent = os.path.dirname(os.path.abspath(path)) if path and path != "-" else None
        if parent and not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: directory {parent} does not exist")


def emit(
    records,
    *,
    md=None,
    json_path: Optional[str] = None,
    csv_path: Optional[str] = None,
    jsonl_path: Optional[str] = None,
    plot_path: Optional[str] = None,
) -> None:
    """Markdown to `md` (default: stdout) unless another format goes to stdout ('-'); the others
    to their files."""
    check_targets(json_path=json_path, csv_path=csv_path, jsonl_path=jsonl_path, plot_path=plot_path)
    targets = {"json": json_path, "jsonl": jsonl_path, "csv": csv_path}
    for kind, path in targets.items():
        if path and path != "-":
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(_FORMATS[kind](records))
    if plot_path:
        plot(records, plot_path)
    to_stdout = [k for k, v in targets.items() if v == "-"]
    if to_stdout:
        sys.stdout.write(_FORMATS[to_stdout[0]](records))
    else:
        (md or sys.stdout).write(format_markdown(records))
    sys.stdout.flush()


def exit_code(records) -> int:
    """0 when every record succeeded, 1 when any failed (the sweep still ran the others)."""
    return 1 if not records or any(r.error is not None for r in records) else 0
