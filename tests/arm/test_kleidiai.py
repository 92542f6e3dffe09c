"""(a) The emulated Arm lane really runs KleidiAI, never PyTorch's reference fallback.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_kleidiai.py
"""

import signal

import pytest

from .arm_lane import KERNEL, describe, run_json

pytestmark = pytest.mark.requires_aarch64


def test_kleidiai_is_active(arm_results, host_results):
    probe = arm_results["probe"]
    assert probe["machine"] == "aarch64", probe
    assert probe["has_ops"], f"torch {probe['torch']} lacks _dyn_quant_pack_4bit_weight/_dyn_quant_matmul_4bit"
    assert probe["kleidiai"], (
        f"torch.backends.kleidiai.is_available() is False in the emulated torch {probe['torch']}: "
        "the Arm lane would only test the reference fallback. Use an aarch64 torch built with KleidiAI."
    )
    # Built-in is not enough: the weights must have gone through KleidiAI's packing. Its layout
    # is int4 (uint8 bytes, ~in*out/2 + scales + bias); the reference path keeps a float32
    # buffer (what the x86 host produces for the very same call).
    for arm, host in zip(arm_results["matmul"], host_results["matmul"], strict=False):
        in_out = arm["in_features"] * arm["out_features"]
        assert arm["packed"]["dtype"] == "uint8" and arm["packed"]["bytes"] < in_out, (arm["packed"], arm)
        assert host["packed"]["dtype"] == "float32" and host["packed"]["bytes"] >= 2 * in_out, host["packed"]


def test_without_dotprod_the_kleidiai_kernel_is_not_taken(arm_python, arm_results):
    """qemu's cortex-a72 (Armv8.0: no dotprod, no i8mm) must not run what -cpu max ran.

    Either the emulated CPU rejects the KleidiAI SDOT instructions (SIGILL: torch 2.13.0 calls
    the dotprod kernel without checking the CPU), or torch falls back to its reference packing.
    Both show that under -cpu max the dotprod/i8mm kernels really execute."""
    proc, data = run_json([arm_python, KERNEL, "smoke"], env={"ARM_INT4_QEMU_CPU": "cortex-a72"})
    if proc.returncode == -signal.SIGILL:
        return
    assert data is not None, "cortex-a72 run failed other than by SIGILL: " + describe(proc)
    max_layout = arm_results["matmul"][0]["packed"]  # channelwise float32 M=1, same as smoke
    assert data["smoke"]["packed"] != max_layout, (
        "cortex-a72 (no dotprod/i8mm) ran the same KleidiAI packing as -cpu max without faulting: "
        "the emulated CPU model does not gate the instructions, so the lane proves nothing"
    )
