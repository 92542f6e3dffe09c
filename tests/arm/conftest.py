"""The Arm lane: tests run on the host and execute code in the emulated aarch64 Python.

scripts/arm_emulation.sh prepares that Python (qemu-user + an arm64 rootfs + aarch64 torch) and
prints its wrapper. Without it these tests skip, unless ARM_INT4_REQUIRE_ARM=1 (the lane runner's
setting), which turns the skip into a failure. Each emulated process pays 15-25 s to import torch,
so results are computed once per session and shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LEARNING_PATH_CONFIGS, LEARNING_PATH_IDS

from .arm_lane import KERNEL, REPO, describe, run_json


def _unprepared(reason: str):
    msg = f"{reason} (the Arm lane needs scripts/arm_emulation.sh to have run; see tests/arm/README.md)"
    if os.environ.get("ARM_INT4_REQUIRE_ARM") == "1":
        pytest.fail(f"ARM_INT4_REQUIRE_ARM=1 and {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def arm_python() -> Path:
    """The wrapper that runs the emulated aarch64 python3.11 (path logic lives in the script)."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "arm_emulation.sh"), "--print"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        _unprepared("the aarch64 emulation is not prepared: " + proc.stderr.strip())
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def host_python() -> str:
    """The host interpreter, which must have torch (it runs PyTorch's x86 reference path)."""
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
    if proc.returncode != 0:
        _unprepared(f"host torch is missing in {sys.executable}")
    return sys.executable


# Layers our quantizer writes, exported as plain tensors for int4_kernel.py: two layers (q_proj
# 256x256, down_proj 256x512) of the tiny Llama in every learning-path configuration
# (test_our_checkpoints.py), and the q_proj of a g32 Llama with q/k/v biases (test_bias_guard.py).
CHECKPOINT_CONFIGS = LEARNING_PATH_CONFIGS
CHECKPOINT_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
BIAS_LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="session")
def kernel_inputs(tiny_llama, tmp_path_factory) -> dict:
    """{"checkpoint": layers.pt, "bias": layer.pt, "biased_g32": checkpoint dir}."""
    import torch
    from safetensors import safe_open

    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize
    from arm_int4.synthetic import build_random_llama

    root = tmp_path_factory.mktemp("arm-kernel-inputs")
    layers = []
    for (scheme, method, g), label in zip(CHECKPOINT_CONFIGS, LEARNING_PATH_IDS, strict=True):
        opts = QuantizeOptions(
            model=str(tiny_llama), output=str(root / label), scheme=scheme, method=method, groupsize=g or 32
        )
        with safe_open(str(quantize(opts).output / "model.safetensors"), "pt") as st:
            for name in CHECKPOINT_LAYERS:
                q = st.get_tensor(f"{name}.weight")
                scale = st.get_tensor(f"{name}.weight_scale")
                layers.append({"name": name, "config": label, "q": q, "scale": scale, "group": g or q.shape[1]})
    torch.save(layers, root / "layers.pt")

    model = build_random_llama(root / "qwen2-like", "tiny", seed=1, attention_bias=True)
    biased = quantize(
        QuantizeOptions(model=str(model), output=str(root / "g32"), scheme="groupwise", method="minmax", groupsize=32)
    ).output
    with safe_open(str(biased / "model.safetensors"), "pt") as st:
        layer = {k: st.get_tensor(f"{BIAS_LAYER}.{t}") for k, t in (("q", "weight"), ("scale", "weight_scale"))}
    # random init leaves biases at 0; give them the magnitude real Qwen2 q biases have (~1)
    layer["bias"] = torch.linspace(-2, 2, layer["q"].shape[0]).to(torch.bfloat16)
    torch.save(layer, root / "layer.pt")
    return {"checkpoint": root / "layers.pt", "bias": root / "layer.pt", "biased_g32": biased}


def _kernel_args(inputs: dict) -> list[str]:
    return ["all", f"checkpoint={inputs['checkpoint']}", f"bias={inputs['bias']}"]


@pytest.fixture(scope="session")
def arm_results(arm_python, kernel_inputs) -> dict:
    """int4_kernel.py on emulated aarch64 (-cpu max: dotprod + i8mm -> KleidiAI kernels): the
    MATMUL and DEFECT cases, our checkpoints' layers and the biased layer, in one process."""
    proc, data = run_json([arm_python, KERNEL, *_kernel_args(kernel_inputs)])
    assert data is not None, "the emulated run failed: " + describe(proc)
    return data


@pytest.fixture(scope="session")
def host_results(host_python, kernel_inputs) -> dict:
    """The same on the x86 host (PyTorch's reference implementation of the ops)."""
    proc, data = run_json([host_python, KERNEL, *_kernel_args(kernel_inputs)])
    assert data is not None, "the host run failed: " + describe(proc)
    return data


@pytest.fixture(scope="session")
def engine_run(tiny_llama, tmp_path_factory, arm_python):
    """The lane's main vLLM job (test_vllm_engine.py): every engine_models checkpoint in one emulated
    process on qemu's default CPU model; (data, label -> result, label -> fp32 reference dir, prompt
    ids). data["checkpoints"] maps each label to its checkpoint (test_neoverse_n1.py reruns one)."""
    from transformers import AutoTokenizer

    from . import engine_job as job
    from . import engine_models as em

    root = tmp_path_factory.mktemp("arm-engine")
    job.seed_model_info_cache()
    ckpts = em.build(root, tiny_llama)
    ids = AutoTokenizer.from_pretrained(str(tiny_llama))(job.PROMPT)["input_ids"]
    models = [{"label": k, "path": str(v), "dtype": None} for k, v in ckpts.items() if k not in job.W4A16]
    models.append({"label": job.CONTROL, "path": str(ckpts["bias-g32"]), "dtype": "bfloat16"})
    # float32 on the i8mm CPU, what test_neoverse_n1.py compares N1's run with
    models.append({"label": "llama-channelwise-fp32", "path": str(ckpts["llama-channelwise"]), "dtype": "float32"})
    # last: an engine that fails mid-forward must not disturb the others
    models += [{"label": k, "path": str(ckpts[k]), "dtype": None, "despite_plan": True} for k in job.W4A16]
    data, results = job.run(arm_python, root, ids, models)
    data["checkpoints"] = {k: str(v) for k, v in ckpts.items()}
    refs = {k: em.dequantized(p, root / f"ref-{k}") for k, p in ckpts.items() if k not in job.W4A16}
    refs[job.CONTROL] = refs["bias-g32"]
    refs["llama-channelwise-fp32"] = refs["llama-channelwise"]
    return data, results, refs, ids
