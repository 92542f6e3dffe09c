"""Tensor-at-a-time safetensors reading and writing, without mmap.

safe_open maps the whole shard, so every tensor read stays resident (and counted in RSS) until
the shard is closed. Here each tensor is read with one positional read into its own buffer, and
an output shard's header is computed up front, so each tensor is written at its own offset (from
any thread, in any order) and peak memory is a few tensors, not a shard.
Format: u64 little-endian header length, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TensorInfo", "ShardReader", "ShardWriter", "torch_dtype", "st_dtype", "DTYPE_BYTES"]

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


def torch_dtype(st: str):
    import torch

    return getattr(torch, _TORCH_NAMES[st])


def st_dtype(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for k, v in _TORCH_NAMES.items():
        if v == name:
            return k
    raise ValueError(f"dtype {dtype} has no safetensors name")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets inside the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


class ShardReader:
    """Reads one .safetensors file a tensor at a time (no mmap). Thread-safe: each read is one
    positional read (os.preadv) into the tensor's own buffer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 (held by the reader; closed by close()/__exit__)
        (n,) = struct.unpack("<Q", self._f.read(8))
        if n > os.fstat(self._f.fileno()).st_size - 8:
            self._f.close()
            raise ValueError(f"header length {n} is past the end of the file: cut short, or not a safetensors file")
        header = json.loads(self._f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors = {k: TensorInfo(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}

    def fileno(self) -> int:
        return self._f.fileno()

    def read_bytes(self, name: str, into: bytearray | None = None):
        """Tensor `name`'s stored bytes, with one positional read (os.preadv): into a new buffer, or
        into the start of `into` (a reused buffer: its pages are already mapped), returning that view."""
        info = self.tensors[name]
        buf = memoryview(into)[: info.end - info.begin] if into is not None else bytearray(info.end - info.begin)
        view, pos = memoryview(buf), self.data_start + info.begin
        while view:
            n = os.preadv(self._f.fileno(), [view], pos)
            if n <= 0:
                raise OSError(f"{self.path}: truncated while reading {name}")
            view, pos = view[n:], pos + n
        return buf

    def read_array(self, name: str, into: bytearray | None = None):
        """Tensor `name` as a numpy array of its stored bits (BF16 as uint16: numpy has no bf16),
        in a new buffer or in `into` (valid until `into` is reused)."""
        import numpy as np

        from .npmath import NUMPY_DTYPES

        info = self.tensors[name]
        return np.frombuffer(self.read_bytes(name, into), dtype=NUMPY_DTYPES[info.dtype]).reshape(info.shape)

    def read(self, name: str):
        """Tensor `name` as a torch tensor."""
        import torch

        info = self.tensors[name]
        buf = self.read_bytes(name)
        if not buf:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes a .safetensors file whose tensor list (names, dtypes, shapes) is known up front.

    The header (offsets laid out in the given order, contiguous, as safetensors requires) is
    written first; each tensor then goes to its own offset with positional writes, in any order
    and from any thread. close() checks that every tensor was written exactly once."""

    def __init__(self, path: str | Path, specs: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._at: dict[str, tuple[int, TensorInfo]] = {}
        for s in specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            self._at[s.name] = (offset, s)
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
        self._data_start = 8 + len(raw)
        self.size = self._data_start + offset  # the file's final size in bytes
        self._f = open(self.path, "wb")  # noqa: SIM115 (held by the writer; closed by close()/__exit__)
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._f.flush()
        self._f.truncate(self.size)
        self._written: set[str] = set()
        self._lock = threading.Lock()

    def _claim(self, name: str, dtype: str, shape: tuple) -> int:
        offset, spec = self._at.get(name, (None, None))
        if spec is None or offset is None:
            raise RuntimeError(f"internal: {name} is not in {self.path.name}'s header")
        if dtype != spec.dtype or tuple(shape) != spec.shape:
            raise RuntimeError(f"internal: {name} is {dtype}{tuple(shape)}, header says {spec.dtype}{spec.shape}")
        with self._lock:
            if name in self._written:
                raise RuntimeError(f"internal: {name} written twice")
            self._written.add(name)
        return self._data_start + offset

    def write(self, name: str, tensor, bf16_bits: bool = False) -> None:
        """Write a torch tensor or a numpy array (its dtype must be the header's) at its offset;
        with bf16_bits, a numpy uint16 array holds bf16 values' bits (numpy has no bf16)."""
        if hasattr(tensor, "__array_interface__"):  # numpy: no torch import
            from .npmath import NUMPY_DTYPES

            names = [k for k, v in NUMPY_DTYPES.items() if v == tensor.dtype and k != "BF16"]
            dtype = "BF16" if bf16_bits and tensor.dtype == "uint16" else names[0] if names else str(tensor.dtype)
            pos = self._claim(name, dtype, tuple(tensor.shape))
            view = memoryview(tensor.reshape(-1).view("u1")) if tensor.size else memoryview(b"")
        else:
            import torch

            pos = self._claim(name, st_dtype(tensor.dtype), tuple(tensor.shape))
            t = tensor.contiguous().reshape(-1)
            # a byte view works for every dtype, bfloat16 included (numpy has no bf16); no copy
            view = memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        while view:
            n = os.pwrite(self._f.fileno(), view, pos)
            view, pos = view[n:], pos + n

    def copy(self, name: str, reader: ShardReader) -> None:
        """Copy tensor `name` from reader's file unchanged, kernel to kernel (copy_file_range)."""
        info = reader.tensors[name]
        pos = self._claim(name, info.dtype, info.shape)
        src, left = reader.data_start + info.begin, info.end - info.begin
        while left:
            n = os.copy_file_range(reader.fileno(), self._f.fileno(), left, src, pos)
            if n <= 0:
                raise OSError(f"{reader.path}: truncated while copying {name}")
            src, pos, left = src + n, pos + n, left - n

    def discard(self) -> None:
        """Close without the completeness check (a failed or interrupted run; idempotent)."""
        self._f.close()

    def close(self) -> None:
        missing = len(self._at) - len(self._written)
        self._f.close()
        if missing:
            raise RuntimeError(f"internal: {self.path} closed with {missing} of {len(self._at)} tensors unwritten")
