"""Tensor-at-a-time safetensors reading and writing, without mmap.

safe_open maps the whole shard, so every tensor read stays resident (and counted in RSS) until
the shard is closed. Here each tensor is read with one readinto() into its own buffer, and an
output shard is written tensor by tensor after a header computed up front, so peak memory is a
few tensors, not a shard. Format: u64 little-endian header length, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TensorInfo", "ShardReader", "ShardWriter", "torch_dtype", "st_dtype", "DTYPE_BYTES"]

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
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
    """Reads one .safetensors file a tensor at a time (no mmap)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        (n,) = struct.unpack("<Q", self._f.read(8))
        header = json.loads(self._f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors = {
            k: TensorInfo(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()
        }

    def read(self, name: str):
        import torch

        info = self.tensors[name]
        buf = bytearray(info.end - info.begin)
        self._f.seek(self._data_start + info.begin)
        if self._f.readinto(buf) != len(buf):
            raise OSError(f"{self.path}: truncated while reading {name}")
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

    Tensors must then be written in exactly that order; the header is written first, so nothing
    needs to be held back. Offsets are laid out in the given order, as safetensors requires
    (contiguous, no gaps)."""

    def __init__(self, path: str | Path, specs: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order = []
        for s in specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
            self._order.append(s)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors does
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self.bytes_written = 8 + len(raw)

    def write(self, name: str, tensor) -> None:
        spec = self._order[self._next]
        if name != spec.name:
            raise RuntimeError(f"internal: expected tensor {spec.name}, got {name}")
        if st_dtype(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"internal: {name} is {tensor.dtype}{tuple(tensor.shape)}, header says {spec.dtype}{spec.shape}"
            )
        import torch

        t = tensor.contiguous().reshape(-1)
        if t.numel():
            # a byte view works for every dtype, bfloat16 included (numpy has no bf16); no copy
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1
        self.bytes_written += spec.nbytes

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.close()
            raise RuntimeError(f"internal: {self.path} closed after {self._next}/{len(self._order)} tensors")
        self._f.flush()
        self._f.close()
