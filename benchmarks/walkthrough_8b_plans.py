# .venv/bin/python benchmarks/walkthrough_8b_plans.py > /tmp/plans.md   (no network, ~10 s)
"""The plans docs/walkthrough-8b.md shows, computed by arm-int4 itself without any weights.

1. `serve` and `quantize --dry-run` of meta-llama/Llama-3.1-8B-Instruct through a hub on 127.0.0.1
   (tests/helpers/fake_hub.py) that serves only the model's config.json and a safetensors index
   (tests/fixtures/hub/llama-3.1-8b-instruct), planned for the recorded Graviton4 (c8g.16xlarge
   lscpu, tests/fixtures/machines/graviton4) with the memory given below.
2. `serve --dry-run` of the INT4 checkpoint `quantize` would write, as a header-only copy: the
   safetensors headers the stream engine's output_specs gives, the config write_quant_config
   writes, and data left as holes (sparse files: the plan reads headers, never tensor data).
Prints each command and its output as Markdown.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from fake_hub import FakeHub, Repo, llama_index  # noqa: E402

from arm_int4.hub import INDEX  # noqa: E402
from arm_int4.quantize.preflight import checkpoint_from_index, plan_quantization  # noqa: E402
from arm_int4.quantize.stream import output_specs, write_quant_config  # noqa: E402
from arm_int4.schemes import Scheme  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONFIG = REPO / "tests/fixtures/hub/llama-3.1-8b-instruct/config.json"
# c8g.16xlarge: 128 GiB (AWS's instance table); MemAvailable on a fresh instance is assumed, not recorded.
MEMINFO = "MemTotal:       134217728 kB\nMemAvailable:   130023424 kB\n"


def header_only_int4(dst: Path, config: dict, index: dict, scheme: Scheme) -> None:
    """An INT4 checkpoint's config.json, index and safetensors headers; tensor data left as holes."""
    ck = checkpoint_from_index(dst, config, index["weight_map"], index["metadata"]["total_size"])
    assert ck is not None
    plan = plan_quantization(ck, scheme, ["lm_head"], require_safetensors=True)
    dst.mkdir()
    weight_map, total = {}, 0
    for shard, tensors in ck.shards.items():
        specs = output_specs(tensors, plan, "weight")
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for s in specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            weight_map[s.name] = shard
            offset += s.nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst / shard, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no disk used, the size a real one has
        total += offset
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    write_quant_config(config, plan, dst)


def run(args: list, cwd: Path, env: dict) -> None:
    shown = " ".join(str(a).replace(str(cwd), ".") for a in args)
    r = subprocess.run(
        [sys.executable, "-m", "arm_int4", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )
    out = (r.stdout + ("\n" + r.stderr if r.stderr.strip() else "")).replace(str(cwd), ".")
    print(f"```text\n$ arm-int4 {shown}\n{out.rstrip()}\n```\n(exit {r.returncode})\n")


def main() -> None:
    config = json.loads(CONFIG.read_text())
    index = llama_index(config)
    work = Path(tempfile.mkdtemp(prefix="walkthrough-8b-"))
    try:
        g4 = work / "graviton4-c8g.16xlarge"
        g4.mkdir()
        shutil.copy(REPO / "tests/fixtures/machines/graviton4/lscpu.txt", g4 / "lscpu.txt")
        (g4 / "meminfo").write_text(MEMINFO)
        repo = Repo(files={"config.json": CONFIG.read_bytes(), INDEX: json.dumps(index).encode()})
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
        with FakeHub({MODEL: repo}) as hub:
            env = {**keep, "HF_HOME": str(work / "hf"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
            run(["serve", MODEL, "--dry-run", "--machine-dump", g4], work, env)
            run(["quantize", MODEL, "--dry-run", "--jobs", "64"], work, env)
            run(["quantize", MODEL, "--dry-run", "--jobs", "64", "--scheme", "groupwise"], work, env)
            weights = [p for p in hub.paths() if p.endswith(".safetensors")]
            print(f"hub requests: {len(hub.requests)}, of a .safetensors file: {len(weights)}\n")
        int4 = work / "Llama-3.1-8B-Instruct-w4a8dyn-mse-channelwise"
        header_only_int4(int4, config, index, Scheme("w4a8", "channelwise", None, "mse"))
        run(["serve", int4, "--dry-run", "--machine-dump", g4], work, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
