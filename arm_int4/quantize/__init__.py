"""`arm-int4 quantize`: resolve MODEL, refuse early, run an engine into a temp dir, verify, rename.

Output is written to `.{name}.arm-int4-tmp-{pid}` beside the target and renamed at the end, so an
interrupted run leaves no partial output; temp dirs of dead runs (SIGKILL) are removed on the
next run. An existing output is replaced only with --overwrite.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import hub
from ..errors import ArmInt4Error, BudgetNotMet, UsageError
from ..models import cache_home, resolve
from ..schemes import MixedScheme, Scheme, output_dir_name
from ..workers.worker_io import peak_rss_bytes
from .moe import MOE_IGNORE, is_moe_config
from .options import QuantizeOptions
from .preflight import check_free_space, check_output, plan_quantization, read_source_checkpoint
from .preview import QuantPreview, preview
from .verify import VerifyReport, verify_dir, verify_written

BUDGET_BASE = Scheme("w4a8", "channelwise", None, "mse")  # --budget plans from it (no group-size check)

__all__ = ["QuantResult", "quantize", "verify_dir", "output_path", "dry_run"]


@dataclass
class QuantResult:
    output: Path
    scheme: Scheme | MixedScheme
    engine: str
    layers: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    stream: Any = None  # the stream engine's StreamStats (time per phase, jobs, largest tensor)
    budget: Any = None  # --budget: BudgetReport (the choice, sizes, perplexity through vLLM)

    @property
    def rss_bound_bytes(self) -> int | None:
        """The stream engine's memory goal: 2 × the largest tensor + 1 GiB, per job."""
        from .stream import memory_bound

        return memory_bound(self.stream.jobs, self.stream.largest_tensor) if self.stream else None

    def summary(self) -> str:
        mib = 2**20
        bound = (
            f" (bound {self.rss_bound_bytes / mib:.0f} MiB for {self.stream.jobs} jobs)"
            if self.stream and self.rss_bound_bytes
            else ""
        )
        lines = [
            f"quantized {self.layers} Linear layers ({self.scheme.preset} {self.scheme.label}, {self.engine} engine) "
            f"in {self.seconds:.1f} s",
            f"  tensors {self.bytes_in / mib:.1f} MiB -> {self.bytes_out / mib:.1f} MiB, "
            f"peak RSS {self.peak_rss_bytes / mib:.0f} MiB{bound}",
        ]
        if self.stream:
            lines.append(f"  {self.stream.summary()}")
        if self.budget:
            lines.append(self.budget.summary())
        lines.append(f"  output: {self.output}")
        return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"arm-int4: {msg}", file=sys.stderr, flush=True)  # noqa: T201 (progress goes to stderr by design)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Temp/old dirs left beside `out` by runs that died (their pid is gone)."""
    for d in out.parent.glob(f".{out.name}.arm-int4-*-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def output_path(opts: QuantizeOptions, scheme: Scheme, model_dir: Path) -> Path:
    if opts.output:
        return Path(opts.output).expanduser().absolute()
    # the learning path names the output after MODEL as typed (hub id basename), except "default"
    name = model_dir.name if opts.model == "default" else opts.model
    if opts.budget is not None:
        return Path.cwd() / f"{os.path.basename(name.rstrip('/'))}-w4a8dyn-budget{opts.budget:g}pct"
    return Path.cwd() / output_dir_name(name, scheme)


def _engine(opts: QuantizeOptions) -> str:
    if opts.algorithm == "gptq":
        if opts.engine == "stream":
            raise UsageError(
                "--algorithm gptq needs calibration passes: use --engine llmcompressor (the default for gptq)"
            )
        return "llmcompressor"
    return opts.engine or "stream"


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_budget_options(opts: QuantizeOptions, pct: float, engine: str) -> None:
    if not 0 < pct < 1000:
        raise UsageError(f"--budget {pct:g}: give a perplexity increase in percent, e.g. --budget 10")
    if engine != "stream" or opts.preset != "w4a8":
        raise UsageError("--budget chooses among W4A8 round-to-nearest schemes: drop --engine/--algorithm/--preset")
    if opts.budget_tokens < 16:
        raise UsageError(f"--budget-tokens {opts.budget_tokens}: give 16 or more calibration tokens")
    if not opts.budget_max_minutes > 0:
        raise UsageError(f"--budget-max-minutes {opts.budget_max_minutes:g}: give a positive number of minutes")
    if opts.budget_eval_tokens < 64:
        raise UsageError(f"--budget-eval-tokens {opts.budget_eval_tokens}: give 64 or more evaluation tokens")


def _quantize_budget(opts: QuantizeOptions, pct: float, plan, model_dir: Path, out: Path) -> QuantResult:
    """--budget: choose (budget.py), write with the stream engine, measure through vLLM, and aim the
    next choice at the budget from what vLLM measured, until an attempt lands within
    [CLOSE_ENOUGH, 1] × budget (at most VLLM_ROUNDS writes); keep the smallest within budget."""
    from . import budget
    from .sensitivity import Sensitivity
    from .stream import run_stream

    t0 = time.time()
    sens = Sensitivity(plan, opts.observer_precision, opts.budget_tokens, _log)
    units = budget.fused_units(plan)
    options = sens.options(units, cache_home() / "budget", opts.budget_max_minutes)
    report = budget.BudgetReport(budget_pct=pct, source_bytes=plan.checkpoint.nbytes)
    limit = None  # calibration-KL nats the whole choice may cost; rescaled by what vLLM measures
    tries: list[Path] = []
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        for attempt in range(budget.VLLM_ROUNDS):
            choice = budget.fit(sens, units, options, pct, limit)  # a budget no layer fits: refused here
            if not choice.any_int4:  # every unit BF16: no INT4 model within budget (not a 100%-size "answer")
                if not report.attempts:
                    raise BudgetNotMet(
                        f"--budget {pct:g}: cannot be met: no INT4 layer fits it on the calibration text "
                        "as a whole; nothing written: raise --budget"
                    )
                report.exhausted = True
                break
            if not report.base:  # the source through vLLM, once (after the first choice: nothing is refused later)
                report.base, report.base_heldout = _perplexity(model_dir, opts.budget_eval_tokens)
            mplan = budget.mixed_plan(plan, units, choice.choice)
            tmp = out.parent / f".{out.name}.arm-int4-try{attempt}-{os.getpid()}"
            tries.append(tmp)
            tmp.mkdir()
            stats = run_stream(mplan, tmp, opts.observer_precision, jobs=opts.jobs)
            verified = verify_written(tmp, mplan, stats)
            rec, heldout = _perplexity(tmp, opts.budget_eval_tokens)
            report.add(choice, mplan, stats, verified, rec, heldout, tmp)
            _log(report.attempts[-1].line(report))
            increase = report.attempts[-1].increase_pct
            if budget.CLOSE_ENOUGH * pct <= increase <= pct:
                break
            # calibration KL → perplexity through vLLM, as measured: aim the next choice at the budget
            # (tighter after a miss, looser when far under it: a smaller model may fit)
            seen = rec["nll"] - report.base["nll"]
            scale = budget.budget_nats(pct) / seen if seen > 0 else 2.0
            limit = choice.measured_kl * min(scale, 4.0)
        best = report.best()
        if best.increase_pct > pct and not opts.keep_best:
            raise BudgetNotMet(report.not_met_line(kept=False))
        if out.exists():  # --overwrite was given (checked above)
            shutil.rmtree(out)
        os.rename(best.path, out)
        best.path = out
    finally:
        signal.signal(signal.SIGTERM, previous)
        for t in tries:
            shutil.rmtree(t, ignore_errors=True)
    result = QuantResult(
        output=out,
        scheme=best.plan.scheme,
        engine="stream",
        layers=best.verified.layers,
        bytes_in=plan.checkpoint.nbytes,
        bytes_out=best.verified.nbytes,
        seconds=time.time() - t0,
        peak_rss_bytes=peak_rss_bytes(children=True),
        stream=best.stats,
        budget=report,
    )
    if best.increase_pct > pct:  # kept on request: the CLI prints it, then the one line
        raise BudgetNotMet(report.not_met_line(kept=True), result)
    return result


def _perplexity(model_dir: Path, tokens: int) -> tuple[dict, dict]:
    """arm-int4 eval's perplexity (its defaults) through vLLM on the search part of the packaged text
    (what the budget decides on) and on the held-out part (what `arm-int4 eval` scores by default),
    both in one engine: (search record, held-out record)."""
    from .. import evaluate

    texts = [evaluate.load_text(evaluate.SEARCH_TEXT), evaluate.load_text(evaluate.DEFAULT_TEXT)]
    search, heldout = evaluate.perplexities(model_dir, texts, num_tokens=tokens, progress=_log)
    return search, heldout


def _quantize_rotated(opts: QuantizeOptions) -> QuantResult:
    """--rotate: MODEL rotated (quantize/rotate.py) into a temp dir beside the output, then quantized as usual."""
    from dataclasses import replace

    from .rotate import rotate_checkpoint

    scheme = (
        BUDGET_BASE
        if opts.budget is not None
        else Scheme.from_options(opts.preset, opts.scheme, opts.method, opts.groupsize)
    )
    model_dir = resolve(opts.model, progress=_log)
    out = output_path(opts, scheme, model_dir)
    if not opts.output:
        out = out.with_name(out.name + "-rot")
    check_output(out, opts.overwrite)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.arm-int4-rot-{os.getpid()}"
    try:
        rotation = rotate_checkpoint(model_dir, tmp, progress=_log)
        _log(f"rotated {model_dir} (R1 {rotation.r1}, R2 {rotation.r2}, seed {rotation.seed})")
        return quantize(replace(opts, model=str(tmp), output=str(out), rotate=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _scheme_and_engine(opts: QuantizeOptions) -> tuple[Scheme, str]:
    """The options checked (one line each) and read into the scheme and the engine that runs it."""
    scheme = Scheme.from_options(opts.preset, opts.scheme, opts.method, opts.groupsize)
    engine = _engine(opts)
    if opts.jobs is not None and opts.jobs < 1:
        raise UsageError(f"--jobs {opts.jobs}: give 1 or more (tensors quantized at once)")
    if opts.dataset and opts.algorithm != "gptq":
        raise UsageError("--dataset is used only by --algorithm gptq (rtn is data-free)")
    if opts.dataset and opts.dataset.endswith((".jsonl", ".json", ".txt")) and not Path(opts.dataset).is_file():
        raise UsageError(f"--dataset {opts.dataset}: file not found (a local .jsonl/.json/.txt, or a datasets id)")
    if opts.budget is not None:
        _check_budget_options(opts, opts.budget, engine)
        scheme = BUDGET_BASE
    return scheme, engine


def dry_run(opts: QuantizeOptions) -> QuantPreview:
    """What `quantize` would read, write and hold (a hub id: from its config.json and index only)."""
    from .stream import usable_cpus

    if opts.rotate:  # its rotated copy of the source is another full-size write; not planned yet
        raise UsageError("--dry-run does not plan --rotate yet: drop one of them")
    scheme, engine = _scheme_and_engine(opts)
    remote = hub.metadata(opts.model, progress=_log) if hub.is_hub_id(opts.model) else None
    model_dir = None if remote else resolve(opts.model, progress=_log)
    return preview(
        opts.model,
        scheme,
        engine,
        ignore=list(opts.ignore),
        output=output_path(opts, scheme, model_dir or Path(opts.model)),
        jobs=opts.jobs or usable_cpus(),
        precision=opts.observer_precision,
        model_dir=model_dir,
        hub=remote,
    )


def _hub_source(opts: QuantizeOptions) -> Path:
    """A hub id downloaded after the disk was checked for the download and the output together."""
    pv = dry_run(opts)
    assert pv.hub is not None
    check_output(pv.output, opts.overwrite)  # before a 16 GB download, not after it
    written = pv.source_bytes if opts.budget is not None else pv.output_bytes  # --budget: up to BF16's size
    return hub.download(pv.hub, also=[pv.output_need(written)], progress=_log)


def quantize(opts: QuantizeOptions) -> QuantResult:
    if opts.rotate:
        return _quantize_rotated(opts)
    scheme, engine = _scheme_and_engine(opts)
    model_dir = _hub_source(opts) if hub.is_hub_id(opts.model) else resolve(opts.model, progress=_log)
    out = output_path(opts, scheme, model_dir)
    check_output(out, opts.overwrite)
    ck = read_source_checkpoint(model_dir)
    if opts.budget is not None and is_moe_config(ck.config):
        raise UsageError("--budget: mixture-of-experts models are not supported (experts would need one scheme)")
    ignore = list(opts.ignore) + (MOE_IGNORE if is_moe_config(ck.config) else [])  # both engines
    plan = plan_quantization(ck, scheme, ignore, require_safetensors=engine == "stream")
    _remove_stale(out)
    if engine == "stream":  # --budget writes one try at a time, each at most the base scheme's size… or BF16's
        from .stream import output_bytes

        check_free_space(out, ck.nbytes if opts.budget is not None else output_bytes(plan, opts.observer_precision))
    if opts.budget is not None:
        return _quantize_budget(opts, opts.budget, plan, model_dir, out)

    t0 = time.time()
    tmp = out.parent / f".{out.name}.arm-int4-tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.arm-int4-old-{os.getpid()}"
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        tmp.mkdir()
        _log(f"{engine} engine: {len(plan.targets) or 'all'} Linear layers of {model_dir} -> {out}")
        stats = None
        if engine == "stream":
            from .stream import run_stream

            stats = run_stream(plan, tmp, opts.observer_precision, jobs=opts.jobs)
            report: VerifyReport = verify_written(tmp, plan, stats)
        else:
            from .llmc import packaged_calibration, run_llmcompressor

            calibration = None
            if opts.algorithm == "gptq":
                dataset = opts.dataset
                if not dataset:
                    dataset = str(packaged_calibration())  # reads and hashes the file: once
                    _log(f"gptq: calibrating on the packaged offline set ({dataset}); --dataset to change")
                calibration = {
                    "dataset": dataset,
                    "num_samples": opts.num_samples,
                    "max_seq_len": opts.max_seq_len,
                    "dampening_frac": opts.dampening_frac,
                    "actorder": opts.actorder,
                }
            run_llmcompressor(
                model_dir,
                tmp,
                scheme,
                ignore,
                algorithm=opts.algorithm,
                calibration=calibration,
                cast_fp32=opts.observer_precision == "fp32",
            )
            report = verify_dir(tmp)
        if out.exists():  # --overwrite was given (checked above)
            os.rename(out, old)
        os.rename(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the disk filled up after the check (another writer): nothing kept
            raise ArmInt4Error(
                f"no space left on the disk of {out.parent} while writing {out.name}; nothing was kept: "
                "free some space or pass --output DIR on another disk"
            ) from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return QuantResult(
        output=out,
        scheme=scheme,
        engine=engine,
        layers=report.layers,
        bytes_in=ck.nbytes,
        bytes_out=report.nbytes,
        seconds=time.time() - t0,
        peak_rss_bytes=peak_rss_bytes(children=True),  # and the llmcompressor worker's
        stream=stats,
    )
