"""Stdlib-only helpers shared by the engine worker scripts (bench_worker, perplexity_worker,
lmeval_worker, llamacpp_worker).

The workers run by file path, possibly in another venv (llama.cpp's), and import nothing of the
arm_int4 package; Python puts a script's own directory first on sys.path, so they import this
sibling module as `worker_io`.
"""

import json
import os

__all__ = ["write_json_atomic", "one_line", "shutdown_engines"]


def write_json_atomic(path, obj) -> None:
    """Write JSON to `path` through a temp file + rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def one_line(exc) -> str:
    """`Type: first line of the message`, at most 400 characters: what the parent reports."""
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0][:400]


def shutdown_engines(llms) -> None:
    """Stop each vLLM LLM's engine core and worker now, while the interpreter is intact (best
    effort), so the caller can then skip interpreter teardown with os._exit."""
    for llm in llms:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # an API change here must not lose a finished measurement
            import traceback

            traceback.print_exc()
