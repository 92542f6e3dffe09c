"""Stdlib-only helpers shared by the engine worker scripts (bench_worker, perplexity_worker,
lmeval_worker, llamacpp_worker).

The workers run by file path, possibly in another venv (llama.cpp's), and import nothing of the
arm_int4 package; Python puts a script's own directory first on sys.path, so they import this
sibling module as `worker_io`.
"""

import json
import os
import sys

__all__ = ["write_json_atomic", "one_line", "peak_rss_bytes", "shutdown_engines", "main"]


def write_json_atomic(path, obj) -> None:
    """Write JSON to `path` through a temp file + rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def one_line(exc) -> str:
    """`Type: first line of the message`, at most 400 characters: what the parent reports."""
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0][:400]


def peak_rss_bytes(children: bool = False) -> int:
    """Peak RSS of this process since it exec'd (VmHWM), in bytes; with `children`, also the largest
    of its waited-for children (ru_maxrss). Not this process's own ru_maxrss: Linux carries a forked
    child's pre-exec image into it, so a CLI started from a 2 GiB pytest reported 2 GiB for a 3 MiB
    model. Falls back to ru_maxrss where /proc is missing."""
    import resource

    own = 0
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    own = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not own:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if children:
        own = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return own


def shutdown_engines(llms) -> None:
    """Stop each vLLM LLM's engine core and worker now, while the interpreter is intact (best
    effort), so the caller can then skip interpreter teardown with os._exit."""
    for llm in llms:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # an API change here must not lose a finished measurement
            import traceback

            traceback.print_exc()


def main(argv, run, engines=None) -> None:
    """A worker's whole life: `argv` = [script, JOB.json, RESULT.json]; result = run(job), or
    {"ok": false, "error": one line} if it raised (traceback to stderr, which is the log). With
    `engines` (a list the run appends its vLLM LLMs to): shut them down, then skip interpreter
    teardown — a C++ static destructor in vLLM's stack sometimes aborts there ("terminate called
    without an active exception", seen here after complete runs), which would turn a finished
    measurement into a failure; the parent reaps the process group whatever happens."""
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    try:
        result = run(job)
    except Exception as exc:  # reported to the parent as one line
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": one_line(exc)}
    if engines is not None:
        shutdown_engines(engines)
    write_json_atomic(argv[2], result)
    sys.stdout.flush()
    sys.stderr.flush()
    code = 0 if result.get("ok") else 1
    if engines is not None:
        os._exit(code)
    sys.exit(code)
