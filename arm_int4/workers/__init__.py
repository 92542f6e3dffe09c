"""The scripts that run inside another process's interpreter, started only by arm_int4.runner.

Each is run by file path (`PYTHON arm_int4/workers/NAME_worker.py JOB.json RESULT.json`), possibly
in another environment (the quantization env for llmc_worker, llama.cpp's for llamacpp_worker),
so it imports nothing of arm_int4: only the standard library, its own stack, and its stdlib-only
sibling `worker_io`. The result is a JSON object written atomically to RESULT.json (a worker may
rewrite it while it runs, to report progress); `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

| worker | runs in | started by |
|---|---|---|
| bench_worker.py | serving env, vLLM offline engine | arm_int4.bench (bench, tune, demo) |
| perplexity_worker.py | serving env, vLLM offline engine | arm_int4.evaluate (eval perplexity) |
| lmeval_worker.py | serving env, lm-eval's vLLM backend | arm_int4.lmeval (eval tasks) |
| llmc_worker.py | quantization env, llmcompressor | arm_int4.quantize.llmc |
| llamacpp_worker.py | llama.cpp env | arm_int4.llamacpp (bench --vs-llamacpp) |

serve_headless.py is not a job worker: it is the command of a multi-node engine's node of rank > 0
(launch.HEADLESS_ENTRY, vLLM's own server arguments), run as a server by runner.Server.
"""

from pathlib import Path

__all__ = ["DIR", "path"]

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The file of worker `name` ("bench", "perplexity", "lmeval", "llmc", "llamacpp")."""
    return DIR / f"{name}_worker.py"
