"""(b') Checkpoints written by our quantizer, through vLLM's packing and KleidiAI, on emulated Arm.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_our_checkpoints.py -m requires_aarch64

The stream engine quantizes the tiny random Llama in every learning-path configuration; two
layers of each (q_proj 256x256 and down_proj 256x512) are exported as plain tensors and run, in
one emulated process, through int4_kernel.vllm_pack / vllm_apply (vLLM 0.32's code) for M=1 and
M=8 with bf16 activations, as vLLM serves a bf16 model. Same thresholds as test_int4_matmul.py:
the reference is the checkpoint's own q * scale, so only the kernel's int8 activation
quantization separates them (38 dB), and Arm agrees with the x86 host within 2 bf16 ulps.
"""

import pytest

from .conftest import CHECKPOINT_CONFIGS, CHECKPOINT_LAYERS
from .test_int4_matmul import MIN_SQNR_DB, agree_tolerance

pytestmark = pytest.mark.requires_aarch64


def test_our_checkpoints_on_kleidiai_match_reference_and_x86(arm_results, host_results):
    arm, host = arm_results, host_results
    assert arm["probe"]["kleidiai"] and arm["probe"]["machine"] == "aarch64", arm["probe"]
    assert len(arm["checkpoint"]) == len(CHECKPOINT_CONFIGS) * len(CHECKPOINT_LAYERS) * 2
    for a, h in zip(arm["checkpoint"], host["checkpoint"], strict=True):
        where = f"{a['config']} {a['name']} M={a['m']}"
        assert "error" not in a, f"{where}: {a.get('error')}"
        assert a["sqnr_db"] >= MIN_SQNR_DB, f"{where}: Arm SQNR {a['sqnr_db']:.1f} dB"
        assert h["sqnr_db"] >= MIN_SQNR_DB, f"{where}: x86 SQNR {h['sqnr_db']:.1f} dB"
        diff = max(abs(x - y) for x, y in zip(a["out"], h["out"], strict=False))
        assert diff <= agree_tolerance("bfloat16", h["out"]), f"{where}: Arm vs x86 differ by {diff:.3g}"
