"""The stream engine: quantize a safetensors checkpoint tensor by tensor, several at once.

Each input shard maps to one output shard of the same name. A shard's output header is known
before any weight is read (int8 [out, in] + scale [out, 1] or [out, in/G] per quantized Linear,
everything else copied as is), so every tensor has its output offset up front: `jobs` threads
each take one tensor, read it (one positional read), quantize it and write it at its offset
(numpy and torch ops release the GIL: one intra-op thread per job); unquantized tensors are copied
file to file by the kernel (copy_file_range). Peak memory is `jobs` tensors and their
temporaries, not the model. Each quantized tensor is checked (int range, scales positive and
finite) from the values as they are written, so verification needs no second read.

Imports: the min-max observer runs on numpy alone (npmath), mse on torch (qmath); never
compressed-tensors or transformers: the config block is written here, equal to
compressed-tensors' ModelCompressor.update_config (tests/test_stream.py compares them).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .preflight import QuantPlan
from .safetensors_io import ShardReader, ShardWriter, TensorInfo

__all__ = [
    "run_stream",
    "StreamStats",
    "LayerCheck",
    "quant_config_block",
    "write_quant_config",
    "copy_side_files",
    "output_specs",
    "WEIGHT_SUFFIXES",
    "usable_cpus",
    "output_bytes",
    "memory_bound",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_REWRITTEN = {"config.json", "model.safetensors.index.json"}
# compressed-tensors QuantizationArgs fields, in the order model_dump gives them (sorted on write)
_ARG_DEFAULTS: dict = {
    "actorder": None,
    "block_structure": None,
    "group_size": None,
    "observer_kwargs": {},
    "scale_dtype": None,
}


@dataclass(frozen=True)
class LayerCheck:
    """What was written for one quantized Linear, checked in memory just before the write."""

    weight: str  # output tensor name (….weight)
    qmin: int
    qmax: int
    scales_ok: bool  # every scale > 0 and finite


@dataclass
class StreamStats:
    jobs: int
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    read_s: float = 0.0  # summed over jobs (thread time), not wall time
    observe_s: float = 0.0
    write_s: float = 0.0
    largest_tensor: int = 0
    checks: list[LayerCheck] = field(default_factory=list)
    shards: dict[str, list[TensorInfo]] = field(default_factory=dict)  # output file → its header
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, read_s: float, observe_s: float, write_s: float, check: LayerCheck | None) -> None:
        with self.lock:
            self.read_s += read_s
            self.observe_s += observe_s
            self.write_s += write_s
            if check:
                self.checks.append(check)

    def summary(self) -> str:
        mb = self.bytes_in / 1e6
        return (
            f"{mb:.0f} MB in {self.seconds:.1f} s ({mb / max(self.seconds, 1e-9):.0f} MB/s, {self.jobs} jobs); "
            f"thread time: read {self.read_s:.1f} s, observe+quantize {self.observe_s:.1f} s, "
            f"write/copy {self.write_s:.1f} s"
        )


def _scale_shape(info: TensorInfo, group_size: int | None) -> tuple[int, int]:
    rows, cols = info.shape
    return (rows, cols // group_size) if group_size else (rows, 1)


def output_specs(tensors: dict[str, TensorInfo], plan: QuantPlan, precision: str) -> list[TensorInfo]:
    """One output shard's header: quantized Linears become int8 + scale (fp32, or the weight's dtype);
    W4A16's become weight_packed (int32) + weight_shape + scale, as compressed-tensors packs them."""
    specs = []
    for t in sorted(tensors.values(), key=lambda t: t.begin):
        if t.name in plan.targets:
            out = plan.output_name(t.name)  # llmcompressor's name (Mixtral experts: w1 → gate_proj)
            scale_dtype = "F32" if precision == "fp32" else t.dtype
            if plan.scheme.format == "pack-quantized":  # W4A16: eight values per int32, and the shape
                specs.append(TensorInfo(out + "_packed", "I32", (t.shape[0], -(-t.shape[1] // 8))))
                specs.append(TensorInfo(out + "_shape", "I64", (2,)))
            else:
                specs.append(TensorInfo(out, "I8", t.shape))
            specs.append(TensorInfo(out + "_scale", scale_dtype, _scale_shape(t, plan.scheme_for(t.name).group_size)))
        else:
            specs.append(TensorInfo(t.name, t.dtype, t.shape))
    return specs


def output_bytes(plan: QuantPlan, precision: str) -> int:
    """Bytes of tensor data the stream engine will write for plan (headers and side files not counted)."""
    return sum(t.nbytes for ts in plan.checkpoint.shards.values() for t in output_specs(ts, plan, precision))


def memory_bound(jobs: int, largest_tensor: int) -> int:
    """The stream engine's memory goal: per job, the largest tensor twice (read + its quantized
    temporaries) and 1 GiB (docs/benchmarks.md measured peaks far under it)."""
    return jobs * (2 * largest_tensor + 2**30)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, licence…: every top-level non-weight file."""
    for f in src.iterdir():
        if f.is_file() and f.name not in _REWRITTEN and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def _ct_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("compressed-tensors")
    except md.PackageNotFoundError:  # written as a string only; vLLM does not read it
        return "0.17.0"


def _args_dict(args: dict | None) -> dict | None:
    if args is None:
        return None
    d = {**_ARG_DEFAULTS, **args}
    # compressed-tensors' validator: int8 zero points for asymmetric int args, none for symmetric
    d["zp_dtype"] = None if d["symmetric"] else "torch.int8"
    return d


def _config_groups(plan: QuantPlan) -> dict:
    """One group targeting every Linear; a mixed plan: a group per scheme (in the order of
    MixedScheme.parts) whose targets are its layers' module names."""
    parts = plan.scheme.parts
    targets: list[list[str]] = [["Linear"]] if len(parts) == 1 else [[] for _ in parts]
    if len(parts) > 1:
        for name in plan.targets:
            targets[parts.index(plan.scheme_for(name))].append(plan.output_name(name).removesuffix(".weight"))
    return {
        f"group_{i}": {
            "format": s.format,
            "input_activations": _args_dict(s.input_args()),
            "output_activations": None,
            "targets": sorted(t),
            "weights": _args_dict(s.weight_args()),
        }
        for i, (s, t) in enumerate(zip(parts, targets, strict=True))
    }


def quant_config_block(plan: QuantPlan) -> dict:
    """The quantization_config compressed-tensors writes for this plan (int- or pack-quantized)."""
    s = plan.scheme
    return {
        "config_groups": _config_groups(plan),
        "format": s.format,
        "global_compression_ratio": None,
        "ignore": list(plan.ignore if plan.config_ignore is None else plan.config_ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": _ct_version(),
    }


def write_quant_config(src_config: dict, plan: QuantPlan, dst: Path) -> None:
    """config.json = the source config + the quantization_config block, as update_config writes it."""
    config = {**src_config, "quantization_config": quant_config_block(plan)}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def uses_numpy(plan: QuantPlan) -> bool:
    """The min-max observer runs on numpy alone (npmath: no torch import); mse on torch (qmath)."""
    return all(p.observer == "minmax" for p in plan.scheme.parts)


def usable_cpus() -> int:
    """CPUs this process may keep busy: its affinity ∩ its cgroup's cpuset, capped by the cgroup's
    CPU quota (cpu.max, or cfs_quota_us on v1; floored: a thread past the quota is throttled each
    period). A 64-core box uses 64; a container given 4 of them, 4."""
    import math
    import os

    from ..sysfs import cgroup_cpu, parse_cpulist

    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    _, quota, cpuset = cgroup_cpu("/")
    if cpuset:
        cpus &= set(parse_cpulist(cpuset)) or cpus
    n = max(1, len(cpus))
    return min(n, max(1, math.floor(quota))) if quota else n


_scratch = threading.local()  # per job thread: buffers reused from tensor to tensor


def _buffer(name: str, nbytes: int) -> bytearray:
    """This thread's reusable buffer `name`, at least nbytes. A new buffer's pages are mapped (and
    zeroed) on first touch, which costs as much as the copy into them (more in a VM whose free
    memory was handed back to the host): reading every tensor into a fresh buffer touches the
    whole model's size in new pages; reusing one per thread touches the largest tensor's."""
    buf = getattr(_scratch, name, None)
    if buf is None or len(buf) < nbytes:
        buf = bytearray(nbytes)
        setattr(_scratch, name, buf)
    return buf


def _quantize_numpy(raw, info: TensorInfo, group_size: int | None, precision: str, packed: bool):
    import numpy as np

    from .npmath import pack_int4, quantize_minmax, widen

    out = np.frombuffer(_buffer("q", raw.size), dtype=np.int8)
    q, scale = quantize_minmax(raw, info.dtype, group_size, precision, out=out)
    values = widen(scale, "BF16") if scale.dtype == np.uint16 else scale  # bf16 scales come as bits
    check = (int(q.min()), int(q.max()), bool((values > 0).all() and np.isfinite(values).all()))
    tensors = [("_packed", pack_int4(q)), ("_shape", np.array(info.shape, dtype=np.int64))] if packed else [("", q)]
    return tensors + [("_scale", scale)], check


def _quantize_torch(value, w: dict, precision: str, packed: bool):
    import torch

    from .qmath import pack_int4, quantize_weight

    with torch.no_grad():
        q, scale = quantize_weight(value, w["group_size"], w["observer"], precision)  # scale: fp32 or value's
        qmin, qmax = (int(v) for v in torch.aminmax(q))
        check = (qmin, qmax, bool((scale > 0).all()) and bool(scale.isfinite().all()))
    tensors = [("_packed", pack_int4(q)), ("_shape", torch.tensor(value.shape))] if packed else [("", q)]
    return tensors + [("_scale", scale)], check


def _quantize_one(
    reader: ShardReader, writer: ShardWriter, info: TensorInfo, plan: QuantPlan, precision: str, stats: StreamStats, bar
) -> None:
    t0 = time.perf_counter()
    if info.name not in plan.targets:
        writer.copy(info.name, reader)
        stats.add(0.0, 0.0, time.perf_counter() - t0, None)
    else:
        w = plan.scheme_for(info.name).weight_args()
        packed = plan.scheme.format == "pack-quantized"  # W4A16: eight values per int32, and the shape
        numpy_path = w["observer"] == "minmax"
        value = reader.read_array(info.name, _buffer("read", info.nbytes)) if numpy_path else reader.read(info.name)
        t1 = time.perf_counter()
        if numpy_path:
            tensors, (qmin, qmax, scales_ok) = _quantize_numpy(value, info, w["group_size"], precision, packed)
        else:
            tensors, (qmin, qmax, scales_ok) = _quantize_torch(value, w, precision, packed)
        t2 = time.perf_counter()
        name = plan.output_name(info.name)
        for suffix, value in tensors:
            # a uint16 array from npmath holds bf16 bits (numpy has no bf16): the header says which
            writer.write(name + suffix, value, bf16_bits=suffix == "_scale")
        stats.add(t1 - t0, t2 - t1, time.perf_counter() - t2, LayerCheck(name, qmin, qmax, scales_ok))
    if bar is not None:
        bar.update(info.nbytes)


def run_stream(
    plan: QuantPlan, dst: Path, precision: str, jobs: int | None = None, progress: bool = True
) -> StreamStats:
    """Write the quantized checkpoint into dst (an empty dir). jobs: tensors at once (default: one
    per usable CPU); torch's intra-op threads are the usable CPUs shared among the jobs."""
    cpus = usable_cpus()
    jobs = cpus if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t_start = time.perf_counter()
    src = plan.checkpoint.path
    all_tensors = [t for ts in plan.checkpoint.shards.values() for t in ts.values()]
    stats = StreamStats(
        jobs=jobs,
        bytes_in=sum(t.nbytes for t in all_tensors),
        largest_tensor=max((t.nbytes for t in all_tensors), default=0),
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=stats.bytes_in, unit="B", unit_scale=True, desc="quantize", file=sys.stderr, leave=False)
    threads = None  # numpy's ufuncs are single-threaded: nothing to set
    if not uses_numpy(plan):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, cpus // jobs))  # jobs × intra-op threads ≤ the CPUs we may use
    readers, writers, weight_map = [], [], {}
    try:
        tasks = []
        for shard, tensors in plan.checkpoint.shards.items():
            specs = output_specs(tensors, plan, precision)
            reader = ShardReader(src / shard)
            readers.append(reader)
            writer = ShardWriter(dst / shard, specs, metadata=reader.metadata or {"format": "pt"})
            writers.append(writer)
            stats.shards[shard] = specs
            weight_map.update({s.name: shard for s in specs})
            # largest first: the pool's tail is short tensors, not one long one on one core
            tasks += [(reader, writer, t) for t in tensors.values()]
        tasks.sort(key=lambda x: -x[2].nbytes)
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="quantize")
        try:
            for fut in [pool.submit(_quantize_one, r, w, t, plan, precision, stats, bar) for r, w, t in tasks]:
                fut.result()
        except BaseException:  # Ctrl-C or a failed tensor: drop the queue; running tensors finish
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown()
        for w in writers:
            w.close()
        stats.bytes_out = sum(w.size for w in writers)
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        for f in readers + writers:
            f.discard() if isinstance(f, ShardWriter) else f.close()
        if bar:
            bar.close()
    if len(plan.checkpoint.shards) > 1 or (src / "model.safetensors.index.json").exists():
        total = sum(s.nbytes for specs in stats.shards.values() for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    copy_side_files(src, dst)
    write_quant_config(plan.checkpoint.config, plan, dst)
    stats.seconds = time.perf_counter() - t_start
    return stats
