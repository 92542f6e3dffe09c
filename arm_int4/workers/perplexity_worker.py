"""Scores token windows with a vLLM engine; started by arm_int4.evaluate, one process per model.

Run (by arm_int4.runner only): VENV_PYTHON arm_int4/workers/perplexity_worker.py JOB.json RESULT.json
(standalone: imports only its stdlib-only sibling worker_io.py)
JOB.json = {"model": dir, "engine_kwargs": {LLM kwargs from the launch plan},
            "windows": [[token ids], ...], "score_from": [first scored position per window],
            "return_token_logprobs": bool, "seed": int,
            "groups": [window count per group, summing to len(windows); default one group]}
RESULT.json: {"ok": true, "nll": [per-window sum of -logprob], "counts": [...], "load_seconds",
"score_seconds", "group_seconds": [one per group], "vllm_version", ["token_logprobs"]} or
{"ok": false, "error": "..."}. Each group (e.g. one text of several scored in one engine) is one
`generate` call, timed on its own.

Why a process per model: vLLM 0.32 frees an engine only by SIGTERM-ing its engine core and
force-killing the worker after a 5 s grace (seen here: "force killing remaining processes",
leaked shared-memory warnings), so a fresh interpreter is the only clean slate. The
`if __name__ == "__main__":` guard is required: vLLM spawns its workers.
"""

import sys
import time

from worker_io import main  # sibling module (this script's dir)

_ENGINE: list = []  # the LLM, so main() can shut it down on any exit path


def score(job):
    from vllm import LLM, SamplingParams, __version__

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], seed=job.get("seed", 0), **job["engine_kwargs"])
    load_seconds = time.perf_counter() - t0
    _ENGINE.append(llm)

    windows = job["windows"]
    # prompt_logprobs=0: vLLM 0.32 gathers the logprob of the *actual* next prompt token plus the
    # top-k (k=0 here) at every prompt position (Sampler.gather_logprobs), from fp32 log_softmax of
    # the raw logits; position 0 is None. Requests with prompt logprobs skip the prefix cache, so
    # overlapping windows are each computed in full.
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outputs, group_seconds, first = [], [], 0
    for n in job.get("groups") or [len(windows)]:
        t0 = time.perf_counter()
        outputs += llm.generate([{"prompt_token_ids": w} for w in windows[first : first + n]], params, use_tqdm=False)
        group_seconds.append(round(time.perf_counter() - t0, 3))
        first += n

    nll, counts, token_logprobs = [], [], []
    for w, start, out in zip(windows, job["score_from"], outputs, strict=False):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(w):
            raise RuntimeError(
                f"vLLM returned {0 if plp is None else len(plp)} prompt logprobs for a {len(w)}-token window"
            )
        lps = []
        for pos in range(max(start, 1), len(w)):
            entry = plp[pos][w[pos]]  # keyed by token id: the actual prompt token's logprob
            lps.append(entry.logprob)
        nll.append(-sum(lps))
        counts.append(len(lps))
        if job.get("return_token_logprobs"):
            token_logprobs.append(lps)
    result = {
        "ok": True,
        "nll": nll,
        "counts": counts,
        "load_seconds": round(load_seconds, 3),
        "score_seconds": round(sum(group_seconds), 3),
        "group_seconds": group_seconds,
        "vllm_version": __version__,
    }
    if job.get("return_token_logprobs"):
        result["token_logprobs"] = token_logprobs
    return result


if __name__ == "__main__":
    main(sys.argv, score, _ENGINE)
