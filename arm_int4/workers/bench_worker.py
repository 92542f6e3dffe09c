"""Times generation with one vLLM engine; started by arm_int4.bench, one process per configuration.

Run (by arm_int4.runner only): VENV_PYTHON arm_int4/workers/bench_worker.py JOB.json RESULT.json
(standalone: imports only its stdlib-only sibling worker_io.py)
JOB.json = {"model": dir, "engine_kwargs": {LLM(...) keyword args}, "tests": [[prompt, gen, batch], ...],
            "warmup": int, "repetitions": int, "seed": int, "rss_interval_s": float}
Writes RESULT.json (rewritten atomically after each test, so a crash keeps finished tests):
{"ok": bool, "error": str|None, "load_s", "vllm_version", "torch_version", "vocab",
 "tests": [{"prompt", "gen", "batch", "error", "peak_rss_bytes",
            "reps": [{"wall_s", "ttft_s": [per request], "tpot_s": [per request or None],
                      "gen_tokens": [...], "cached_tokens": int}]}]}
vLLM logs to stdout/stderr (the parent sends both to a log file).

Method (docs/bench.md): prompts are random token ids drawn from the tokenizer's non-special ids,
fresh for every request, so nothing is tokenized and the prefix cache never hits; detokenization
is off. Each test runs `warmup` untimed batches of its own shape, then `repetitions` timed ones.
Per request, vLLM's own stats (disable_log_stats=False) give TTFT (first_token_latency: arrival
to first token, frontend wall clock) and TPOT ((last_token_ts - first_token_ts) / (tokens - 1),
engine-core clock). wall_s is llm.generate() around the whole batch.

Why a process per configuration: vLLM 0.32 frees an engine only by tearing its processes down,
so a fresh interpreter is the only clean slate. The `__main__` guard is required (vLLM spawns).
"""

import json
import random
import sys
import threading
import time

from worker_io import one_line, write_json_atomic  # sibling module (this script's dir)


class RssSampler(threading.Thread):
    """Peak of the summed RSS of this process and its descendants (vLLM's engine core and
    worker), sampled every `interval` s. RSS counts shared pages once per process."""

    def __init__(self, interval):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.interval, self.peak, self._stop = psutil, interval, 0, threading.Event()
        self.me = psutil.Process()

    def sample(self):
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:  # a process that exited between listing and reading
                pass
        self.peak = max(self.peak, total)
        return total

    def reset(self):
        self.peak = 0
        self.sample()

    def run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self):
        self._stop.set()


def run_batch(llm, params, pool, prompt, batch, rng):
    """One timed batch: `batch` requests of `prompt` random token ids each."""
    prompts = [{"prompt_token_ids": [rng.choice(pool) for _ in range(prompt)]} for _ in range(batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft, tpot, gen, cached = [], [], [], 0
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        if m is None or not m.first_token_ts:
            raise RuntimeError(
                "vLLM returned no request metrics (RequestOutput.metrics): engine started with disable_log_stats=True?"
            )
        ttft.append(m.first_token_latency)
        tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1) if n > 1 else None)
        gen.append(n)
        cached += o.num_cached_tokens or 0
    return {"wall_s": wall, "ttft_s": ttft, "tpot_s": tpot, "gen_tokens": gen, "cached_tokens": cached}


def main(argv):
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    out = argv[2]
    result: dict = {"ok": False, "error": None, "tests": []}
    write_json_atomic(out, result)
    sampler = RssSampler(job.get("rss_interval_s", 0.25))
    sampler.start()
    try:
        import torch
        from vllm import LLM, SamplingParams, __version__

        result["vllm_version"], result["torch_version"] = __version__, torch.__version__
        t0 = time.perf_counter()
        llm = LLM(model=job["model"], seed=job.get("seed", 0), **job["engine_kwargs"], disable_log_stats=False)
        result["load_s"] = time.perf_counter() - t0
        tok = llm.get_tokenizer()
        special = set(tok.all_special_ids)
        pool = [i for i in range(len(tok)) if i not in special]
        result["vocab"] = len(pool)
        rng = random.Random(job.get("seed", 0))
        for prompt, gen, batch in job["tests"]:
            entry = {"prompt": prompt, "gen": gen, "batch": batch, "error": None, "reps": [], "peak_rss_bytes": None}
            # ignore_eos: every request generates exactly `gen` tokens; greedy, nothing detokenized
            params = SamplingParams(max_tokens=gen, ignore_eos=True, temperature=0.0, detokenize=False)
            print(f"bench_worker: test prompt={prompt} gen={gen} batch={batch}", flush=True)
            sampler.reset()
            try:
                for _ in range(job["warmup"]):
                    run_batch(llm, params, pool, prompt, batch, rng)
                for _ in range(job["repetitions"]):
                    entry["reps"].append(run_batch(llm, params, pool, prompt, batch, rng))
            except Exception as exc:  # this test fails; the engine may still run the next ones
                import traceback

                traceback.print_exc()
                entry["error"] = one_line(exc)
            sampler.sample()
            entry["peak_rss_bytes"] = sampler.peak
            result["tests"].append(entry)
            write_json_atomic(out, result)
        result["ok"] = True
    except Exception as exc:  # the engine did not start (or died): reported to the parent in one line
        import traceback

        traceback.print_exc()
        result["error"] = one_line(exc)
    finally:
        sampler.stop()
        write_json_atomic(out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
