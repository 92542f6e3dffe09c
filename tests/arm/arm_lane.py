"""Helpers of the Arm lane (tests/arm): paths and running a JSON-printing command."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

ARM_DIR = Path(__file__).resolve().parent
REPO = ARM_DIR.parents[1]
KERNEL = ARM_DIR / "int4_kernel.py"  # the shared vLLM-transcription + reference module
REPRO = ARM_DIR / "repro_groupwise_bias.py"  # the upstream reproducer, kept runnable
# seconds: one emulated run takes ~25 s on a quiet box, but those that import vLLM pay an emulated
# import (74-86 s quiet, 472 s at load 10-19), and 600 s was exceeded once (2026-12-06, load ~4.5
# beside an emulated vLLM server): a bound against hangs, not a speed check
EMULATED_TIMEOUT = 1200


def _no_core():  # qemu dumps core on SIGILL otherwise (the cortex-a72 test provokes one)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_json(cmd, env=None, timeout=EMULATED_TIMEOUT):
    """Run a command that prints one JSON object as its last stdout line; return (process, dict)."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        preexec_fn=_no_core,
    )
    lines = proc.stdout.strip().splitlines()
    data = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    return proc, data


def describe(proc) -> str:
    how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return f"{' '.join(map(str, proc.args))}: {how}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}"


def find(results: list[dict], **case) -> dict:
    """The result for one case of int4_kernel.MATMUL / DEFECT."""
    hits = [r for r in results if all(r.get(k) == v for k, v in case.items())]
    assert len(hits) == 1, f"expected one result for {case}, found {len(hits)}"
    return hits[0]
