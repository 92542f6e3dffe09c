"""The Arm lane: tests run on the host and execute code in the emulated aarch64 Python.

scripts/arm_emulation.sh prepares that Python (qemu-user + an arm64 rootfs + aarch64 torch) and
prints its wrapper. Without it these tests skip, unless ARM_INT4_REQUIRE_ARM=1 (the lane runner's
setting), which turns the skip into a failure. Each emulated process pays 15-25 s to import torch,
so results are computed once per session and shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .arm_lane import KERNEL, REPO, describe, run_json


def _unprepared(reason: str):
    msg = f"{reason} (the Arm lane needs scripts/arm_emulation.sh to have run; see tests/arm/README.md)"
    if os.environ.get("ARM_INT4_REQUIRE_ARM") == "1":
        pytest.fail(f"ARM_INT4_REQUIRE_ARM=1 and {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def arm_python() -> Path:
    """The wrapper that runs the emulated aarch64 python3.11 (path logic lives in the script)."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "arm_emulation.sh"), "--print"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        _unprepared("the aarch64 emulation is not prepared: " + proc.stderr.strip())
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def host_python() -> str:
    """The host interpreter, which must have torch (it runs PyTorch's x86 reference path)."""
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
    if proc.returncode != 0:
        _unprepared(f"host torch is missing in {sys.executable}")
    return sys.executable


@pytest.fixture(scope="session")
def arm_results(arm_python) -> dict:
    """int4_kernel.py all, on emulated aarch64 (-cpu max: dotprod + i8mm -> KleidiAI kernels)."""
    proc, data = run_json([arm_python, KERNEL, "all"])
    assert data is not None, "the emulated run failed: " + describe(proc)
    return data


@pytest.fixture(scope="session")
def host_results(host_python) -> dict:
    """int4_kernel.py all, on the x86 host (PyTorch's reference implementation of the ops)."""
    proc, data = run_json([host_python, KERNEL, "all"])
    assert data is not None, "the host run failed: " + describe(proc)
    return data
