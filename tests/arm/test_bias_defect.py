"""(c) The defect: groupwise W4A8 + linear bias + bf16 model -> wrong output on Arm.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_bias_defect.py
docs/known-issues.md has the analysis. vLLM 0.32 casts the bias to fp32 only for channelwise
weights; for groupwise ones it hands the bf16 bias to torch.ops.aten._dyn_quant_pack_4bit_weight.
torch 2.13.0's KleidiAI packing (kai_pack.h) converts it with
`bias.value().to(kFloat).data_ptr<float>()`: a pointer into a temporary freed at the end of that
statement, so the packing reads freed memory (malloc's bookkeeping overwrites its first words;
garbage, different each run). torch 2.9.1 raises instead ("expected scalar type Float but found
BFloat16"). Either way vLLM cannot serve such a model on Arm.

These tests assert that the defect is still there: when one fails because the output became
right, upstream fixed it; update docs/known-issues.md and our guard.
"""

import pytest

from .arm_lane import REPRO, describe, find, run_json

pytestmark = pytest.mark.requires_aarch64

# A channel is wrong when it is off by more than 0.5. Correct channels are off by at most 0.101
# here (activation quantization, see test_int4_matmul.py); a lost or garbled bias is off by at
# least 1, as the layer's biases have |b| in [1, 3].
WRONG = 0.5


def wrong_channels(result) -> bool:
    return "error" in result or result["max_abs_err"] > WRONG


@pytest.mark.parametrize("group", [32, 128])
def test_groupwise_bf16_model_with_bias_is_wrong_on_arm(group, arm_results, host_results):
    arm = find(arm_results["defect"], group=group, dtype="bfloat16")
    host = find(host_results["defect"], group=group, dtype="bfloat16")
    assert not wrong_channels(host), f"x86 must be right: {host.get('error') or host['max_abs_err']}"
    assert wrong_channels(arm), (
        f"groupwise g{group} + bf16 bias is right on Arm now (max error {arm['max_abs_err']:.3g}, "
        f"torch {arm_results['probe']['torch']}): upstream fixed the defect? Update docs/known-issues.md"
    )


@pytest.mark.parametrize("group", [32, 128])
def test_fp32_model_with_bias_is_right_on_arm(group, arm_results, host_results):
    """Activations and bias in fp32 (an fp32 model; the workaround): correct, and equal to x86."""
    arm = find(arm_results["defect"], group=group, dtype="float32")
    host = find(host_results["defect"], group=group, dtype="float32")
    assert not wrong_channels(arm), arm.get("error") or f"max error {arm['max_abs_err']:.3g}"
    assert arm["sqnr_db"] >= 38.0, arm["sqnr_db"]
    diff = max(abs(a - h) for a, h in zip(arm["out"], host["out"], strict=False))
    assert diff <= 1e-5, f"Arm and x86 differ by {diff:.3g}"


def test_channelwise_bf16_model_with_bias_is_right_on_arm(arm_results):
    """vLLM casts a channelwise layer's bias to fp32 before packing: no defect there."""
    arm = find(arm_results["defect"], group=None, dtype="bfloat16")
    assert not wrong_channels(arm), arm.get("error") or f"max error {arm['max_abs_err']:.3g}"
    assert arm["sqnr_db"] >= 38.0, arm["sqnr_db"]


def test_minimal_reproducer(arm_python, host_python):
    """The upstream reproducer, as published: wrong (or rejected) with a bf16 bias on Arm only."""
    proc, arm = run_json([arm_python, REPRO])
    assert arm is not None, describe(proc)
    proc, host = run_json([host_python, REPRO])
    assert host is not None, describe(proc)
    assert arm["kleidiai"] and not arm["fp32_bias"]["wrong_channels"], arm
    assert not host["bf16_bias"]["wrong_channels"] and not host["fp32_bias"]["wrong_channels"], host
    bf16 = arm["bf16_bias"]
    assert "error" in bf16 or bf16["wrong_channels"], f"the reproducer no longer reproduces: {arm}"
