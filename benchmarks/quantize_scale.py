#!/usr/bin/env python3
"""Quantizer at 8B scale: the recipes users run, on a Llama-3.1-8B-shaped checkpoint, beside the I/O floor.

Run: nice .venv/bin/python benchmarks/quantize_scale.py [--model DIR | --build DIR] [--keep]
         [--recipes cw-mse-lp cw-minmax g32-minmax g128-mse] [--before SRC] [--out docs/benchmarks-quantize-8b.json]
--build DIR (default: a temp dir beside the cache) writes a random bf16 checkpoint with Llama-3.1-8B's
tensor shapes and config (8.03B parameters, 16.06 GB in 4 shards; numpy, one tensor at a time) and
deletes it at the end unless --keep; --model DIR reuses one. Recipes, each its own process, one after
the other (wall time from start to exit, imports included; peak RSS = wait4's ru_maxrss):
  cw-mse-lp   scripts/quantize_vllm_models.py MODEL --scheme channelwise   (the learning-path command)
  cw-minmax   python -m arm_int4 quantize MODEL --scheme channelwise --method minmax
  g32-minmax  python -m arm_int4 quantize MODEL --scheme groupwise --groupsize 32 --method minmax
  g128-mse    python -m arm_int4 quantize MODEL --scheme groupwise --groupsize 128 --method mse
with the engine's defaults (--jobs: the CPUs the process may use). The floor (read every input
shard, write a file of the first recipe's output size: benchmarks/quantize_speed_memory.py's FLOOR)
runs in the same session, after the first recipe and again after the last; the smaller is the floor. The input is
larger than what the page cache keeps beside a run here (16 GB of 24 GiB): reads are partly cold,
for the floor and the recipes alike. --before SRC runs the same recipes with the code in SRC (a
`git archive` of an older commit) too, alternating with ours per recipe.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from quantize_speed_memory import FLOOR, dir_bytes, settle, tensor_sizes  # noqa: E402

from arm_int4.models import cache_home  # noqa: E402

# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config.json): what the random checkpoint copies
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
SHARDS = 4

RECIPES = {
    "cw-mse-lp": ["scripts/quantize_vllm_models.py", "{model}", "--scheme", "channelwise"],
    "cw-minmax": ["-m", "arm_int4", "quantize", "{model}", "--scheme", "channelwise", "--method", "minmax"],
    "g32-minmax": [
        "-m",
        "arm_int4",
        "quantize",
        "{model}",
        "--scheme",
        "groupwise",
        "--groupsize",
        "32",
        "--method",
        "minmax",
    ],
    "g128-mse": [
        "-m",
        "arm_int4",
        "quantize",
        "{model}",
        "--scheme",
        "groupwise",
        "--groupsize",
        "128",
        "--method",
        "mse",
    ],
}

BUILD = """
import json, sys
import numpy as np
from pathlib import Path
from arm_int4.quantize.safetensors_io import ShardWriter, TensorInfo

out, config, shards = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
h, f, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
kv = config["num_key_value_heads"] * config["head_dim"]
names = [("model.embed_tokens.weight", (v, h))]
for i in range(n):
    p = f"model.layers.{i}."
    names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    attn = (("q", (h, h)), ("k", (kv, h)), ("v", (kv, h)), ("o", (h, h)))
    names += [(p + f"self_attn.{k}_proj.weight", s) for k, s in attn]
    names += [(p + f"mlp.{k}_proj.weight", s) for k, s in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))]
names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
total = sum(2 * int(np.prod(s)) for _, s in names)
groups, cur, size = [[]], 0, 0
for name, shape in names:  # contiguous shards of about total / shards bytes, as save_pretrained splits
    if size >= total / shards * (len(groups)) and len(groups) < shards:
        groups.append([])
    groups[-1].append((name, shape))
    size += 2 * int(np.prod(shape))
rng = np.random.default_rng(0)
weight_map = {}
for k, group in enumerate(groups):
    fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
    w = ShardWriter(out / fname, [TensorInfo(nm, "BF16", s) for nm, s in group])
    for nm, shape in group:
        if len(shape) == 1:
            x = np.ones(shape, dtype=np.float32)
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02
        w.write(nm, (x.view(np.uint32) >> 16).astype(np.uint16), bf16_bits=True)  # bf16 by truncation
        weight_map[nm] = fname
    w.close()
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
(out / "config.json").write_text(json.dumps(config, indent=2))
"""


def build(model: Path) -> None:
    model.mkdir(parents=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-c", BUILD, str(model), json.dumps(CONFIG), str(SHARDS)], check=True, cwd=REPO)
    print(f"built {model} ({dir_bytes(model) / 1e9:.2f} GB) in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def timed(argv, cwd: Path, env=None) -> dict:
    """quantize_speed_memory.timed with the output in files: a 20-minute run's progress bar would
    fill a pipe nobody reads until the end."""
    settle()
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.time()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=cwd, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{stderr[-2000:]}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_avg_1min": round(load, 2),
        "stdout": stdout.strip().splitlines()[-4:],
    }


def floor(model: Path, work: Path, out_bytes: int) -> dict:
    dst = work / "floor"
    files = map(str, sorted(model.glob("*.safetensors")))
    r = timed([sys.executable, "-c", FLOOR, *files, str(dst), str(out_bytes)], cwd=work)
    dst.unlink()
    r["io_seconds"] = round(float(r.pop("stdout")[-1]), 2)
    return r


def run_recipe(name: str, model: Path, work: Path, src: Path) -> dict:
    out = work / "out"
    argv = [a.format(model=model) for a in RECIPES[name]]
    if name == "cw-mse-lp":  # the learning-path script names its output in the cwd
        argv[0] = str(src / argv[0])
    else:
        argv += ["--output", str(out)]
    r = timed([sys.executable, *argv], cwd=work, env={"PYTHONPATH": str(src)})
    written = out if out.exists() else next(work.glob("*-w4a8dyn-*"))
    r["output_bytes"] = dir_bytes(written)
    shutil.rmtree(written)
    return r


def cpu_facts() -> dict:
    flags, model = set(), platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return {"model": model, "cpus": len(os.sched_getaffinity(0)), "flags": [f for f in wanted if f in flags]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="reuse this Llama-3.1-8B-shaped checkpoint (kept)")
    ap.add_argument("--build", help="build the random checkpoint here (default: a temp dir in the cache)")
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoint")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--before", help="a source tree of older code (arm_int4/, scripts/) to run the recipes with too")
    ap.add_argument(
        "--before-recipes", nargs="+", choices=list(RECIPES), help="recipes run with --before (default: all)"
    )
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks-quantize-8b.json"))
    a = ap.parse_args()
    built = None
    if a.model:
        model = Path(a.model).resolve()
    else:
        base = Path(a.build) if a.build else Path(tempfile.mkdtemp(prefix="quantize-8b-", dir=cache_home()))
        model = built = base / "random-llama-3.1-8b-shape"
        if not (model / "config.json").exists():
            build(model)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_facts(),
        "command": "benchmarks/quantize_scale.py " + " ".join(sys.argv[1:]),
        "model": "random bf16 checkpoint, Llama-3.1-8B shapes and config",
        "input_bytes": dir_bytes(model),
        "largest_tensor_bytes": max(tensor_sizes(model)),
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix=".quantize-scale-", dir=model.parent))
    try:
        floors: list = []
        for name in a.recipes:
            sources = [("after", REPO)]
            if a.before and name in (a.before_recipes or a.recipes):
                sources.insert(0, ("before", Path(a.before).resolve()))
            for label, src in sources:
                r = run_recipe(name, model, work, src)
                r |= {"recipe": name, "code": label, "mb_per_s": round(result["input_bytes"] / 1e6 / r["seconds"], 1)}
                result["runs"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "stdout"}), file=sys.stderr, flush=True)
                Path(a.out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a stop
                if not floors:  # the floor writes what the first recipe wrote; again at the end
                    floors.append(floor(model, work, r["output_bytes"]))
        floors.append(floor(model, work, result["runs"][0]["output_bytes"]))
        result["floor"] = {"seconds": min(f["seconds"] for f in floors), "samples": floors}
        for r in result["runs"]:
            r["vs_floor"] = round(r["seconds"] / result["floor"]["seconds"], 2)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if built and not a.keep:
            shutil.rmtree(built.parent if not a.build else built, ignore_errors=True)


if __name__ == "__main__":
    main()
