"""`arm-int4 quantize --dry-run`: what a quantization reads, writes and holds, before it runs.

A local MODEL is planned from its safetensors headers, exactly as quantize plans it. A hub id is
planned from config.json and model.safetensors.index.json alone (arm_int4.hub): the index names
every tensor and, for the dense families whose tensors the names give
(preflight.NAMED_LINEAR_ARCHITECTURES), config.json gives each shape; the shapes must add up to the
index's total_size, or the output size is an estimate and says so. The same preview gives quantize
its disk check for a hub id before the download starts (download + output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..hub import INDEX, DiskNeed, HubModel, check_disk, free_bytes, size
from ..schemes import Scheme
from .moe import MOE_IGNORE, is_moe_config
from .preflight import Checkpoint, checkpoint_from_index, plan_quantization, read_source_checkpoint

__all__ = ["QuantPreview", "preview", "OUTPUT_FRACTION_ESTIMATE"]

# INT4 values are stored one per int8 byte (half their BF16 size) plus scales; embeddings, lm_head and
# norms stay as they are. Measured on the Llama-3.1-8B-shaped checkpoint (docs/benchmarks-quantize-8b.json):
# 0.566 of the source channelwise, 0.593 g32 with BF16 scales; 0.6 rounds that up. Used only when the
# tensors' shapes are unknown.
OUTPUT_FRACTION_ESTIMATE = 0.6


@dataclass(frozen=True)
class QuantPreview:
    model: str
    scheme: Scheme
    engine: str
    jobs: int
    output: Path
    source_bytes: int
    output_bytes: int
    output_exact: bool  # from the plan's tensor shapes, else OUTPUT_FRACTION_ESTIMATE of the source
    layers: int | None  # Linear layers quantized (None: shapes unknown)
    largest: tuple | None  # (tensor name, bytes)
    memory_bytes: int | None
    memory_note: str
    hub: HubModel | None

    def output_need(self, nbytes: int | None = None) -> DiskNeed:
        return DiskNeed("the INT4 output", self.output.parent, self.output_bytes if nbytes is None else nbytes)

    def needs(self) -> list:
        out = [self.output_need()]
        if self.hub is not None:
            out.insert(0, self.hub.download_need())
        return out

    def check_disk(self) -> None:
        check_disk(self.model, self.needs())

    def summary(self) -> str:
        lines = [f"quantize plan for {self.model} (nothing downloaded or written: --dry-run)"]
        if self.hub is not None:
            lines += [f"  {line}" for line in self.hub.describe("quantize")[:2]]
        lines.append(f"  scheme: {self.scheme.preset} {self.scheme.label}, {self.engine} engine, {self.jobs} job(s)")
        if self.layers is not None:
            lines.append(f"  layers: {self.layers} Linear layers quantized")
        lines.append(f"  source: {size(self.source_bytes)} of tensors")
        how = "from the tensor shapes" if self.output_exact else f"estimate: {OUTPUT_FRACTION_ESTIMATE} x the source"
        lines.append(f"  output: {size(self.output_bytes)} ({how}) -> {self.output}")
        mem = f"{size(self.memory_bytes)} " if self.memory_bytes else ""
        lines.append(f"  memory: {mem}{self.memory_note}")
        for n in self.needs():
            if n.bytes:
                lines.append(f"  disk: {n.what} {size(n.bytes)} in {n.where} ({size(free_bytes(n.where))} free there)")
        return "\n".join(lines)


def _hub_checkpoint(hub: HubModel) -> Checkpoint | None:
    index = hub.snapshot / INDEX
    if not index.is_file():
        return None  # a single-file model: its tensor names are in the file's header, not downloaded
    data = json.loads(index.read_text())
    config = json.loads((hub.snapshot / "config.json").read_text())
    return checkpoint_from_index(hub.snapshot, config, data.get("weight_map") or {}, hub.weight_bytes)


def preview(
    model: str,
    scheme: Scheme,
    engine: str,
    *,
    ignore: list,
    output: Path,
    jobs: int,
    precision: str,
    model_dir: Path | None = None,
    hub: HubModel | None = None,
) -> QuantPreview:
    """The plan for a local `model_dir`, or for `hub` (its config and index only)."""
    from .stream import memory_bound, output_bytes

    if hub is not None:
        ck = _hub_checkpoint(hub)
        source = hub.weight_bytes
    else:
        assert model_dir is not None
        ck = read_source_checkpoint(model_dir)
        source = ck.nbytes
    if ck is not None and is_moe_config(ck.config):
        ignore = ignore + MOE_IGNORE  # as quantize adds it
    plan = plan_quantization(ck, scheme, ignore, require_safetensors=engine == "stream") if ck is not None else None
    largest = None
    if ck is not None:
        t = max((t for ts in ck.shards.values() for t in ts.values()), key=lambda t: t.nbytes, default=None)
        largest = (t.name, t.nbytes) if t is not None else None
    if plan is not None and engine == "stream":
        out_bytes, exact = output_bytes(plan, precision), True
    else:
        out_bytes, exact = int(source * OUTPUT_FRACTION_ESTIMATE), False
    if engine == "stream" and largest:
        memory, note = (
            memory_bound(jobs, largest[1]),
            f"at most (the stream engine's bound: {jobs} job(s) x (2 x the largest tensor, {largest[0]} "
            f"{size(largest[1])}, + 1 GiB)); measured peaks are far lower (docs/benchmarks.md)",
        )
    elif engine == "stream":
        memory, note = None, "unknown: the tensors' shapes are not known before the download"
    else:
        factor = 2 if precision == "fp32" else 1
        memory, note = (
            source * factor,
            "estimate, not measured here: llmcompressor loads the whole model"
            + (" cast to fp32" if factor == 2 else "")
            + ", plus calibration activations for gptq",
        )
    return QuantPreview(
        model=model,
        scheme=scheme,
        engine=engine,
        jobs=jobs,
        output=output,
        source_bytes=source,
        output_bytes=out_bytes,
        output_exact=exact,
        layers=len(plan.targets) if plan is not None else None,
        largest=largest,
        memory_bytes=memory,
        memory_note=note,
        hub=hub,
    )
