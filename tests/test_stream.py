"""The stream engine's own pieces against what they replace: the config block against
compressed-tensors' ModelCompressor, the layer list read off tensor names against the meta-model
path, several jobs against one, verification from the written values, and its imports."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors import safe_open

from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize
from arm_int4.quantize.preflight import (
    named_linear_layers,
    plan_quantization,
    quantizable_layers,
    read_source_checkpoint,
)
from arm_int4.quantize.stream import quant_config_block, run_stream
from arm_int4.quantize.verify import VerifyError, verify_written
from arm_int4.schemes import Scheme

SCHEMES = [
    Scheme("w4a8", "channelwise", None, "mse"),
    Scheme("w4a8", "groupwise", 32, "minmax"),
    Scheme("w4a16", "groupwise", 128, "mse"),
    Scheme("w4a16", "channelwise", None, "minmax"),
]
IGNORES = [["lm_head"], [], ["lm_head", "re:.*down_proj$"], ["re:model\\.layers\\.1\\..*", "LlamaMLP"]]


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.preset}-{s.label}")
def test_config_block_equals_compressed_tensors(scheme, tiny_llama, tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    ck = read_source_checkpoint(tiny_llama)
    for ignore in IGNORES[:3]:
        plan = plan_quantization(ck, scheme, ignore, require_safetensors=True)
        qscheme = scheme.quantization_scheme()
        qscheme.format = scheme.format
        (tmp_path / "config.json").write_text("{}")
        ModelCompressor(
            quantization_config=QuantizationConfig(
                config_groups={"group_0": qscheme},
                format=scheme.format,
                quantization_status="compressed",
                ignore=ignore,
            )
        ).update_config(str(tmp_path))
        theirs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
        assert quant_config_block(plan) == theirs


@pytest.mark.parametrize("ignore", IGNORES, ids=str)
def test_layers_from_names_equal_the_meta_model(ignore, tiny_llama, smollm2):
    for model in (tiny_llama, smollm2):
        ck = read_source_checkpoint(model)
        fast = named_linear_layers(ck, ignore)
        assert fast is not None  # Llama: the transformers-free path applies
        assert fast.layers == quantizable_layers(model, ["Linear"], ignore).layers


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_stream_path_imports_no_transformers(method, tiny_llama, tmp_path):
    """`arm-int4 quantize` on a Llama: neither transformers nor compressed-tensors is imported
    (they cost ~5 s of start-up here), and min-max at the default fp32 precision (npmath) does not
    import torch either (~1 s)."""
    code = (
        "import sys; from arm_int4.cli import main; rc = main(sys.argv[1:]); "
        "print('LOADED', sorted(m for m in ('transformers', 'compressed_tensors', 'accelerate', 'torch') "
        "if m in sys.modules))"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "quantize",
            str(tiny_llama),
            "--output",
            str(tmp_path / "o"),
            "--method",
            method,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert ("LOADED []" if method == "minmax" else "LOADED ['torch']") in r.stdout, r.stdout


@pytest.mark.parametrize(("precision", "method"), [("fp32", "mse"), ("weight", "mse"), ("fp32", "minmax")])
def test_jobs_do_not_change_a_bit(precision, method, tiny_llama, tmp_path):
    outs = [
        quantize(
            QuantizeOptions(
                model=str(tiny_llama),
                output=str(tmp_path / f"j{j}"),
                scheme="groupwise",
                method=method,
                observer_precision=precision,
                jobs=j,
            )
        )
        for j in (1, 2, 3)
    ]
    ref = _tensors(outs[0].output)
    for r in outs[1:]:
        t = _tensors(r.output)
        assert sorted(t) == sorted(ref) and all(t[k].dtype == ref[k].dtype and torch.equal(t[k], ref[k]) for k in t)
    assert (outs[0].output / "config.json").read_text() == (outs[2].output / "config.json").read_text()
    s = outs[1].stream
    assert s.jobs == 2 and s.bytes_in == sum(p.stat().st_size for p in tiny_llama.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in tiny_llama.glob("*.safetensors")
    )
    # Peak RSS in a fresh process (this pytest process, and the vLLM engines earlier tests started
    # as its children, would count in getrusage here): the CLI's summary, against its own bound.
    from conftest import run_cli

    r = run_cli(
        "quantize",
        tiny_llama,
        "--scheme",
        "groupwise",
        "--method",
        method,
        "--jobs",
        "2",
        "--observer-precision",
        precision,
        "--output",
        tmp_path / "cli",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"peak RSS (\d+) MiB \(bound (\d+) MiB for 2 jobs\)", r.stdout)
    assert m and int(m[1]) <= int(m[2]), r.stdout


def test_verify_written_catches_what_a_reader_would(tiny_llama, tmp_path):
    """A missing layer, an out-of-range value and a truncated shard are refused without reading
    the tensors back."""
    import dataclasses

    ck = read_source_checkpoint(tiny_llama)
    plan = plan_quantization(ck, Scheme("w4a8", "channelwise", None, "minmax"), ["lm_head"], require_safetensors=True)
    out = tmp_path / "o"
    out.mkdir()
    stats = run_stream(plan, out, "weight", jobs=2, progress=False)
    assert verify_written(out, plan, stats).layers == 14
    first = stats.checks[0]
    for bad, msg in [
        (stats.checks[1:], "differ from the plan"),
        ([dataclasses.replace(first, qmax=9)] + stats.checks[1:], r"outside INT4"),
        ([dataclasses.replace(first, scales_ok=False)] + stats.checks[1:], "non-positive"),
    ]:
        with pytest.raises(VerifyError, match=msg):
            verify_written(out, plan, dataclasses.replace(stats, checks=bad))
    shard = out / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    with pytest.raises(VerifyError, match="bytes on disk"):
        verify_written(out, plan, stats)


def test_default_jobs_follow_the_cpus_the_process_may_use():
    """--jobs' default: the affinity (here pinned to one CPU in a child process) ∩ the cgroup's
    cpuset, capped by its quota; unpinned, every CPU of the affinity unless a cgroup quota is lower."""
    import os
    import subprocess
    import sys

    from arm_int4.quantize.stream import usable_cpus
    from arm_int4.sysfs import cgroup_cpu

    quota = cgroup_cpu("/")[1]
    mine = len(os.sched_getaffinity(0))
    assert usable_cpus() == (min(mine, max(1, int(quota))) if quota else mine)
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from arm_int4.quantize.stream import usable_cpus; print(usable_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
