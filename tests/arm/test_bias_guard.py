"""(3') Our guard against the groupwise + bias defect, from checkpoint to kernel, on emulated Arm.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_bias_guard.py -m requires_aarch64

A random Llama with q/k/v biases (as Qwen2 has) is quantized groupwise (g32) by our stream
engine; arm_int4.launch plans its launch for a recorded Graviton4 and picks the dtype. Its q_proj
(int4 weight, scale, bias) then runs through vLLM 0.32's packing + matmul (int4_kernel.py) on
emulated Arm in the planned dtype — correct — and, as the control, in bf16 — the defect.
"""

import json

import pytest

from arm_int4 import hardware, launch
from arm_int4.checkpoint import read_checkpoint

from .arm_lane import ARM_DIR

pytestmark = pytest.mark.requires_aarch64
GRAVITON4 = ARM_DIR.parent / "fixtures" / "machines" / "graviton4"


def test_plan_picks_fp32_on_arm_and_fp32_is_correct_there(kernel_inputs, arm_results):
    """The layer ran in both dtypes in the lane's one emulated kernel process (conftest.arm_results)."""
    facts = read_checkpoint(kernel_inputs["biased_g32"])
    assert facts.is_w4a8_groupwise and facts.quantized_linear_bias
    plan = launch.plan(hardware.from_dump(str(GRAVITON4)), facts, launch.EngineRequest(kv_cache_gib=1))
    assert plan.dtype == "float32", plan.reasons
    assert arm_results["probe"]["kleidiai"], arm_results["probe"]
    guarded, unguarded = arm_results["bias"][plan.dtype], arm_results["bias"]["bfloat16"]
    # guarded: only the int8 activation quantization separates kernel and reference (38 dB, as in
    # test_int4_matmul); unguarded: the bias is read wrong (docs/known-issues.md)
    assert guarded["sqnr_db"] >= 38, json.dumps(guarded)[:400]
    assert guarded["max_abs_err"] < 0.2 * guarded["ref_max_abs"]
    assert unguarded["max_abs_err"] > 10 * guarded["max_abs_err"], (unguarded["max_abs_err"], guarded["max_abs_err"])
