"""(b) vLLM 0.32's W4A8 matmul on Arm (KleidiAI) against a float64 reference and the x86 host.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_int4_matmul.py

Both machines run tests/arm/int4_kernel.py: the same seeds, the same vLLM packing code.
SQNR threshold, 38 dB: the weights in the reference are exactly the int4 values times their
scales, so the only loss is the kernel's dynamic int8 quantization of each activation row
(asymmetric, 255 steps over the row's range). For a N(0,1) row of 512 values the range is about
6.5, a step 0.0255, noise step^2/12 = 5.4e-5 of unit signal: 42.7 dB. Measured: 42.6-43.2 dB on
Arm, 41.7-43.2 dB on x86. 38 dB leaves ~4 dB for sampling spread; a 7-bit activation (36.7 dB),
a wrong nibble order or wrong scales (< 10 dB) fail.
"""

import math

import pytest

from .arm_lane import find

pytestmark = pytest.mark.requires_aarch64

MIN_SQNR_DB = 38.0
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
CASES = [(g, d, m) for g in (None, 32, 128) for d in ("float32", "bfloat16") for m in (1, 8)]


def ulp(dtype: str, magnitude: float) -> float:
    """One unit in the last place of `dtype` at `magnitude`."""
    return EPS[dtype] * 2.0 ** math.floor(math.log2(magnitude))


def agree_tolerance(dtype: str, values) -> float:
    """Arm vs x86: both quantize activations the same way and accumulate int32 exactly, and differ
    only in float rounding (fp32 scaling order; bf16 kernels vs fp32-then-round). Measured: 1 ulp
    of the output dtype at the tensor's largest value. Allowed: 2 such ulps."""
    return 2 * ulp(dtype, max(abs(v) for v in values))


def case_id(case):
    g, d, m = case
    return f"{'channel' if g is None else f'g{g}'}-{d}-m{m}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_int4_matmul_matches_reference_and_x86(case, arm_results, host_results):
    g, d, m = case
    arm = find(arm_results["matmul"], group=g, dtype=d, m=m)
    host = find(host_results["matmul"], group=g, dtype=d, m=m)
    assert "error" not in arm, arm["error"]
    assert arm["out_dtype"] == d, "vLLM returns activations' dtype"
    assert arm["sqnr_db"] >= MIN_SQNR_DB, (
        f"Arm SQNR {arm['sqnr_db']:.1f} dB < {MIN_SQNR_DB} (worst channels {arm['worst_cols']})"
    )
    assert host["sqnr_db"] >= MIN_SQNR_DB, f"x86 SQNR {host['sqnr_db']:.1f} dB < {MIN_SQNR_DB}"
    tol = agree_tolerance(d, host["out"])
    diff = max(abs(a - h) for a, h in zip(arm["out"], host["out"], strict=False))
    assert diff <= tol, f"Arm and x86 differ by {diff:.3g} (> {tol:.3g}, 2 ulp of {d} at the largest output)"
