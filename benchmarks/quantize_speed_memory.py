#!/usr/bin/env python3
"""Quantizer benchmark: the learning path's flow vs `arm-int4 quantize --engine stream`.

Run: .venv/bin/python benchmarks/quantize_speed_memory.py [--shape 200m] [--methods minmax mse]
     [--out docs/benchmarks-quantize.json]
(a) learning path: load in transformers, cast to fp32, llmcompressor oneshot, save
    (arm_int4/workers/llmc_worker.py with cast_fp32, in the quantization environment);
(b) stream engine: tensor by tensor from the safetensors shards.
Each runs as its own process, one after the other, on the same random Llama (bf16 on disk);
wall time and that process's peak RSS (wait4's ru_maxrss) are recorded, with the machine load.
This process stays small (no torch): a forked child's ru_maxrss includes the parent's image
from before exec, so the model is built in a subprocess too.
"""

import argparse
import json
import os
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


def timed(argv, env=None) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{err[-2000:]}")
    return {"seconds": round(time.time() - t0, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "load_avg_1min": os.getloadavg()[0]}


def largest_tensor_bytes(model: Path) -> int:
    from arm_int4.quantize.safetensors_io import ShardReader

    sizes = []
    for f in model.glob("*.safetensors"):
        with ShardReader(f) as r:
            sizes += [t.nbytes for t in r.tensors.values()]
    return max(sizes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="200m", choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=["minmax", "mse"])
    ap.add_argument("--out", default=None, help="default: docs/benchmarks-quantize-{shape}.json")
    a = ap.parse_args()
    a.out = a.out or str(REPO / "docs" / f"benchmarks-quantize-{a.shape}.json")
    model = cache_home() / "bench-models" / f"random-llama-{a.shape}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-c", "import sys; from arm_int4.synthetic import build_random_llama; "
                        "build_random_llama(sys.argv[1], sys.argv[2], seed=0)", str(model), a.shape],
                       check=True, cwd=REPO)
    largest = largest_tensor_bytes(model)
    rows = []
    for method in a.methods:
        scheme = Scheme.from_options("w4a8", "channelwise", method, 32)
        with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps({
                "model": str(model), "output": f"{tmp}/lp", "weights": scheme.weight_args(),
                "input_activations": scheme.input_args(), "ignore": ["lm_head"], "algorithm": "rtn",
                "cast_fp32": True}))
            lp = timed([str(quant_python()), str(REPO / "arm_int4/workers/llmc_worker.py"), str(job)])
            st = timed([sys.executable, "-m", "arm_int4", "quantize", str(model), "--method", method,
                        "--output", f"{tmp}/stream"])
        row = {"method": method, "scheme": "channelwise", "learning_path": lp, "stream": st,
               "speedup": round(lp["seconds"] / st["seconds"], 2),
               "stream_rss_goal_mib": round((2 * largest + 2**30) / 2**20, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    params = SHAPES[a.shape].parameters
    result = {"model": f"random Llama {a.shape} ({params / 1e6:.0f}M parameters, bf16)",
              "largest_tensor_mib": round(largest / 2**20, 1), "cpus": os.cpu_count(), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
