"""Times llama.cpp (llama-cpp-python's C API) on a GGUF; started by arm_int4.llamacpp.

Run: $ARM_INT4_HOME/envs/llamacpp/bin/python arm_int4/workers/llamacpp_worker.py JOB.json
(standalone: imports only its stdlib-only sibling worker_io.py; runs in the llama.cpp env that scripts/setup.sh builds
with ARM_INT4_LLAMACPP=1).
JOB.json = {"gguf": path, "threads": int, "tests": [[prompt, gen, batch], ...], "warmup": int,
            "repetitions": int, "seed": int}
        or {"quantize": {"src": path, "dst": path, "ftype": "Q4_1"}, "threads": int}
Writes RESULT.json (rewritten after each test, so a crash keeps finished tests), in the format
of bench_worker.py, plus what the GGUF says about itself:
{"ok", "error", "load_s", "llama_cpp_version", "system_info", "desc", "model_bytes", "n_params",
 "kv_bytes_per_token", "vocab",
 "tests": [{"prompt", "gen", "batch", "error", "peak_rss_bytes",
            "reps": [{"wall_s", "ttft_s", "tpot_s", "gen_tokens", "cached_tokens", "perf"}]}]}

Method (the same as bench_worker's, in llama.cpp terms): one context holds `batch` parallel
sequences (n_seq_max = batch, a KV cell range per sequence) — the continuous batching that
llama.cpp's own server does with --parallel. A timed batch: every sequence gets `prompt` random
token ids from the vocabulary's normal tokens (fresh each time, nothing tokenized), all prompts go
through one llama_decode (prefill), then `gen - 1` decode steps each feed one token per sequence
in a single llama_decode. The next token is the greedy argmax of the logits (no EOS stop: exactly
`gen` tokens). Times are time.perf_counter() around llama_decode + reading logits + argmax:
TTFT = prefill step, TPOT = the mean decode step. llama.cpp's own counters (llama_perf_context:
t_p_eval_ms, t_eval_ms) are kept per repetition as a cross-check; they count a multi-token
decode step as "prompt eval", so they only separate prefill from decode at batch 1.
"""

import ctypes
import json
import random
import sys
import time

from worker_io import one_line, peak_rss_bytes, write_json_atomic  # sibling module (this script's dir)


class Engine:
    """A model and one context with `batch` sequences, through llama.cpp's C API."""

    def __init__(self, llama_cpp, model, threads, batch, ctx_per_seq, prompt):
        import numpy as np

        self.L, self.np, self.model, self.batch = llama_cpp, np, model, batch
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = batch * ctx_per_seq
        p.n_seq_max = batch
        p.n_batch = max(batch * prompt, batch)  # the whole prefill in one llama_decode
        p.n_ubatch = min(512, p.n_batch)  # llama.cpp's default micro-batch
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = False  # independent prompts: a KV range per sequence
        self.ctx = llama_cpp.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_ctx={p.n_ctx}, n_seq_max={batch})")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.cap = p.n_batch
        self.lb = llama_cpp.llama_batch_init(self.cap, 0, 1)

    def close(self):
        self.L.llama_batch_free(self.lb)
        self.L.llama_free(self.ctx)

    def _decode(self, items):
        """items: (token, pos, seq, wants_logits). -> greedy next token per item that wants logits."""
        lb, L = self.lb, self.L
        for i, (tok, pos, seq, out) in enumerate(items):
            lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.seq_id[i][0], lb.logits[i] = tok, pos, 1, seq, out
        lb.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, lb)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({len(items)} tokens)")
        nxt = []
        for i, (_, _, _, out) in enumerate(items):
            if out:
                logits = self.np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                nxt.append(int(logits.argmax()))
        return nxt

    def run_batch(self, prompt, gen, pool, rng):
        L, b = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        L.llama_perf_context_reset(self.ctx)
        prompts = [[rng.choice(pool) for _ in range(prompt)] for _ in range(b)]
        items = [(t, j, s, j == prompt - 1) for s in range(b) for j, t in enumerate(prompts[s])]
        t0 = time.perf_counter()
        toks = self._decode(items)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for k in range(gen - 1):
            toks = self._decode([(toks[s], prompt + k, s, True) for s in range(b)])
        t2 = time.perf_counter()
        perf = L.llama_perf_context(self.ctx)
        tpot = (t2 - t1) / (gen - 1) if gen > 1 else None
        return {
            "wall_s": t2 - t0,
            "ttft_s": [ttft] * b,
            "tpot_s": [tpot] * b,
            "gen_tokens": [gen] * b,
            "cached_tokens": 0,
            "perf": {
                "t_p_eval_ms": perf.t_p_eval_ms,
                "t_eval_ms": perf.t_eval_ms,
                "n_p_eval": perf.n_p_eval,
                "n_eval": perf.n_eval,
            },
        }


def _quantize(llama_cpp, job, result):
    q = job["quantize"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q['ftype']}")
    params.nthread = job.get("threads", 0)
    rc = llama_cpp.llama_model_quantize(q["src"].encode(), q["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def _describe(L, model, result):
    buf = ctypes.create_string_buffer(256)
    L.llama_model_desc(model, buf, len(buf))
    n_layer, n_embd = L.llama_model_n_layer(model), L.llama_model_n_embd(model)
    n_head, n_head_kv = L.llama_model_n_head(model), L.llama_model_n_head_kv(model)
    result.update(
        desc=buf.value.decode(errors="replace"),
        model_bytes=L.llama_model_size(model),
        n_params=L.llama_model_n_params(model),
        # K and V, f16 (llama.cpp's default cache type), per layer, per token
        kv_bytes_per_token=2 * n_layer * n_head_kv * (n_embd // max(1, n_head)) * 2,
    )


def main(argv):
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    out = argv[2]
    result: dict = {"ok": False, "error": None, "tests": []}
    write_json_atomic(out, result)
    engine = model = None
    try:
        import llama_cpp as L

        result["llama_cpp_version"] = L.__version__
        L.llama_backend_init()
        result["system_info"] = L.llama_print_system_info().decode(errors="replace")
        if job.get("quantize"):
            _quantize(L, job, result)
            result["ok"] = True
            return 0
        mp = L.llama_model_default_params()
        t0 = time.perf_counter()
        model = L.llama_model_load_from_file(job["gguf"].encode(), mp)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {job['gguf']}")
        result["load_s"] = time.perf_counter() - t0
        _describe(L, model, result)
        vocab = L.llama_model_get_vocab(model)
        # normal tokens only (attribute bit LLAMA_TOKEN_ATTR_NORMAL): bench_worker skips special ids too
        pool = [
            i
            for i in range(L.llama_vocab_n_tokens(vocab))
            if L.llama_vocab_get_attr(vocab, i) & L.LLAMA_TOKEN_ATTR_NORMAL and not L.llama_vocab_is_eog(vocab, i)
        ]
        result["vocab"] = len(pool)
        rng = random.Random(job.get("seed", 0))
        for prompt, gen, batch in job["tests"]:
            entry = {"prompt": prompt, "gen": gen, "batch": batch, "error": None, "reps": [], "peak_rss_bytes": None}
            print(f"llamacpp_worker: test prompt={prompt} gen={gen} batch={batch}", flush=True)
            try:
                engine = Engine(L, model, job["threads"], batch, -(-(prompt + gen) // 256) * 256, prompt)
                for _ in range(job["warmup"]):
                    engine.run_batch(prompt, gen, pool, rng)
                for _ in range(job["repetitions"]):
                    entry["reps"].append(engine.run_batch(prompt, gen, pool, rng))
            except Exception as exc:  # this test fails; the next may still run
                import traceback

                traceback.print_exc()
                entry["error"] = one_line(exc)
            finally:
                if engine is not None:
                    engine.close()
                    engine = None
            entry["peak_rss_bytes"] = peak_rss_bytes()
            result["tests"].append(entry)
            write_json_atomic(out, result)
        result["ok"] = True
    except Exception as exc:  # the model did not load (or llama_cpp is missing): one line to the parent
        import traceback

        traceback.print_exc()
        result["error"] = one_line(exc)
    finally:
        if model:
            import llama_cpp as L

            L.llama_model_free(model)
        write_json_atomic(out, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
