"""The INT4 math the stream engine needs, carried from compressed-tensors 0.19 / llmcompressor 0.14.

`import compressed_tensors` costs ~5 s here (it imports transformers, accelerate and
torch.distributed); the stream engine needs four small functions of it. They are copied here,
operation for operation, for symmetric INT4 weights (channel or group strategy):

  qparams           compressed-tensors calculate_qparams (symmetric): scale = max(|min|, |max|) / 7.5,
                    zeros replaced by the dtype's eps; the zero point is 0 and is not stored
  quantize_int4     compressed-tensors quantize(..., dtype=int8): round(clamp(x / scale, -8, 7))
  minmax / mse      llmcompressor's weight observers (observers/min_max.py, mse.py + mse_quant.py)

Every operation runs in the dtype it runs in there (the observed tensor's), so results are equal
bit for bit; tests/test_qmath.py compares them with compressed-tensors on many shapes and dtypes.
Adding the zero point (0) is left out: x + 0 only turns -0.0 into +0.0, which neither round(),
the int8 cast nor |q - x| can tell apart.

The MSE search is vectorized: for a block of rows it evaluates many shrink steps in one tensor
([steps, rows, groups, G], sized to stay in cache), then replays llmcompressor's step-by-step
loop (improve per row/group, global early stop after `patience` steps without any improvement)
on the error table, so the chosen min/max are the ones the loop would choose.
"""

from __future__ import annotations

__all__ = [
    "MSE_DEFAULTS",
    "INT4_MIN",
    "INT4_MAX",
    "grouped",
    "qparams",
    "quantize_int4",
    "minmax_range",
    "mse_range",
    "quantize_weight",
    "pack_int4",
]

INT4_MIN, INT4_MAX = -8, 7
# llmcompressor 0.14 MovingAverageMSEObserver defaults (observer_kwargs override them there).
MSE_DEFAULTS = {"maxshrink": 0.20, "patience": 5, "grid": 100.0, "norm": 2.4}
_CHUNK_ELEMENTS = 1 << 15  # elements of x per MSE block and step: [steps, block] stays within L2


def grouped(weight, group_size: int | None):
    """[rows, cols] → [rows, groups, G] (channelwise: one group of all cols). A view."""
    return weight.unsqueeze(-2) if not group_size else weight.unflatten(-1, (-1, group_size))


def qparams(lo, hi):
    """calculate_qparams, symmetric INT4: scale [rows, groups] in lo's dtype."""
    import torch

    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    max_pos = torch.max(torch.abs(lo), torch.abs(hi))
    bit_range = torch.tensor(float(INT4_MAX)) - torch.tensor(float(INT4_MIN))  # fp32, as calculate_range
    scale = max_pos / (bit_range.to(max_pos.dtype) / 2)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)


def quantize_int4(x, scale):
    """x [rows, groups, G], scale [rows, groups] → int8 [rows, groups, G] holding -8…7."""
    import torch

    scaled = x / scale.unsqueeze(-1)
    scaled.clamp_(INT4_MIN, INT4_MAX).round_()
    return scaled.to(torch.int8)


def minmax_range(x):
    import torch

    return torch.amin(x, dim=-1), torch.amax(x, dim=-1)


def _errors(x, scales, norm, out):
    """sum(|fake_quant(x) - x| ** norm) over G for each step's scale: x [r, g, G], scales
    [steps, r, g] → out [steps, r, g]; each step exactly as llmcompressor's _calculate_error."""
    import torch

    q = x.unsqueeze(0) / scales.unsqueeze(-1)
    q.clamp_(INT4_MIN, INT4_MAX).round_()
    q.mul_(scales.unsqueeze(-1)).sub_(x)
    q.abs_().pow_(norm)
    torch.sum(q, dim=-1, out=out)


def mse_range(x, maxshrink=0.20, patience=5, grid=100.0, norm=2.4, cast=None):
    """llmcompressor's MSE grid search over shrink factors p = 1 - i/grid, i < maxshrink*grid.

    x [rows, groups, G] in the observer dtype, or in the source dtype with `cast` (the observer
    dtype; blocks are cast as they are processed, so no full-size copy is made). Returns (lo, hi)."""
    import torch

    dtype = cast or x.dtype
    lo, hi = minmax_range(x)
    if cast is not None:
        lo, hi = lo.to(cast), hi.to(cast)
    steps = int(maxshrink * grid)
    rows, groups, g = x.shape
    block = max(1, _CHUNK_ELEMENTS // max(1, groups * g))  # rows per block
    best_err = torch.full_like(lo, torch.finfo(dtype).max)
    best_step = torch.zeros(lo.shape, dtype=torch.int64)
    stale, done, step0 = 0, False, 0
    step_block = max(patience, 1) * 2  # steps evaluated per pass; the replay may stop inside it
    while step0 < steps and not done:
        idx = list(range(step0, min(steps, step0 + step_block)))
        # per-step scales: the same small ops as the loop (lo * p with p a Python float)
        scales = torch.stack([qparams(lo * (1 - i / grid), hi * (1 - i / grid)) for i in idx])
        err = torch.empty((len(idx), rows, groups), dtype=dtype)
        for r0 in range(0, rows, block):
            xb = x[r0 : r0 + block]  # cast once per block (exact), reused by every step
            _errors(xb.to(cast) if cast is not None else xb, scales[:, r0 : r0 + block], norm, err[:, r0 : r0 + block])
        for j, i in enumerate(idx):  # the loop's bookkeeping, step by step
            improved = err[j] < best_err
            if torch.any(improved):
                best_err[improved] = err[j][improved]
                best_step[improved] = i
                stale = 0
            else:
                stale += 1
                if stale >= patience:
                    done = True
                    break
        step0 += len(idx)
    # best_min = min_val * p of the best step (p = 1 at step 0: min_val itself, as initialised)
    best_lo = torch.empty_like(lo)
    best_hi = torch.empty_like(hi)
    for i in best_step.unique().tolist():
        sel = best_step == i
        best_lo[sel] = (lo * (1 - i / grid))[sel]
        best_hi[sel] = (hi * (1 - i / grid))[sel]
    return best_lo, best_hi


def quantize_weight(weight, group_size: int | None, observer: str, precision: str, observer_kwargs: dict | None = None):
    """One Linear weight [rows, cols] → (int8 [rows, cols] holding -8…7, scale [rows, groups]).

    precision "fp32": observer math and scale in fp32 (the learning path casts its model to fp32;
    the cast is exact); "weight": in the weight's own dtype."""
    import torch

    cast = torch.float32 if precision == "fp32" and weight.dtype != torch.float32 else None
    x = grouped(weight, group_size)
    if observer == "minmax":
        lo, hi = minmax_range(x)  # min/max are exact in any dtype: cast the small result
        if cast is not None:
            lo, hi = lo.to(cast), hi.to(cast)
    elif observer == "mse":
        lo, hi = mse_range(x, cast=cast, **{**MSE_DEFAULTS, **(observer_kwargs or {})})
    else:
        raise ValueError(f"observer {observer!r} is not supported by the stream engine")
    scale = qparams(lo, hi)
    q = torch.empty(x.shape, dtype=torch.int8)
    rows = x.shape[0]
    block = max(1, (1 << 16) // max(1, x.shape[1] * x.shape[2]))  # rows per block: temporaries stay in cache
    for r0 in range(0, rows, block):
        # bf16 x / fp32 scale computes in fp32 from the exact upcast: the cast itself is not needed
        q[r0 : r0 + block] = quantize_int4(x[r0 : r0 + block], scale[r0 : r0 + block])
    return q.reshape(weight.shape), scale


def pack_int4(q):
    """compressed-tensors pack_to_int32(q, 4): int8 [rows, cols] in [-8, 7] → int32 [rows, ceil(cols/8)],
    value + 8 in each nibble, column 8k+i in bits 4i..4i+3 (the top nibble may set the sign bit)."""
    import torch

    rows, cols = q.shape
    u = (q + 8).to(torch.uint8)
    pad = -cols % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.view(rows, -1, 8).to(torch.int32)
    out = u[..., 0].clone()
    for i in range(1, 8):
        out |= u[..., i] << (4 * i)
    return out
