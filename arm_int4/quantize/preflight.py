"""Checks before any heavy work: every refusal is one line naming the layer and the value.

The model's Linear layers are found the way llmcompressor finds them (compressed-tensors'
match_named_modules over the model built on the meta device, so no weights are loaded), then
mapped onto the checkpoint's tensor names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PreflightError
from ..schemes import Scheme
from .safetensors_io import ShardReader, TensorInfo

__all__ = ["Checkpoint", "QuantPlan", "read_checkpoint", "plan_quantization", "check_output"]


@dataclass
class Checkpoint:
    """A local HF model dir: its config and, per safetensors shard, the tensor headers."""

    path: Path
    config: dict
    shards: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # file name → tensors

    def tensor(self, name: str) -> TensorInfo | None:
        for tensors in self.shards.values():
            if name in tensors:
                return tensors[name]
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.shards.values() for t in ts.values())


@dataclass
class QuantPlan:
    checkpoint: Checkpoint
    scheme: Scheme
    ignore: list[str]
    targets: dict[str, TensorInfo]  # tensor name (`….weight`) → its header, in checkpoint order


def read_checkpoint(path: str | Path) -> Checkpoint:
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise PreflightError(f"{p}: no config.json — MODEL must be a Hugging Face model directory")
    config = json.loads(cfg_file.read_text())
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    ck = Checkpoint(p, config)
    for name in files:
        with ShardReader(p / name) as r:
            ck.shards[name] = r.tensors
    return ck


def _linear_modules(config_dir: Path, scheme_targets: list[str], ignore: list[str]) -> list[tuple[str, int]]:
    """(module name, in_features) of every Linear llmcompressor would quantize."""
    import torch
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, m.weight.shape[-1]) for n, m in match_named_modules(model, scheme_targets, ignore)]


def plan_quantization(ck: Checkpoint, scheme: Scheme, ignore: list[str], *, require_safetensors: bool) -> QuantPlan:
    qc = ck.config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown")
        fmt = qc.get("format", "")
        raise PreflightError(
            f"{ck.path} is already quantized ({method} {fmt}".rstrip() + "): quantize the original "
            "BF16/FP16 checkpoint instead"
        )
    if require_safetensors and not ck.shards:
        raise PreflightError(
            f"{ck.path}: no *.safetensors files — the stream engine reads safetensors; "
            "use --engine llmcompressor for .bin checkpoints"
        )
    modules = _linear_modules(ck.path, ["Linear"], ignore)
    if not modules:
        raise PreflightError(
            f"{ck.path}: no Linear layers left to quantize (ignore list: {' '.join(ignore) or 'none'})"
        )
    targets: dict[str, TensorInfo] = {}
    for mod, _in_features in modules:
        name = f"{mod}.weight"
        info = ck.tensor(name)
        if info is None:
            if ck.shards:
                raise PreflightError(
                    f"layer {mod}: its weight {name} is not in the checkpoint (tied to another tensor?) — "
                    f"add --ignore {mod}"
                )
            continue
        if len(info.shape) != 2:
            raise PreflightError(f"layer {mod}: weight shape {list(info.shape)} is not 2-D")
        if info.dtype not in ("BF16", "F16", "F32"):
            raise PreflightError(f"layer {mod}: weight dtype {info.dtype} is not a float type")
        targets[name] = info
    g = scheme.group_size
    if g:
        bad = [(n, cols) for n, cols in modules if cols % g]
        if bad:
            name, cols = bad[0]
            more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
            divisors = [x for x in (32, 64, 128) if all(c % x == 0 for _, c in modules)]
            hint = f"use --groupsize {' or '.join(map(str, divisors))}" if divisors else "use --scheme channelwise"
            raise PreflightError(
                f"--groupsize {g} does not divide the {cols} input features of layer "
                f"{name}{more}: {hint}"
            )
    return QuantPlan(ck, scheme, list(ignore), targets)


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise PreflightError(f"output {out} already exists: pass --overwrite to replace it, or --output DIR")
    if not out.parent.exists():
        raise PreflightError(f"output parent directory {out.parent} does not exist")
