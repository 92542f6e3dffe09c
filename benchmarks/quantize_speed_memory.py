#!/usr/bin/env python3
"""Quantizer benchmark: the learning path's flow vs `arm-int4 quantize` (stream engine) vs the I/O floor.

Run: .venv/bin/python benchmarks/quantize_speed_memory.py [--shapes 200m 1b] [--methods minmax mse]
     [--jobs 2] [--repeat 3] [--observer-precision fp32|weight] [--out docs/benchmarks-quantize.json]
Per random Llama (arm_int4.synthetic, bf16 on disk) and observer, channelwise:
(a) learning path: load in transformers, cast to fp32, llmcompressor oneshot, save
    (arm_int4/workers/llmc_worker.py with cast_fp32, in the quantization environment);
(b) stream: `python -m arm_int4 quantize MODEL --method M --observer-precision P --jobs N` (P fp32 by
    default, the learning path's precision: same int values and scales as (a); weight: the default
    of `arm-int4 quantize`);
(c) floor: read every input shard and write a file of the stream output's size (plain Python
    readinto/write in 16 MiB blocks, no torch), once per shape: the least any quantizer must do.
Each runs as its own process, one after the other; wall time (process start to exit, imports
included) and that process's peak RSS (wait4's ru_maxrss) are recorded, with the 1-minute load
average before each. The input stays in the page cache across runs (warm reads for all three).
Before every timed process the previous output is deleted, dirty pages are flushed (sync) and the
disk is left 2 s to settle, so no run pays for an earlier one's writeback. Writing into the page
cache is the noisiest part here (on a VM, memory the host took back costs ~1 s/GB on first touch,
and that varies minute to minute): (b) and (c) run `--repeat` times, alternating, and the medians
are compared; (a) runs once (it is the long one; its I/O is a small share of its time).
This process stays small (no torch): a forked child's ru_maxrss includes the parent's image
from before exec, so the model is built in a subprocess too.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arm_int4.models import cache_home  # noqa: E402
from arm_int4.quantize.llmc import quant_python  # noqa: E402
from arm_int4.schemes import Scheme  # noqa: E402
from arm_int4.synthetic import SHAPES  # noqa: E402

FLOOR = """
import sys, time
src, dst, out_bytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(16 << 20)
t0 = time.perf_counter()
for s in src:
    with open(s, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(dst, "wb", buffering=0) as f:
    left = out_bytes
    while left:
        left -= f.write(memoryview(buf)[:min(left, len(buf))])
    f.flush()
print(time.perf_counter() - t0)
"""


def settle() -> None:
    os.sync()
    time.sleep(2)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def timed(argv, env=None) -> dict:
    settle()
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{err[-2000:]}")
    return {
        "seconds": round(time.time() - t0, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_avg_1min": round(load, 2),
        "stdout": out.strip().splitlines()[-4:],
    }


def tensor_sizes(model: Path) -> list:
    from arm_int4.quantize.safetensors_io import ShardReader

    sizes = []
    for f in model.glob("*.safetensors"):
        with ShardReader(f) as r:
            sizes += [t.nbytes for t in r.tensors.values()]
    return sizes


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def bench_shape(shape: str, methods, jobs: int, repeat: int, precision: str = "fp32") -> dict:
    model = cache_home() / "bench-models" / f"random-llama-{shape}"
    if not (model / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from arm_int4.synthetic import build_random_llama; "
                "build_random_llama(sys.argv[1], sys.argv[2], seed=0)",
                str(model),
                shape,
            ],
            check=True,
            cwd=REPO,
        )
    largest = max(tensor_sizes(model))
    rows, floors = [], []
    for method in methods:
        scheme = Scheme.from_options("w4a8", "channelwise", method, 32)
        with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
            job = Path(tmp) / "job.json"
            job.write_text(
                json.dumps(
                    {
                        "model": str(model),
                        "output": f"{tmp}/lp",
                        "weights": scheme.weight_args(),
                        "input_activations": scheme.input_args(),
                        "ignore": ["lm_head"],
                        "algorithm": "rtn",
                        "cast_fp32": True,
                    }
                )
            )
            # the worker protocol: WORKER JOB.json RESULT.json (arm_int4/runner.py)
            worker = str(REPO / "arm_int4/workers/llmc_worker.py")
            lp = timed([str(quant_python()), worker, str(job), f"{tmp}/lp-result.json"])
            lp.pop("stdout")
            shutil.rmtree(f"{tmp}/lp")
            streams = []
            for _ in range(repeat):
                shutil.rmtree(f"{tmp}/stream", ignore_errors=True)
                streams.append(
                    timed(
                        [
                            sys.executable,
                            "-m",
                            "arm_int4",
                            "quantize",
                            str(model),
                            "--method",
                            method,
                            "--observer-precision",
                            precision,
                            "--jobs",
                            str(jobs),
                            "--output",
                            f"{tmp}/stream",
                        ],
                        env={"PYTHONPATH": str(REPO)},
                    )
                )
                if method == "minmax" or not floors:  # the floor beside each minmax run (its goal)
                    out_bytes = dir_bytes(Path(tmp) / "stream")
                    Path(f"{tmp}/floor").unlink(missing_ok=True)
                    floor = timed(
                        [
                            sys.executable,
                            "-c",
                            FLOOR,
                            *map(str, sorted(model.glob("*.safetensors"))),
                            f"{tmp}/floor",
                            str(out_bytes),
                        ]
                    )
                    floor["io_seconds"] = round(float(floor.pop("stdout")[-1]), 2)
                    floors.append(floor)
        st = {
            "seconds": round(median([x["seconds"] for x in streams]), 2),
            "peak_rss_mib": max(x["peak_rss_mib"] for x in streams),
            "samples": streams,  # each with its stdout: the engine's summary (time per phase)
        }
        floor_s = median([f["seconds"] for f in floors])
        row = {
            "shape": shape,
            "method": method,
            "scheme": "channelwise",
            "learning_path": lp,
            "stream": st,
            "speedup": round(lp["seconds"] / st["seconds"], 2),
            "stream_vs_floor": round(st["seconds"] / floor_s, 2),
            "stream_rss_bound_mib": round(jobs * (2 * largest + 2**30) / 2**20, 1),
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stream"} | {"stream_s": st["seconds"]}), flush=True)
    return {
        "shape": shape,
        "model": f"random Llama {shape} ({SHAPES[shape].parameters / 1e6:.0f}M parameters, bf16)",
        "input_mib": round(dir_bytes(model) / 2**20, 1),
        "largest_tensor_mib": round(largest / 2**20, 1),
        "floor": {"seconds": round(floor_s, 2), "samples": floors},
        "rows": rows,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["200m", "1b"], choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["minmax", "mse"])
    ap.add_argument("--jobs", type=int, default=2, help="stream engine --jobs")
    ap.add_argument(
        "--observer-precision",
        default="fp32",
        choices=("fp32", "weight"),
        help="stream engine's: fp32 (the learning path's scales, bit for bit) or weight (arm-int4 quantize's default)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of the stream engine and of the floor (medians)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks-quantize.json"))
    a = ap.parse_args()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "jobs": a.jobs,
        "observer_precision": a.observer_precision,
        "command": "benchmarks/quantize_speed_memory.py " + " ".join(sys.argv[1:]),
        "repeat": a.repeat,
        "shapes": [bench_shape(s, a.methods, a.jobs, a.repeat, a.observer_precision) for s in a.shapes],
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
