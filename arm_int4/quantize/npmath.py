"""Min-max INT4 quantization in numpy: the stream engine's path that needs no torch.

`import torch` is ~1 s of a ~2 s run on a 250M-parameter model; for the min-max observer numpy
does the same operations on the same values, so the stream engine runs it without importing torch:

  widen           bf16 → fp32 is exact: the 16 stored bits become the high half of the fp32 word
                  (fp16 and fp32 are widened/kept by numpy, also exactly)
  minmax + qparams  min/max per row or group (exact in any dtype), then qparams.qparams' steps in
                  fp32: scale = max(|min(lo, 0)|, |max(hi, 0)|) / 7.5, a zero scale → fp32 eps
  quantize        x / scale (IEEE fp32 division, as torch's), clamp to [-8, 7], round half to
                  even (np.rint = torch.round), → int8
  bf16 / fp16 math  (observer precision "weight") torch computes each bf16 op in fp32 and rounds
                  the result to bf16 (nearest, ties to even): so does bf16_round here; numpy's
                  own fp16 ops do the same for fp16

tests/test_npmath.py compares every output with qmath (torch, itself compared with
compressed-tensors) on many shapes, dtypes and edge values.
"""

from __future__ import annotations

import numpy as np

from .qmath import INT4_MAX, INT4_MIN

__all__ = ["NUMPY_DTYPES", "widen", "bf16_round", "quantize_minmax", "pack_int4"]

# safetensors dtype → the numpy dtype holding its bits (bf16: raw uint16, widened by `widen`)
NUMPY_DTYPES = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I8": np.int8,
    "U8": np.uint8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "F64": np.float64,
    "BOOL": np.bool_,
}
_BLOCK_ELEMENTS = 1 << 16  # rows per block × cols: the fp32 temporaries stay in L2
_EPS = np.finfo(np.float32).eps
_HALF_RANGE = np.float32(float(INT4_MAX - INT4_MIN) / 2)  # calculate_range's 15.0 / 2, in fp32


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits → fp32 values, exactly."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32"):
        return raw.astype(np.float32, copy=False)
    raise ValueError(f"the numpy path takes BF16/F16/F32 weights, not {dtype}")


def bf16_round(x: np.ndarray) -> np.ndarray:
    """fp32 → the nearest bf16 value (ties to even), kept in fp32: what torch does after every
    bf16 op on CPU (it computes in fp32, then rounds). Finite inputs only."""
    b = x.view(np.uint32)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return b.view(np.float32)


def _scales(x: np.ndarray, dtype: str) -> np.ndarray:
    """x [rows, groups, G] (fp32 values of the observer dtype) → scale [rows, groups], qmath.qparams
    on min/max in that dtype: fp32 ("F32"), or each op rounded to bf16 ("BF16") or fp16 ("F16")."""
    lo = np.minimum(x.min(axis=-1), np.float32(0))
    hi = np.maximum(x.max(axis=-1), np.float32(0))
    max_pos = np.maximum(np.abs(lo), np.abs(hi))  # exact in any dtype
    if dtype == "F16":
        scale = max_pos.astype(np.float16) / np.float16(_HALF_RANGE)  # numpy's fp16 op: fp32, then round
        scale[scale == 0] = np.finfo(np.float16).eps
        return scale
    scale = max_pos / _HALF_RANGE
    if dtype == "BF16":
        scale = bf16_round(scale)
        scale[scale == 0] = np.float32(2.0**-7)  # torch.finfo(torch.bfloat16).eps
    else:
        scale[scale == 0] = _EPS
    return scale


def quantize_minmax(
    raw: np.ndarray, dtype: str, group_size: int | None, precision: str = "fp32", out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One Linear weight's stored bits [rows, cols] → (int8 [rows, cols] in -8…7, scale [rows,
    groups]), min-max observer; row blocks keep the temporaries small. precision "fp32": fp32 math
    and scale (the learning path's); "weight": the math of the weight's dtype, scale in it (bf16 as
    its uint16 bits). The int8 values go to `out` (≥ rows·cols int8, reused) when given."""
    rows, cols = raw.shape
    g = group_size or cols
    math = "F32" if precision == "fp32" else dtype
    q = np.empty((rows, cols), dtype=np.int8) if out is None else out[: rows * cols].reshape(rows, cols)
    scale = np.empty((rows, cols // g), dtype=np.float16 if math == "F16" else np.float32)
    block = max(1, _BLOCK_ELEMENTS // cols)
    for r0 in range(0, rows, block):
        x = widen(raw[r0 : r0 + block], dtype).reshape(-1, cols // g, g)
        s = _scales(x, math)
        if math == "F16":
            x = raw[r0 : r0 + block].reshape(-1, cols // g, g) / s[..., None]  # fp16 ÷ fp16, rounded to fp16
        else:
            x = x / s[..., None]  # a new fp32 array (bf16's widened view is shared with nothing)
            if math == "BF16":
                x = bf16_round(x)
        np.clip(x, INT4_MIN, INT4_MAX, out=x)
        np.rint(x, out=x)
        q[r0 : r0 + block] = x.reshape(-1, cols)  # exact: integers in -8…7
        scale[r0 : r0 + block] = s
    if math == "BF16":
        scale = (scale.view(np.uint32) >> np.uint32(16)).astype(np.uint16)  # exact: low halves are 0
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """qmath.pack_int4 in numpy: int8 [rows, cols] in -8…7 → int32 [rows, ceil(cols / 8)], value + 8
    in each nibble, column 8k+i in bits 4i…4i+3."""
    rows, cols = q.shape
    u: np.ndarray = (q.astype(np.int16) + 8).astype(np.uint32)
    pad = -cols % 8
    if pad:
        u = np.pad(u, ((0, 0), (0, pad)))
    u = u.reshape(rows, -1, 8)
    out = u[..., 0].copy()
    for i in range(1, 8):
        out |= u[..., i] << np.uint32(4 * i)
    return out.view(np.int32)
