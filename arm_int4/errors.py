"""The exceptions a user can see. Only cli.py turns them into one line and an exit code."""

__all__ = [
    "ArmInt4Error",
    "UsageError",
    "ModelError",
    "PreflightError",
    "EnvironmentMissing",
    "RunError",
    "BudgetNotMet",
    "BudgetTooSlow",
    "HeadsDoNotSplit",
    "KernelMissing",
    "MoeNeedsArm",
    "DtypeRefused",
    "GatedModel",
    "HubUnreachable",
    "NotEnoughDisk",
    "RayUnsupported",
]


class ArmInt4Error(Exception):
    """Base: the message is one line that says what, which value, and how to fix it."""

    exit_code = 1


class UsageError(ArmInt4Error):
    """An invalid option value or combination (argparse-level problems exit 2 as well)."""

    exit_code = 2


class ModelError(ArmInt4Error):
    """MODEL could not be resolved or read (missing dir, hub id offline, unreadable config)."""


class GatedModel(ModelError):
    """A gated hub repo: its licence must be accepted on the hub and a token set on this machine."""


class HubUnreachable(ModelError):
    """The hub cannot be asked (no connection, or HF_HUB_OFFLINE) and the files are not cached."""


class PreflightError(ArmInt4Error):
    """A check before heavy work refused the job (group size, existing output, ...)."""


class HeadsDoNotSplit(PreflightError):
    """Tensor parallelism asked for `ranks` ranks and the model's attention heads do not divide by it."""

    def __init__(self, model: str, heads, kv_heads, ranks: int):
        super().__init__(
            f"{model}: {heads} attention heads ({kv_heads} KV heads) do not split over {ranks} tensor-parallel "
            "ranks: choose a rank count that divides them"
        )
        self.ranks = ranks


class KernelMissing(PreflightError):
    """The checkpoint's INT4 scheme has no vLLM kernel on this CPU (W4A16 off AVX-512 x86)."""


class MoeNeedsArm(PreflightError):
    """A W4A8 mixture-of-experts checkpoint off Arm: vLLM's only W4A8 MoE kernel is Arm-only."""


class DtypeRefused(PreflightError):
    """An explicit activation dtype that vLLM 0.32 runs wrongly (or crashes on) with this checkpoint here."""


class NotEnoughDisk(PreflightError):
    """A download or an output would not fit the free space of its filesystem."""


class BudgetTooSlow(PreflightError):
    """`quantize --budget`: the per-layer sensitivity pass is estimated to take longer than the limit."""


class RayUnsupported(PreflightError):
    """`--distributed-executor-backend ray` (or `--data-parallel-backend ray`): vLLM 0.32's CPU platform has
    no Ray device key, and v1/executor/ray_utils.py raises "current platform cpu does not support ray"."""


class EnvironmentMissing(ArmInt4Error):
    """A needed environment or package is absent (e.g. the quantization venv)."""


class RunError(ArmInt4Error):
    """A subprocess we started (vLLM, llmcompressor, llama.cpp) failed."""


class BudgetNotMet(ArmInt4Error):
    """`quantize --budget`: no choice stayed within the budget through vLLM. `result` is the kept
    checkpoint's QuantResult with --keep-best, else None (nothing written)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
