"""A W4A8 linear kernel for x86 CPUs, registered in vLLM's own kernel list: same math as Arm's.

vLLM 0.32 serves compressed-tensors W4A8 (int4 symmetric weights per channel or per group, int8
dynamic per-token asymmetric activations) through Dynamic4bitLinearKernel and
torch.ops.aten._dyn_quant_matmul_4bit: KleidiAI on Arm, a scalar reference loop on x86 (slower than
BF16 by 10-100×). X86W4A8LinearKernel does the same arithmetic with torch's x86 GEMMs:

- activations: quantized per token exactly as torch's reference kernel does (int4mm_kernel.cpp,
  `ref_dyn_quant_matmul_4bit_*`): range [min(0, min x), max(0, max x)], scale 255 / range, the zero
  point nudged with lrintf, values rounded half away from zero (std::round), clamped to int8.
- channelwise: weights unpacked once at load to int8 [K, N]; `torch._int_mm` (oneDNN VNNI) gives the
  exact int32 sums; the zero point is taken out with precomputed weight column sums; then weight
  scale × activation scale (+ bias) in fp32, as the reference does. Bit-identical to the reference
  (tests/test_x86_kernel.py), bf16 output truncated like the reference's bf16 kernel.
- groupwise: the integer activations (q − zp, exact in bf16: |q − zp| ≤ 255) go through
  `torch.ops.aten._weight_int4pack_mm_for_cpu` (int4 weights × bf16 group scales, fp32 sums) for
  short batches; for M ≥ PREFILL_ROWS the group-scaled weights are dequantized to bf16 once per call
  (N·K work, amortized over M rows) and one bf16 GEMM runs. Either way the result differs from the
  reference only by fp32 summation order and bf16 roundings (measured in the tests).

Only on x86_64: `register` (the `vllm.general_plugins` entry point in pyproject.toml) does nothing on
any other machine, so Arm keeps Dynamic4bitLinearKernel with KleidiAI. Layers this kernel cannot take
(`can_implement` says why) fall through to vLLM's next kernel, its reference path, and vLLM's log
names both kernels (arm_int4.kernels reads it).
"""

import importlib.metadata
import os
import platform

from arm_int4.kernels import X86_W4A8_KERNEL as KERNEL_NAME

__all__ = [
    "KERNEL_NAME",
    "ENTRY_POINT",
    "PREFILL_ROWS",
    "register",
    "plugin_active",
    "quantize_rows",
    "linear_channelwise",
    "linear_groupwise",
    "quantize_centered",
    "group_gemm",
    "fused",
    "kernel_class",
]

ENTRY_POINT = "arm_int4_x86_w4a8"  # its name in pyproject.toml's vllm.general_plugins table
# Rows at which groupwise switches from the int4-packed GEMV-like kernel to dequantize + bf16 GEMM.
# Measured on a 2-core EPYC (AVX-512 BF16), 576×3072 and 1024×4096 g32: int4pack 11 ms vs
# dequantize + GEMM 1.7 ms at M=128, 0.05 vs 0.3 ms (the dequantization alone) at M=1.
PREFILL_ROWS = 16


def quantize_rows(x):
    """Per-token asymmetric int8 of `x` [M, K] (any float dtype), as torch's reference kernel does it.

    -> (q int8 [M, K], zp int32 [M, 1], recip fp32 [M, 1]); x ≈ (q − zp) · recip."""
    import torch

    xf = x.float()
    mn, mx = torch.aminmax(xf, dim=1, keepdim=True)
    rmin, rmax = mn.clamp(max=0.0), mx.clamp(min=0.0)
    same = rmin == rmax
    one = torch.ones_like(rmin)
    # tensor / tensor: torch computes `scalar / tensor` as scalar · (1 / tensor), one rounding more
    scale = torch.where(same, one, (one * 255.0) / torch.where(same, one, rmax - rmin))
    recip = one / scale
    dmin, dmax = rmin * scale, rmax * scale
    # zero point from whichever end has the smaller error, clamped, then lrintf (round half to even)
    zp_f = torch.where((-128.0 + dmin) + (127.0 + dmax) > 0, -128.0 - dmin, 127.0 - dmax)
    zp = torch.round(zp_f.clamp(-128.0, 127.0)).to(torch.int32)
    # std::round (half away from zero) of the fp32 product: in float64 the +0.5 is exact.
    v = (xf * scale).double()
    r = torch.trunc(v + torch.copysign(torch.full_like(v, 0.5), v))
    q = (r + zp).clamp(-128, 127).to(torch.int8)
    return q, zp, recip


def _truncate_bf16(t):
    """fp32 -> bf16 by dropping the low 16 bits, as the reference's bf16 kernel does (not rounding)."""
    import torch

    return (t.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def quantize_centered(x):
    """(q − zp) of quantize_rows as bf16 [M, K] (exact: |q − zp| ≤ 255) and recip fp32 [M, 1]."""
    import torch

    q, zp, recip = quantize_rows(x)
    return (q.to(torch.int32) - zp).to(torch.bfloat16), recip


def _channelwise_out(acc, zp, colsum, scale, recip, bias, dtype):
    """int32 Σ q·w [M, N] → Σ (q − zp)·w (exact) → × weight scale × activation scale (+ bias) in fp32,
    the reference's order; bf16 output truncated as the reference's bf16 kernel does."""
    import torch

    res = (acc - zp * colsum).float() * scale * recip
    if bias is not None:
        res = res + bias.float()
    return _truncate_bf16(res) if dtype == torch.bfloat16 else res.to(dtype)


def _groupwise_out(y, recip, bias, dtype):
    res = y.float() * recip
    if bias is not None:
        res = res + bias.float()
    return res.to(dtype)


def _dequantize(w_groups, group_scale):
    """int8 [N, K/g, g] × scale [N, K/g, 1] → [N, K] in the scale's dtype."""
    n, groups, g = w_groups.shape
    return (w_groups * group_scale).view(n, groups * g)


def _staged(fn):
    """Inside vLLM's torch.compile trace: `fn` itself, inlined into the model's graph and fused there by
    inductor at no per-call cost. Eager (enforce_eager, tests): `fused(fn)`."""
    import torch

    return fn if torch.compiler.is_compiling() else fused(fn)


def linear_channelwise(x, wt, colsum, scale, bias):
    """x [M, K] float; wt int8 [K, N]; colsum int32 [N] (= wt.sum(0)); scale fp32 [N]; bias [N] or None."""
    import torch

    q, zp, recip = _staged(quantize_rows)(x)
    acc = torch._int_mm(q, wt)  # int32 [M, N], exact (oneDNN, VNNI)
    return _staged(_channelwise_out)(acc, zp, colsum, scale, recip, bias, x.dtype)


def group_gemm(a, packed, scale_zeros, w_groups, group_scale, bf16: bool):
    """a: (q − zp) as bf16 [M, K]; -> Σ_g scale_g · Σ_k∈g a·w, [M, N] (bf16 for a bf16 model, else fp32)."""
    import torch

    if bf16 and a.shape[0] < PREFILL_ROWS:  # decode: int4-packed weights, fp32 sums, bf16 out
        return torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, w_groups.shape[2], scale_zeros)
    if bf16:  # prefill: dequantize once per call (N·K), one bf16 GEMM over M rows
        return torch.nn.functional.linear(a, fused(_dequantize)(w_groups, group_scale))
    # float32/float16 models: fp32 weights (w · s is exact in fp32), fp32 GEMM
    return torch.nn.functional.linear(a.float(), fused(_dequantize)(w_groups, group_scale.float()))


def linear_groupwise(x, packed, scale_zeros, w_groups, group_scale, bias):
    """x [M, K] float; packed: torch's int4-packed weight; scale_zeros bf16 [K/g, N, 2]; w_groups int8
    [N, K/g, g]; group_scale bf16 [N, K/g, 1]; bias [N] or None."""
    import torch

    a, recip = _staged(quantize_centered)(x)
    y = _custom_op()(a, packed, scale_zeros, w_groups, group_scale, x.dtype == torch.bfloat16)
    return _staged(_groupwise_out)(y, recip, bias, x.dtype)


_compiled: dict = {}


def fused(fn):
    """`fn` compiled by inductor (dynamic shapes; once per process, on first call), so the ~30 small
    elementwise steps of the activation quantization and the epilogue run as a few fused loops: in
    eager torch they cost ~70 µs per call, ×120 linears per decode step of a 30-layer model. The
    GEMMs and the row-count branch stay outside (few graph variants: dtype, bias or not, M = 1 or
    not). Any failure to compile (no C++ compiler, dynamo's recompile limit) falls back to `fn`
    itself, with a warning: the same numbers, slower."""
    if fn not in _compiled:
        import torch

        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)

    def run(*args):
        try:
            return _compiled[fn](*args)
        except Exception as exc:  # the compiler's failure modes are many; the eager path is always right
            if _compiled[fn] is fn:
                raise
            import warnings

            warnings.warn(
                f"arm_int4.x86_w4a8: {fn.__name__} runs eagerly (torch.compile failed: {exc!r:.200})", stacklevel=2
            )
            _compiled[fn] = fn
            return fn(*args)

    return run


_op = None


def _custom_op():
    """group_gemm as the torch custom op arm_int4::w4a8_group_gemm: opaque to torch.compile, so the
    row-count branch stays a runtime decision in vLLM's compiled graph (which it compiles once for
    every batch size, shape guards off)."""
    global _op
    if _op is None:
        import torch

        @torch.library.custom_op("arm_int4::w4a8_group_gemm", mutates_args=())
        def op(
            a: torch.Tensor,
            packed: torch.Tensor,
            scale_zeros: torch.Tensor,
            w_groups: torch.Tensor,
            group_scale: torch.Tensor,
            bf16: bool,
        ) -> torch.Tensor:
            return group_gemm(a, packed, scale_zeros, w_groups, group_scale, bf16)

        @op.register_fake
        def _(a, packed, scale_zeros, w_groups, group_scale, bf16):
            return a.new_empty((a.shape[0], w_groups.shape[0]), dtype=torch.bfloat16 if bf16 else torch.float32)

        _op = op
    return _op


def _kernel_class():
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearKernel,
        MPLinearLayerConfig,
    )
    from vllm.model_executor.layers.quantization.utils import replace_parameter
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types

    _custom_op()  # defined now: torch.library cannot define an op while dynamo traces the model

    def _param(layer, name, t):
        replace_parameter(layer, name, torch.nn.Parameter(t, requires_grad=False))

    def _new(layer, name, t):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))

    class X86W4A8LinearKernel(MPLinearKernel):
        """W4A8 (int4 symmetric weights per channel or group, int8 dynamic per-token activations) on x86."""

        @classmethod
        def get_min_capability(cls) -> int:
            return 1

        @classmethod
        def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
            if not current_platform.is_cpu() or platform.machine() not in ("x86_64", "AMD64"):
                return False, "x86_64 CPUs only"
            if c.weight_type != scalar_types.int4 or c.zero_points:
                return False, f"int4 symmetric weights only (got {c.weight_type}, zero points {c.zero_points})"
            if c.act_type not in (torch.bfloat16, torch.float32, torch.float16):
                return False, f"activations bfloat16/float32/float16 only (got {c.act_type})"
            k, n = c.partition_weight_shape
            if k % c.group_size:
                return False, f"group size {c.group_size} does not divide in_features {k}"
            if c.group_size != k and (c.group_size % 32 or n % 16 or k % 64):
                # torch's int4-packed CPU GEMM: groups of 32/64/128/256, K a multiple of 64, N of 16.
                return False, f"groupwise needs group % 32 == 0, in % 64 == 0, out % 16 == 0 (got {c})"
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            c = self.config
            k, n = c.partition_weight_shape
            w = getattr(layer, self.w_q_name).data  # int8 [N, K], values -8..7
            scales = getattr(layer, self.w_s_name).data  # [N, K // group]
            if c.group_size == k:
                wt = w.t().contiguous()  # int8 [K, N], what _int_mm takes
                _param(layer, self.w_q_name, wt)
                _new(layer, "x86_colsum", wt.sum(0, dtype=torch.int32))  # [N]: zero-point correction
                _new(layer, "x86_scale", scales.float().view(-1).contiguous())  # [N]
            else:
                g = c.group_size
                # the reference keeps group scales in bf16 (KleidiAI's groupwise layout), whatever the model dtype
                s = scales.to(torch.bfloat16)  # [N, K // g]
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((w.int() + 8).contiguous(), 1)
                _new(layer, "x86_packed", packed)
                # [K // g, N, 2]: scale, zero (0: symmetric); the kernel computes (w_u4 − 8) · scale + zero
                _new(layer, "x86_scale_zeros", torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).contiguous())
                _new(layer, "x86_group_scale", s.reshape(n, k // g, 1).contiguous())  # for prefill's dequantization
                _param(layer, self.w_q_name, w.reshape(n, k // g, g))
            if self.w_q_name != "weight" and getattr(layer, "weight", None) is not None:
                # vLLM registers the same tensor as "weight" too: point it at the new one, the [N, K] copy is freed
                _param(layer, "weight", getattr(layer, self.w_q_name).data)
            setattr(layer, self.w_s_name, None)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            # `bias` is what vLLM's linear passes (None where the caller adds it: skip_bias_add, tensor-
            # parallel ranks > 0); Dynamic4bitLinearKernel packs layer.bias in instead, the same for TP=1.
            c = self.config
            k, n = c.partition_weight_shape
            x_2d = x.reshape(-1, k)
            w = getattr(layer, self.w_q_name)
            if c.group_size == k:
                out = linear_channelwise(x_2d, w, layer.x86_colsum, layer.x86_scale, bias)
            else:
                out = linear_groupwise(x_2d, layer.x86_packed, layer.x86_scale_zeros, w, layer.x86_group_scale, bias)
            return out.reshape(x.shape[:-1] + (n,))

    return X86W4A8LinearKernel


_registered = None


def kernel_class():
    """The kernel class (built on first use: it subclasses vLLM's MPLinearKernel)."""
    global _registered
    if _registered is None:
        _registered = _kernel_class()
    return _registered


def register() -> None:
    """vLLM general plugin: put X86W4A8LinearKernel first in vLLM's CPU mixed-precision kernel list, on
    x86_64 only (on Arm, vLLM's Dynamic4bitLinearKernel with KleidiAI stays the choice)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    cls = kernel_class()
    cpu = _POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if not any(k.__name__ == KERNEL_NAME for k in cpu):
        cpu.insert(0, cls)


def plugin_active(arch: str, env=None) -> bool:
    """Whether vLLM started in this environment would put X86W4A8LinearKernel first: x86_64, the entry
    point installed (an environment installed before it existed lacks it: scripts/setup.sh
    reinstalls), not filtered out by VLLM_PLUGINS, not disabled by VLLM_DISABLED_KERNELS."""
    env = os.environ if env is None else env
    if arch != "x86_64":
        return False
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    if not any(ep.name == ENTRY_POINT and ep.value.startswith(f"{__name__}:") for ep in eps):
        return False
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and ENTRY_POINT not in [p.strip() for p in allowed.split(",")]:
        return False
    return KERNEL_NAME not in [k.strip() for k in env.get("VLLM_DISABLED_KERNELS", "").split(",")]
