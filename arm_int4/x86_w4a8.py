"""A W4A8 linear kernel for x86 CPUs, registered in vLLM's own kernel list: same math as Arm's.

vLLM 0.32 serves compressed-tensors W4A8 (int4 symmetric weights per channel or per group, int8
dynamic per-token asymmetric activations) through Dynamic4bitLinearKernel and
torch.ops.aten._dyn_quant_matmul_4bit: KleidiAI on Arm, a scalar reference loop on x86 (slower than
BF16 by 10-100×). X86W4A8LinearKernel does the same arithmetic, faster:

- activations: quantized per token exactly as torch's reference kernel does (int4mm_kernel.cpp,
  `ref_dyn_quant_matmul_4bit_*`): range [min(0, min x), max(0, max x)], scale 255 / range, the zero
  point nudged with lrintf, values rounded half away from zero (std::round), clamped to int8.
- channelwise: weights unpacked once at load to int8 [K, N]; `torch._int_mm` (oneDNN VNNI) gives the
  exact int32 sums; the zero point is taken out with precomputed weight column sums; then weight
  scale × activation scale (+ bias) in fp32, as the reference does. Bit-identical to the reference
  (tests/test_x86_kernel.py), bf16 output truncated like the reference's bf16 kernel.
- groupwise: bit-identical to the reference too. Its per-group arithmetic (exact int32 sums per group,
  then × group scale and + into an fp32 accumulator, one rounding each, group by group, then × the
  activation scale) is the C kernel of x86_w4a8_gemm.py (AVX2, compiled at first use; the same steps in
  torch where no compiler is found); bias added after, then the cast to the model's dtype, as vLLM does.

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
    "register",
    "plugin_active",
    "quantize_rows",
    "linear_channelwise",
    "linear_groupwise",
    "fused",
    "kernel_class",
]

ENTRY_POINT = "arm_int4_x86_w4a8"  # its name in pyproject.toml's vllm.general_plugins table


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


def _channelwise_out(acc, zp, colsum, scale, recip, bias, dtype):
    """int32 Σ q·w [M, N] → Σ (q − zp)·w (exact) → × weight scale × activation scale (+ bias) in fp32,
    the reference's order; bf16 output truncated as the reference's bf16 kernel does."""
    import torch

    res = (acc - zp * colsum).float() * scale * recip
    if bias is not None:
        res = res + bias.float()
    return _truncate_bf16(res) if dtype == torch.bfloat16 else res.to(dtype)


def _groupwise_out(y, bias, dtype):
    """The reference's fp32 result (+ bias in fp32, as torch's reference kernel adds it) in the model's
    dtype: vLLM casts groupwise bf16/fp16 outputs down with .to (round to nearest)."""
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


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


def linear_groupwise(x, wp, wsum, scale, bias):
    """x [M, K] float; x86_w4a8_gemm.pack's (wp, wsum, scale); bias [N] or None."""
    q, zp, recip = _staged(quantize_rows)(x)
    y = _custom_op()(q, zp, recip, wp, wsum, scale)  # fp32 [M, N]
    return _staged(_groupwise_out)(y, bias, x.dtype)


_compiled: dict = {}


def fused(fn):
    """`fn` compiled by inductor (dynamic shapes; once per process, on first call), so the ~30 small
    elementwise steps of the activation quantization and the epilogue run as a few fused loops: in
    eager torch they cost ~70 µs per call, ×120 linears per decode step of a 30-layer model. The
    GEMMs stay outside (few graph variants: dtype, bias or not, M = 1 or not). Any failure to compile
    (no C++ compiler, dynamo's recompile limit) falls back to `fn` itself, with a warning: the same numbers, slower."""
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
    """The groupwise GEMM (x86_w4a8_gemm.gemm) as the torch custom op arm_int4::w4a8_group_gemm: opaque to
    torch.compile, so inductor neither traces the ctypes call nor rewrites its float steps."""
    global _op
    if _op is None:
        import torch

        from arm_int4 import x86_w4a8_gemm

        @torch.library.custom_op("arm_int4::w4a8_group_gemm", mutates_args=())
        def op(
            q: torch.Tensor,
            zp: torch.Tensor,
            recip: torch.Tensor,
            wp: torch.Tensor,
            wsum: torch.Tensor,
            scale: torch.Tensor,
        ) -> torch.Tensor:
            return x86_w4a8_gemm.gemm(q, zp, recip, wp, wsum, scale)

        @op.register_fake
        def _(q, zp, recip, wp, wsum, scale):
            return q.new_empty((q.shape[0], wsum.shape[0] * wsum.shape[2]), dtype=torch.float32)

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

    from arm_int4 import x86_w4a8_gemm

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
            if c.group_size != k and (
                c.group_size % 32 or c.group_size > x86_w4a8_gemm.MAX_GROUP or n % x86_w4a8_gemm.BLOCK_N
            ):
                # the reference takes groups of multiples of 32; the C kernel's layout, 16-column blocks
                return False, f"groupwise needs group % 32 == 0, group <= 4096, out_features % 16 == 0 (got {c})"
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            c = self.config
            k = c.partition_weight_shape[0]
            w = getattr(layer, self.w_q_name).data  # int8 [N, K], values -8..7
            scales = getattr(layer, self.w_s_name).data  # [N, K // group]
            if c.group_size == k:
                wt = w.t().contiguous()  # int8 [K, N], what _int_mm takes
                _param(layer, self.w_q_name, wt)
                _new(layer, "x86_colsum", wt.sum(0, dtype=torch.int32))  # [N]: zero-point correction
                _new(layer, "x86_scale", scales.float().view(-1).contiguous())  # [N]
            else:
                # the reference keeps group scales in bf16 (KleidiAI's groupwise layout), whatever the model dtype
                wp, wsum, sc = x86_w4a8_gemm.pack(w, scales.to(torch.bfloat16))
                x86_w4a8_gemm.library()  # compiled (or found in the cache) now, not while vLLM traces the model
                _param(layer, self.w_q_name, wp)  # uint8 [N·K/2]: two int4 per byte
                _new(layer, "x86_wsum", wsum)  # int16 [N/16, K/g, 16]: per-group weight sums (zero-point term)
                _new(layer, "x86_group_scale", sc)  # bf16 [N/16, K/g, 16]
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
                out = linear_groupwise(x_2d, w, layer.x86_wsum, layer.x86_group_scale, bias)
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
