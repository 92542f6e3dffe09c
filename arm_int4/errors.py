"""The exceptions a user can see. Only cli.py turns them into one line and an exit code."""

__all__ = [
    "ArmInt4Error",
    "UsageError",
    "ModelError",
    "PreflightError",
    "EnvironmentMissing",
    "RunError",
    "BudgetNotMet",
]


class ArmInt4Error(Exception):
    """Base: the message is one line that says what, which value, and how to fix it."""

    exit_code = 1


class UsageError(ArmInt4Error):
    """An invalid option value or combination (argparse-level problems exit 2 as well)."""

    exit_code = 2


class ModelError(ArmInt4Error):
    """MODEL could not be resolved or read (missing dir, hub id offline, unreadable config)."""


class PreflightError(ArmInt4Error):
    """A check before heavy work refused the job (group size, existing output, ...)."""


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
