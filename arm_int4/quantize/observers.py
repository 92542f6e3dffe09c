"""Weight observers with llmcompressor 0.14's math, one tensor at a time: the step-by-step reference.

The stream engine runs qmath.py (same results, vectorized, no compressed-tensors import); this
module calls compressed-tensors itself and loops as llmcompressor does, and tests/test_qmath.py
holds qmath to it bit for bit.

llmcompressor's weight path (observers/base.py, min_max.py, mse.py, mse_quant.py):
  observed = weight reshaped to (1, rows, 1, cols) per channel or (1, rows, cols/G, G) per group
  minmax:  min/max over dims (0, -1)
  mse:     grid search over shrink factors p = 1 - i/grid, i < maxshrink*grid (0.2*100 = 20
           steps), error = sum(|fake_quant(x) - x| ** norm) with norm 2.4, early stop after
           `patience` (5) steps without improvement in any row/group
  then compressed-tensors' calculate_qparams (symmetric: scale = max|.| / 7.5 for int4) and, at
  save time, quantize() to int8 storage. Everything runs in the weight's own dtype, as there.
The same compressed-tensors functions (calculate_qparams, fake_quantize, quantize) are called,
so the math is shared, not re-derived; tests compare with llmcompressor bit for bit.
"""

from __future__ import annotations

__all__ = ["MSE_DEFAULTS", "observe", "quantize_weight"]

# llmcompressor 0.14 MovingAverageMSEObserver defaults (observer_kwargs override them there).
MSE_DEFAULTS = {"maxshrink": 0.20, "patience": 5, "grid": 100.0, "norm": 2.4}


def _flatten(weight, args):
    if args.strategy == "channel":
        return weight.unsqueeze(-2).unsqueeze(0)  # (1, rows, 1, cols)
    return weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)  # (1, rows, groups, G)


def _mse_min_max(observed, args, maxshrink, patience, grid, norm):
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    token_args = args.model_copy(update={"strategy": "token"})
    min_val = torch.amin(observed, dim=(0, -1))
    max_val = torch.amax(observed, dim=(0, -1))
    best_error = torch.full_like(min_val, torch.finfo(min_val.dtype).max)
    best_min, best_max = min_val.clone(), max_val.clone()
    stale = 0
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        lo, hi = min_val * p, max_val * p
        scale, zp = calculate_qparams(min_vals=lo, max_vals=hi, quantization_args=args, global_scale=None)
        q = fake_quantize(observed, scale.unsqueeze(-1), zp.unsqueeze(-1), token_args).to(observed.dtype)
        err = torch.sum((q - observed).abs().pow(norm), dim=(0, -1))
        improved = err < best_error
        if torch.any(improved):
            best_error[improved] = err[improved]
            best_min[improved] = lo[improved]
            best_max[improved] = hi[improved]
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_min, best_max


def observe(weight, args):
    """(scale, zero_point) for one weight [rows, cols]; scale is [rows, 1] or [rows, cols/G]."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    with torch.no_grad():
        observed = _flatten(weight, args)
        if args.observer == "mse":
            opts = {**MSE_DEFAULTS, **(args.observer_kwargs or {})}
            lo, hi = _mse_min_max(observed, args, opts["maxshrink"], opts["patience"], opts["grid"], opts["norm"])
        elif args.observer == "minmax":
            lo, hi = torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))
        else:
            raise ValueError(f"observer {args.observer!r} is not supported by the stream engine")
        return calculate_qparams(min_vals=lo, max_vals=hi, quantization_args=args, global_scale=None)


def quantize_weight(weight, args, precision: str):
    """(int8 tensor holding int4 values [rows, cols], scale).

    precision "fp32": the weight is cast to fp32 first (exact), as the learning path casts its
    model, so the observer math and the scale are fp32; "weight": both in the weight's dtype."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import quantize

    if precision == "fp32":
        weight = weight.float()
    scale, zero_point = observe(weight, args)
    with torch.no_grad():
        q = quantize(x=weight, scale=scale, zero_point=zero_point, args=args, dtype=torch.int8)
    return q, scale.to(weight.dtype)
