"""The stream engine: quantize a safetensors checkpoint tensor by tensor.

Each input shard maps to one output shard of the same name. A shard's output header is known
before any weight is read (int8 [out, in] + scale [out, 1] or [out, in/G] per quantized Linear,
everything else copied as is), so tensors are read, quantized and written one at a time:
peak memory is the largest tensor and its temporaries, not the model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .observers import quantize_weight
from .preflight import QuantPlan
from .safetensors_io import ShardReader, ShardWriter, TensorInfo

__all__ = ["run_stream", "write_quant_config", "copy_side_files", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_REWRITTEN = {"config.json", "model.safetensors.index.json"}


def _scale_shape(info: TensorInfo, group_size: int | None) -> tuple[int, int]:
    rows, cols = info.shape
    return (rows, cols // group_size) if group_size else (rows, 1)


def _output_specs(tensors: dict[str, TensorInfo], plan: QuantPlan, precision: str) -> list[TensorInfo]:
    specs = []
    for t in sorted(tensors.values(), key=lambda t: t.begin):
        if t.name in plan.targets:
            out = plan.output_name(t.name)  # llmcompressor's name (Mixtral experts: w1 → gate_proj)
            specs.append(TensorInfo(out, "I8", t.shape))
            specs.append(TensorInfo(out + "_scale", "F32" if precision == "fp32" else t.dtype, _scale_shape(t, plan.scheme.group_size)))
        else:
            specs.append(TensorInfo(t.name, t.dtype, t.shape))
    return specs


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, licence…: every top-level non-weight file."""
    for f in src.iterdir():
        if f.is_file() and f.name not in _REWRITTEN and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def write_quant_config(src_config: dict, plan: QuantPlan, dst: Path) -> None:
    """config.json = the source config + compressed-tensors' own quantization_config block."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qscheme = plan.scheme.quantization_scheme()
    qscheme.format = "int-quantized"
    qconfig = QuantizationConfig(
        config_groups={"group_0": qscheme},
        format="int-quantized",
        quantization_status="compressed",
        ignore=plan.ignore if plan.config_ignore is None else plan.config_ignore,
    )
    (dst / "config.json").write_text(json.dumps(src_config, indent=2, sort_keys=True))
    ModelCompressor(quantization_config=qconfig).update_config(str(dst))


def run_stream(plan: QuantPlan, dst: Path, precision: str = "fp32", progress: bool = True) -> dict:
    """Write the quantized checkpoint into dst (an empty dir). Returns counts for the summary."""
    import torch

    args = plan.scheme.quantization_scheme().weights
    src = plan.checkpoint.path
    n_tensors = sum(len(ts) for ts in plan.checkpoint.shards.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_tensors, unit="tensor", desc="quantize", file=sys.stderr, leave=False)
    weight_map: dict[str, str] = {}
    bytes_out = 0
    torch.set_grad_enabled(False)
    for shard, tensors in plan.checkpoint.shards.items():
        specs = _output_specs(tensors, plan, precision)
        with ShardReader(src / shard) as reader:
            writer = ShardWriter(dst / shard, specs, metadata=reader.metadata or {"format": "pt"})
            for t in sorted(tensors.values(), key=lambda t: t.begin):
                value = reader.read(t.name)
                if t.name in plan.targets:
                    q, scale = quantize_weight(value, args, precision)
                    writer.write(plan.output_name(t.name), q)
                    writer.write(plan.output_name(t.name) + "_scale", scale)
                    del q, scale
                else:
                    writer.write(t.name, value)
                del value
                if bar:
                    bar.update(1)
            writer.close()
        bytes_out += writer.bytes_written
        weight_map.update({s.name: shard for s in specs})
    if bar:
        bar.close()
    if len(plan.checkpoint.shards) > 1 or (src / "model.safetensors.index.json").exists():
        total = sum(s.nbytes for ts in plan.checkpoint.shards.values() for s in _output_specs(ts, plan))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_side_files(src, dst)
    write_quant_config(plan.checkpoint.config, plan, dst)
    return {"layers": len(plan.targets), "bytes_out": bytes_out}

