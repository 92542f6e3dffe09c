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

The MSE search is vectorized and makes one pass over the weight: for a block of rows it evaluates
every shrink step in one tensor ([steps, rows, groups, G], sized to stay in cache), then replays
llmcompressor's step-by-step loop (improve per row/group, global early stop after `patience` steps
without any improvement) on the error table, so the chosen min/max are the ones the loop would
choose (the steps after an early stop are computed and not used). Wide channelwise bf16 rows
compute each distinct value's error terms once (_table_errors).
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
_CHUNK_ELEMENTS = 1 << 19  # [steps, block] error terms per MSE block: within L2/L3, few torch calls
_TABLE_ELEMENTS = 1 << 20  # [steps, block, cols] gathered terms per block of the table search
# rows at least this wide use the table: measured here (AVX-512, one thread) 1.4x faster at 14336 cols
# (Llama-3.1-8B's down_proj), no faster at 4096 (fewer repeats per distinct value)
_TABLE_MIN_COLS = 8192
_BOUNDS_MIN_COLS = 512  # fp32 math on bf16 rows: the bounded search (below, ~1.4k values per 4096)
_BOUNDS_ELEMENTS = 1 << 21  # [steps, block, cols] elements of x per block of the bounded search


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

    torch.sum(_fake_quant_error(x, scales.unsqueeze(-1), norm), dim=-1, out=out)


def _fake_quant_error(x, scales, norm):
    """|fake_quant(x) - x| ** norm for each step's scale: x [..., n], scales [steps, ..., 1 or n]
    → [steps, ..., n], element by element the ops (and dtypes) of llmcompressor's _calculate_error."""
    q = x.unsqueeze(0) / scales
    q.clamp_(INT4_MIN, INT4_MAX).round_()
    q.mul_(scales).sub_(x)
    return q.abs_().pow_(norm)


_small_tables: dict = {}


def _small_table(src, dtype, norm):
    """|v| ** norm in `dtype` for every magnitude v of the 16-bit dtype `src` (index: the bits
    without the sign): an element that rounds to 0 at every candidate scale errs by exactly |x|."""
    import torch

    key = (src, dtype, norm)
    if key not in _small_tables:
        v = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(src).to(dtype)
        _small_tables[key] = v.abs().pow_(norm)
    return _small_tables[key]


def _row_tables(xb, sb, norm):
    """The value tables of a block of channelwise bf16 rows: xb [R, cols] (bf16), sb [steps, R]
    (observer dtype) → (terms [steps, R, 2m], index [R, cols] into terms' last dim, small [R, cols],
    mag [R, cols]).

    A row of 14336 random-normal bf16 weights holds ~1.9k distinct values (4096: ~1.4k), so the
    candidates' error terms (pow, the cost) are computed per row on a table of the values present:
    its magnitudes (the bits without the sign) from its smallest non-small one to its largest, both
    signs. Each term is the element-by-element search's term for that value (the same
    ops on the same value). Values below 0.45 × the row's smallest candidate scale round to 0 at
    every candidate (|x / s| < 0.5): their term |x| ** norm does not depend on the candidate; they
    point one past the table (`small`) and their terms come from _small_table by magnitude."""
    import torch

    dtype = sb.dtype
    bits = xb.view(torch.int16).to(torch.int32)
    mag, neg = bits & 0x7FFF, bits < 0
    # small: |x| < t = 0.45 × the smallest scale (fp32; 0.45 (1 + 2^-8) < 0.5 leaves rounding no say),
    # tested on the bits: a bf16 magnitude below t's upper 16 bits (t truncated to bf16, ≤ t) is below t
    lo = (sb.amin(0).float() * 0.45).view(torch.int32) >> 16  # [R]
    small = mag < lo.unsqueeze(-1)
    hi = mag.amax(-1)
    m = max(1, int((hi - lo).amax()) + 1)  # magnitudes per sign in the widest row's table
    keys = (lo.unsqueeze(-1) + torch.arange(m)).clamp_(max=0x7FFF)
    values = torch.cat([keys, keys | 0x8000], dim=-1).to(torch.int16).view(xb.dtype).to(dtype)  # [R, 2m]
    terms = _fake_quant_error(values, sb.unsqueeze(-1), norm)
    index = torch.where(small, 2 * m, neg * m + mag - lo.unsqueeze(-1)).long()  # small: slot 2m, past the table
    return terms, index, small, mag


def _table_errors(x, scales, norm, out):
    """_errors for channelwise rows of bf16 weights, each distinct value of a row computed once
    (_row_tables), then gathered back into the row's own element order and summed there: the same
    terms, summed in the same order, as the element-by-element search.
    x [rows, cols] (bf16), scales [steps, rows] (observer dtype) → out [steps, rows]."""
    import torch

    steps, rows = scales.shape
    small_terms = _small_table(x.dtype, scales.dtype, norm)
    block = max(1, _TABLE_ELEMENTS // (steps * x.shape[-1]))  # rows per block: [steps, block, cols] terms
    for r0 in range(0, rows, block):
        xb = x[r0 : r0 + block]
        terms, index, small, mag = _row_tables(xb, scales[:, r0 : r0 + block], norm)
        terms = torch.cat([terms, terms.new_zeros((*terms.shape[:2], 1))], dim=-1)  # the small ones' slot: 0
        # the small elements' own terms, 0 elsewhere: added after the gather (v + 0 and 0 + v are exact)
        small_add = torch.where(small, small_terms[mag], 0)
        row_terms = torch.empty((steps, *xb.shape), dtype=scales.dtype)
        for i in range(steps):
            torch.gather(terms[i], 1, index, out=row_terms[i])
        row_terms.add_(small_add)
        torch.sum(row_terms, dim=-1, out=out[:, r0 : r0 + block])


def _improvements(err):
    """The loop's `improved` flags from exact errors [steps, ...]: err[i] < the best so far, which
    starts at the dtype's max and is the least error of the steps before (a NaN error never improves
    and never becomes the best)."""
    import torch

    e = torch.nan_to_num(err, nan=float("inf"), posinf=float("inf"))
    best = torch.full_like(e[:1], torch.finfo(err.dtype).max)
    before = torch.cat([best, e[:-1]]).cummin(0).values.minimum(best)
    return err < before


def _gamma(k: int) -> float:
    """Higham's gamma_k for fp32 (u = 2^-24): k roundings of nonnegative terms err by at most
    gamma_k × their exact sum, in any order of evaluation (Accuracy and Stability, 3.1 and 4.2)."""
    u = 2.0**-24
    return k * u / (1 - k * u)


def _bounded_improvements(x, scales, norm):
    """The loop's `improved` flags [steps, rows] for channelwise bf16 rows with fp32 observer math,
    without summing every row in fp32.

    Each candidate's error T is torch's fp32 sum of the row's n terms; the terms come exact from
    _row_tables, and S' = sum(count × term) over the table (plus the small elements' terms) in fp32
    is at most n + 2m + 1 roundings of nonnegative values away from their exact sum S, as T is n - 1:
    |T - S'| <= (gamma(n - 1) + gamma(n + 2m + 1)) S. Where the intervals of a step and of the best
    before it do not overlap, the comparison T_i < T_best is decided. Rows where two intervals
    overlap (~1% of 4096-wide random-normal rows; none of 14336-wide ones; measured) are summed in
    fp32 the loop's way."""
    import torch

    steps, rows = scales.shape
    cols = x.shape[-1]
    small_terms = _small_table(x.dtype, scales.dtype, norm)
    approx = torch.empty((steps, rows), dtype=torch.float32)
    rel = torch.empty(rows, dtype=torch.float64)
    block = max(1, _BOUNDS_ELEMENTS // (steps * cols))
    for r0 in range(0, rows, block):
        xb, sb = x[r0 : r0 + block], scales[:, r0 : r0 + block]
        terms, index, small, mag = _row_tables(xb, sb, norm)
        counts = torch.zeros((xb.shape[0], terms.shape[-1] + 1)).scatter_add_(1, index, torch.ones(index.shape))
        torch.sum(terms.mul_(counts[:, :-1]), dim=-1, out=approx[:, r0 : r0 + block])
        approx[:, r0 : r0 + block] += torch.where(small, small_terms[mag], 0).sum(-1)
        m2 = terms.shape[-1]
        g = _gamma(cols + m2 + 1)
        rel[r0 : r0 + block] = (_gamma(cols - 1) + g) / (1 - g)
    s = approx.double()
    width = s * rel
    hi, lo = s + width, s - width
    improved = torch.empty((steps, rows), dtype=torch.bool)
    improved[0] = True  # step 0 improves on the dtype's max (non-finite rows are redone below)
    ambiguous = ~s.isfinite().all(0)
    best = torch.zeros((1, rows), dtype=torch.int64)
    for i in range(1, steps):
        better, worse = hi[i] < lo.gather(0, best)[0], lo[i] >= hi.gather(0, best)[0]
        ambiguous |= ~(better | worse)
        improved[i] = better
        best[0, better] = i
    if ambiguous.any():  # these rows the loop's way: every step's fp32 sum
        err = torch.empty((steps, int(ambiguous.sum()), 1), dtype=scales.dtype)
        _errors(x[ambiguous].unsqueeze(1).to(scales.dtype), scales[:, ambiguous].unsqueeze(-1), norm, err)
        improved[:, ambiguous] = _improvements(err[..., 0])
    return improved


def _uses_table(x) -> bool:
    """Channelwise rows of bf16 weights (8 significant bits: few distinct values per row; fp16's
    11 bits make a table as long as the row)."""
    import torch

    return x.shape[1] == 1 and x.shape[2] >= _TABLE_MIN_COLS and x.dtype == torch.bfloat16


def _uses_bounds(x, dtype) -> bool:
    """Channelwise bf16 rows observed in fp32 (the learning path's precision). bf16 math rounds each
    error to bf16, so neighbouring candidates often tie: that one stays exact (_table_errors)."""
    import torch

    return x.shape[1] == 1 and x.shape[2] >= _BOUNDS_MIN_COLS and x.dtype == torch.bfloat16 and dtype == torch.float32


def mse_range(x, maxshrink=0.20, patience=5, grid=100.0, norm=2.4, cast=None):
    """llmcompressor's MSE grid search over shrink factors p = 1 - i/grid, i < maxshrink*grid.

    x [rows, groups, G] in the observer dtype, or in the source dtype with `cast` (the observer
    dtype; blocks are cast as they are processed, so no full-size copy is made). Returns (lo, hi).
    One pass over x: every candidate's error for a block of rows while it is in cache, then the
    loop's bookkeeping replayed on the [steps, rows, groups] error table."""
    import torch

    dtype = cast or x.dtype
    lo, hi = minmax_range(x)
    if cast is not None:
        lo, hi = lo.to(cast), hi.to(cast)
    steps = int(maxshrink * grid)
    rows, groups, g = x.shape
    best_step = torch.zeros(lo.shape, dtype=torch.int64)
    if steps > 0 and x.numel():
        # per-step scales: the same small ops as the loop (lo * p with p a Python float)
        scales = torch.stack([qparams(lo * (1 - i / grid), hi * (1 - i / grid)) for i in range(steps)])
        if _uses_bounds(x, dtype):
            improved = _bounded_improvements(x[:, 0], scales[..., 0], norm).unsqueeze(-1)
        else:
            err = torch.empty((steps, rows, groups), dtype=dtype)
            if _uses_table(x):
                _table_errors(x[:, 0], scales[..., 0], norm, err[..., 0])
            else:
                block = max(1, _CHUNK_ELEMENTS // (steps * groups * g))  # rows per block
                for r0 in range(0, rows, block):
                    xb = x[r0 : r0 + block]  # cast once per block (exact), reused by every step
                    xb = xb.to(cast) if cast is not None else xb
                    _errors(xb, scales[:, r0 : r0 + block], norm, err[:, r0 : r0 + block])
            improved = _improvements(err)
        stale = 0
        for i in range(steps):  # the loop's bookkeeping, step by step: improve per row, stop globally
            if torch.any(improved[i]):
                best_step[improved[i]] = i
                stale = 0
            else:
                stale += 1
                if stale >= patience:
                    break
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
