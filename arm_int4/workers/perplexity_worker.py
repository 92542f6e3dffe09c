"""Scores token windows with a vLLM engine; started by arm_int4.evaluate, one process per model.

Run: VENV_PYTHON arm_int4/workers/perplexity_worker.py JOB.json   (standalone: imports only its stdlib-only sibling worker_io.py)
JOB.json = {"model": dir, "dtype": "auto"|"bfloat16"|"float32"|..., "max_model_len": int,
            "max_num_batched_tokens": int,
            "windows": [[token ids], ...], "score_from": [first scored position per window],
            "return_token_logprobs": bool, "seed": int}
Prints one JSON line on stdout: {"ok": true, "nll": [per-window sum of -logprob],
"counts": [...], "load_seconds", "score_seconds", "vllm_version", ["token_logprobs"]} or
{"ok": false, "error": "..."}. vLLM's own logs go to stderr (VLLM_LOGGING_STREAM), so stdout
carries nothing else.

Why a process per model: vLLM 0.32 frees an engine only by SIGTERM-ing its engine core and
force-killing the worker after a 5 s grace (seen here: "force killing remaining processes",
leaked shared-memory warnings), so a fresh interpreter is the only clean slate. The
`if __name__ == "__main__":` guard is required: vLLM spawns its workers.
"""

import json
import os
import sys
import time

from worker_io import shutdown_engines  # sibling module (this script's dir)


_ENGINE = []  # the LLM, so main() can shut it down on any exit path


def score(job):
    from vllm import LLM, SamplingParams, __version__

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"), max_model_len=job["max_model_len"],
              max_num_batched_tokens=job["max_num_batched_tokens"], enforce_eager=True, seed=job.get("seed", 0))
    load_seconds = time.perf_counter() - t0
    _ENGINE.append(llm)

    windows = job["windows"]
    # prompt_logprobs=0: vLLM 0.32 gathers the logprob of the *actual* next prompt token plus the
    # top-k (k=0 here) at every prompt position (Sampler.gather_logprobs), from fp32 log_softmax of
    # the raw logits; position 0 is None. Requests with prompt logprobs skip the prefix cache, so
    # overlapping windows are each computed in full.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    t0 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    score_seconds = time.perf_counter() - t0

    nll, counts, token_logprobs = [], [], []
    for w, start, out in zip(windows, job["score_from"], outputs):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(w):
            raise RuntimeError(f"vLLM returned {0 if plp is None else len(plp)} prompt logprobs for a "
                               f"{len(w)}-token window")
        lps = []
        for pos in range(max(start, 1), len(w)):
            entry = plp[pos][w[pos]]  # keyed by token id: the actual prompt token's logprob
            lps.append(entry.logprob)
        nll.append(-sum(lps))
        counts.append(len(lps))
        if job.get("return_token_logprobs"):
            token_logprobs.append(lps)
    result = {"ok": True, "nll": nll, "counts": counts, "load_seconds": round(load_seconds, 3),
              "score_seconds": round(score_seconds, 3), "vllm_version": __version__}
    if job.get("return_token_logprobs"):
        result["token_logprobs"] = token_logprobs
    return result



def main(argv):
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    try:
        result = score(job)
    except Exception as exc:  # reported to the parent as one line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    shutdown_engines(_ENGINE)
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    # Skip interpreter teardown: a C++ static destructor in vLLM's stack sometimes aborts there
    # ("terminate called without an active exception", seen here after a complete run), which
    # would turn a finished measurement into a failure. The engine was shut down above, and the
    # parent reaps this process group whatever happens.
    os._exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main(sys.argv)
