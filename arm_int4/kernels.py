"""Which linear kernel vLLM ran, named from vLLM's own log, not predicted.

vLLM logs one line per quantized layer type: "Using Dynamic4bitLinearKernel for
CompressedTensorsW4A8Int" (W4A8), "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" (W4A16);
a dense model logs none. arm_int4.runner collects the kernel names from a worker's log
(WorkerRun.linear_kernels); describe() adds what the log does not say but the machine and the
plan's dtype decide (vLLM 0.32 source):
- Dynamic4bitLinearKernel (kernels/linear/mixed_precision/dynamic_4bit.py): KleidiAI through
  torch.ops.aten._dyn_quant_matmul_4bit on Arm; on x86 torch's reference path (slower than BF16).
- CPUWNA16LinearKernel (kernels/linear/mixed_precision/cpu.py `_get_isa_hint`): "amx" with AMX tiles
  and bfloat16 activations, else "vec" (Arm included).
"""

from typing import Optional

__all__ = ["W4A8_KERNEL", "W4A16_KERNEL", "describe", "is_x86_fallback"]

W4A8_KERNEL = "Dynamic4bitLinearKernel"
W4A16_KERNEL = "CPUWNA16LinearKernel"


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
