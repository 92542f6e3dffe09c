"""Check a quantized checkpoint against the quantization_config it declares.

Per quantized Linear: weight int8 holding values in [-8, 7] (int-quantized, W4A8), or weight_packed
int32 [out, ceil(in / 8)] + weight_shape [out, in] (pack-quantized, W4A16: eight 4-bit values per
word, in range by construction); weight_scale a float tensor of shape [out, 1] (channelwise) or
[out, in / G] (groupwise); and the set of quantized layers equals what
the config's targets and ignore list select in the model. Tensors are read one at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArmInt4Error
from ..schemes import MixedScheme, Scheme, scheme_from_config
from .safetensors_io import ShardReader

__all__ = ["VerifyError", "VerifyReport", "verify_dir", "verify_written"]


class VerifyError(ArmInt4Error):
    """A written checkpoint does not match its own quantization_config."""


@dataclass
class VerifyReport:
    path: Path
    scheme: Scheme | MixedScheme
    layers: int
    nbytes: int

    def summary(self) -> str:
        return (
            f"{self.path}: OK — {self.layers} INT4 layers match quantization_config "
            f"({self.scheme.preset} {self.scheme.label}), {self.nbytes / 2**20:.1f} MiB of tensors"
        )


def verify_dir(path: str | Path) -> VerifyReport:
    from .preflight import quantizable_layers

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise VerifyError(f"{p}: no config.json — pass a quantized model directory")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not qc:
        raise VerifyError(f"{p}: config.json has no quantization_config — this model is not quantized")
    scheme = scheme_from_config(qc)
    if scheme is None:
        raise VerifyError(f"{p}: quantization_config is not an INT4 compressed-tensors scheme arm-int4 knows")
    if qc.get("format") != scheme.format:
        raise VerifyError(
            f"{p}: format {qc.get('format')!r}, expected {scheme.format!r} for {scheme.preset} "
            "(the layout vLLM CPU loads for it)"
        )
    groups = list(qc["config_groups"].values())
    targets = [t for g in groups for t in g.get("targets") or ["Linear"]]
    layers = quantizable_layers(p, targets, qc.get("ignore") or []).layers
    expected = {x.weight for x in layers}
    scheme_of = {x.weight: _layer_scheme(x.module, groups, scheme.parts) for x in layers}

    files = sorted(f for f in p.glob("*.safetensors"))
    if not files:
        raise VerifyError(f"{p}: no *.safetensors files")
    found: set[str] = set()
    nbytes = 0
    for f in files:
        with ShardReader(f) as r:
            nbytes += sum(t.nbytes for t in r.tensors.values())
            for name, info in r.tensors.items():
                if not name.endswith(".weight_scale"):
                    continue
                wname = name.removesuffix("_scale")
                if wname not in scheme_of:
                    raise VerifyError(f"{p}: {wname} is quantized but the config does not target it")
                if scheme.format == "pack-quantized":
                    _check_packed(f.name, wname, info, scheme_of[wname], r)
                else:
                    w = r.tensors.get(wname)
                    if w is None:
                        raise VerifyError(f"{f.name}: {name} has no {wname} beside it")
                    _check_layer(f.name, w, info, scheme_of[wname], r)
                found.add(wname)
    missing, extra = expected - found, found - expected
    if missing:
        raise VerifyError(f"{p}: {len(missing)} Linear layers not quantized, e.g. {sorted(missing)[0]}")
    if extra:
        raise VerifyError(f"{p}: {len(extra)} quantized tensors the config does not target, e.g. {sorted(extra)[0]}")
    return VerifyReport(p, scheme, len(found), nbytes)


def _layer_scheme(module: str, groups: list[dict], parts: tuple[Scheme, ...]) -> Scheme:
    """The scheme of the config group whose targets select `module` (an exact name, a "re:" regex,
    or a class name such as Linear, as compressed-tensors and vLLM match them)."""
    for group, scheme in zip(groups, parts, strict=True):
        for t in group.get("targets") or ["Linear"]:
            if re.match(t[3:], module) is not None if t.startswith("re:") else t in (module, "Linear"):
                return scheme
    return parts[0]  # selected by a class name other than Linear: the single-group case


def verify_written(path: str | Path, plan, stats) -> VerifyReport:
    """The stream engine's output, verified without a second read of its tensors.

    The int range and the scales were checked in memory as each tensor was written
    (stats.checks); here: the config reads back as the planned scheme, every planned layer was
    written exactly once, and each shard's header and size on disk are the ones planned."""
    p = Path(path)
    qc = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    scheme = scheme_from_config(qc)
    if scheme != plan.scheme:
        raise VerifyError(f"{p}: config.json declares {scheme}, the plan was {plan.scheme}")
    expected = {plan.output_name(n) for n in plan.targets}
    found = [c.weight for c in stats.checks]
    if len(found) != len(set(found)) or set(found) != expected:
        missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
        raise VerifyError(f"{p}: written layers differ from the plan (missing {missing[:1]}, extra {extra[:1]})")
    for c in stats.checks:
        if c.qmin < -8 or c.qmax > 7:
            raise VerifyError(f"{p}: {c.weight} holds values in [{c.qmin}, {c.qmax}], outside INT4 [-8, 7]")
        if not c.scales_ok:
            raise VerifyError(f"{p}: {c.weight}_scale has non-positive or non-finite scales")
    nbytes = 0
    for shard, specs in stats.shards.items():
        with ShardReader(p / shard) as r:  # the header only
            got = sorted((t.name, t.dtype, t.shape) for t in r.tensors.values())
            size = r.data_start + sum(t.nbytes for t in r.tensors.values())
        if got != sorted((t.name, t.dtype, t.shape) for t in specs):
            raise VerifyError(f"{p / shard}: header differs from the planned tensors")
        if (p / shard).stat().st_size != size:
            raise VerifyError(f"{p / shard}: {(p / shard).stat().st_size} bytes on disk, header says {size}")
        nbytes += sum(t.nbytes for t in specs)
    return VerifyReport(p, plan.scheme, len(found), nbytes)  # == scheme, checked above


def _check_scale(shard, s, rows: int, cols: int, scheme: Scheme, reader: ShardReader) -> None:
    g = scheme.group_size
    want = (rows, cols // g) if g else (rows, 1)
    if g and cols % g:
        raise VerifyError(f"{shard}: {s.name[:-6]} has {cols} input features, not divisible by group {g}")
    if s.dtype not in ("BF16", "F16", "F32") or tuple(s.shape) != want:
        raise VerifyError(f"{shard}: {s.name} is {s.dtype}{list(s.shape)}, expected a float tensor {list(want)}")
    scale = reader.read(s.name)
    if not bool((scale > 0).all()) or not bool(scale.float().isfinite().all()):
        raise VerifyError(f"{shard}: {s.name} has non-positive or non-finite scales")


def _check_packed(shard, wname: str, s, scheme: Scheme, reader: ShardReader) -> None:
    packed, shape = reader.tensors.get(wname + "_packed"), reader.tensors.get(wname + "_shape")
    if packed is None or shape is None:
        raise VerifyError(f"{shard}: {s.name} has no {wname}_packed and {wname}_shape beside it")
    if shape.dtype not in ("I64", "I32") or tuple(shape.shape) != (2,):
        raise VerifyError(f"{shard}: {shape.name} is {shape.dtype}{list(shape.shape)}, expected an int tensor [2]")
    rows, cols = (int(v) for v in reader.read(shape.name))
    if packed.dtype != "I32" or tuple(packed.shape) != (rows, -(-cols // 8)):
        raise VerifyError(
            f"{shard}: {packed.name} is {packed.dtype}{list(packed.shape)}, expected int32 {[rows, -(-cols // 8)]} "
            f"(eight INT4 values per word of a [{rows}, {cols}] weight)"
        )
    _check_scale(shard, s, rows, cols, scheme, reader)


def _check_layer(shard, w, s, scheme: Scheme, reader: ShardReader) -> None:
    if w.dtype != "I8" or len(w.shape) != 2:
        raise VerifyError(f"{shard}: {w.name} is {w.dtype}{list(w.shape)}, expected int8 [out, in]")
    rows, cols = w.shape
    q = reader.read(w.name)
    lo, hi = int(q.min()), int(q.max())
    if lo < -8 or hi > 7:
        raise VerifyError(f"{shard}: {w.name} holds values in [{lo}, {hi}], outside INT4 [-8, 7]")
    _check_scale(shard, s, rows, cols, scheme, reader)
