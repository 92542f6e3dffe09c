#!/usr/bin/env python3
"""One engine on every core vs N one-slice replicas behind vllm-router vs vLLM's data parallel (DP=N), timed
with `arm-int4 bench --server`'s client at 1, 4 and 16 concurrent clients, the same prompts for each.

Run: PYTHONPATH=. .venv/bin/python benchmarks/scaleout.py [MODEL] [-p 128] [-n 64] [-b 1 4 16] [-r 3]
         [--replicas 2] [--json docs/benchmarks-scaleout.json] [-- VLLM_ARG ...]

Each setup is `arm-int4 serve` as a user runs it (a subprocess, its plan printed in its log), stopped with
SIGINT before the next starts:
- one:      `serve MODEL --reserve 0`            one engine, its OMP threads bound to every usable CPU
- replicas: `serve MODEL --replicas N`           N engines, one slice of the CPUs each, behind vllm-router
- dp:       `serve MODEL -- --data-parallel-size N`  vLLM's own DP: one API server, N engine cores
All get the same `--max-model-len` and `--kv-cache-gib` (so the comparison is not about memory), and the
words after `--` (e.g. --enforce-eager). Output tok/s = generated tokens / wall time of a round of B
concurrent streamed requests (mean over -r rounds after one untimed warm-up round); TTFT p50/p99 over every
request of every round (bench_server.run_server). The 1-minute load average is recorded before and after
each setup: on a shared machine, neighbours' load falls unevenly on the setups.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arm_int4 import bench_server, hardware  # noqa: E402
from arm_int4.workload import Workload  # noqa: E402


def free_base(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        ok = True
        for i in range(n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", base + i))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def serve(model: str, words: list, vllm: list, log: Path, ready_text: str, timeout: float = 900.0):
    out = open(log, "wb")  # noqa: SIM115 (closed in stop)
    proc = subprocess.Popen(
        [sys.executable, "-m", "arm_int4", "serve", *words, model, "--", *vllm],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    t0 = time.monotonic()
    while ready_text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            stop(proc, out)
            raise SystemExit(f"serve {' '.join(words)} did not become ready: see {log}")
        time.sleep(1)
    return proc, out, time.monotonic() - t0


def stop(proc, out) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out.close()


def main() -> int:
    argv = sys.argv[1:]
    vllm = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("-p", "--prompt", type=int, default=128)
    ap.add_argument("-n", "--gen", type=int, default=64)
    ap.add_argument("-b", "--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--setups", nargs="+", default=["one", "replicas", "dp"], choices=["one", "replicas", "dp"])
    ap.add_argument("--json", help="write every record and the load averages here")
    args = ap.parse_args(argv)
    n = args.replicas
    common = ["--max-model-len", str(args.max_model_len), "--kv-cache-gib", str(args.kv_cache_gib)]
    setups = {
        "one": (["--reserve", "0"], [], "arm-int4 serve: ready in", 1),
        "replicas": (["--replicas", str(n)], [], "through vllm-router", n + 2),
        "dp": ([], ["--data-parallel-size", str(n)], "arm-int4 serve: ready in", 1),
    }
    workload = Workload(
        prompts=(args.prompt,), gens=(args.gen,), batches=tuple(args.batch), repetitions=args.repetitions, warmup=1
    )
    logs = Path(tempfile.mkdtemp(prefix="arm-int4-scaleout-"))
    machine = hardware.detect()
    results = []
    for name in args.setups:
        words, extra, ready_text, ports = setups[name]
        base = free_base(ports)
        log = logs / f"{name}.log"
        load0 = os.getloadavg()[0]
        proc, out, ready_s = serve(args.model, [*words, *common, "--port", str(base)], [*vllm, *extra], log, ready_text)
        try:
            records = bench_server.run_server(f"http://127.0.0.1:{base}/v1", workload, progress=lambda m: None)
        finally:
            stop(proc, out)
        load1 = os.getloadavg()[0]
        print(f"{name}: ready in {ready_s:.0f} s, load {load0:.1f} -> {load1:.1f} (log {log})", file=sys.stderr)
        for r in records:
            results.append(
                {
                    "setup": name,
                    "batch": r.batch,
                    "output_tok_s": r.output_tok_s,
                    "output_tok_s_sd": r.output_tok_s_sd,
                    "ttft_ms_p50": r.ttft_ms_p50,
                    "ttft_ms_p99": r.ttft_ms_p99,
                    "tpot_ms_p50": r.tpot_ms_p50,
                    "error": r.error,
                    "load_before": load0,
                    "load_after": load1,
                    "ready_s": ready_s,
                }
            )
    print(
        f"\n{machine.cpu_name}, {machine.usable_cpus()} usable CPUs; {args.model}, prompt {args.prompt}, "
        f"{args.gen} tokens, {args.repetitions} rounds; vLLM args {' '.join(vllm) or '(none)'}\n"
    )
    print("| clients | setup | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | load 1 min (before → after) |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batch:
        for r in (x for x in results if x["batch"] == b):
            if r["error"]:
                print(f"| {b} | {r['setup']} | failed: {r['error']} | | | | |")
                continue
            print(
                f"| {b} | {r['setup']} | {r['output_tok_s']:.1f} ± {r['output_tok_s_sd']:.1f} | "
                f"{r['ttft_ms_p50']:.0f} | {r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.1f} | "
                f"{r['load_before']:.1f} → {r['load_after']:.1f} |"
            )
    if args.json:
        meta = {"cpu": machine.cpu_name, "usable_cpus": machine.usable_cpus(), "args": vars(args), "vllm_args": vllm}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
