"""arm_int4.quantize.qmath (the stream engine's copy of compressed-tensors' INT4 math and of
llmcompressor's observers) against compressed-tensors itself, bit for bit, on many shapes and
dtypes; and the vectorized MSE search against the step-by-step loop, early stop included."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from arm_int4.quantize import observers, qmath

SHAPES = [(1, 32), (3, 64), (7, 96), (64, 256), (256, 512), (130, 1024), (576, 576), (33, 4096)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GROUPS = [None, 32, 64, 128]


def _args(group, observer="minmax", **kw):
    return QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=True,
        dynamic=False,
        strategy="group" if group else "channel",
        group_size=group,
        observer=observer,
        observer_kwargs=kw,
    )


def _weight(shape, dtype, seed, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "outliers":  # heavy tails, zero rows and exact zeros: the MSE search's hard cases
        w[:, ::7] *= 40
        w[0] = 0
        w[-1, : shape[1] // 2] = 0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
def test_qparams_and_quantize_equal_compressed_tensors(dtype, group):
    for i, shape in enumerate(SHAPES):
        if group and shape[1] % group:
            continue
        for kind in ("normal", "outliers"):
            w = _weight(shape, dtype, i, kind)
            args = _args(group)
            x = qmath.grouped(w, group)
            lo, hi = qmath.minmax_range(x)
            ref_scale, ref_zp = calculate_qparams(lo, hi, args)
            scale = qmath.qparams(lo, hi)
            assert scale.dtype == ref_scale.dtype == dtype and torch.equal(scale, ref_scale), (shape, kind)
            ref_q = quantize(x=w, scale=ref_scale, zero_point=ref_zp, args=args, dtype=torch.int8)
            assert torch.equal(qmath.quantize_int4(x, scale).reshape(w.shape), ref_q), (shape, kind)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
def test_fake_quant_error_equals_llmcompressors(dtype, group):
    """One step of the search: sum(|fake_quantize(x) - x| ** 2.4) per row/group."""
    for i, shape in enumerate(SHAPES[:6]):
        if group and shape[1] % group:
            continue
        w = _weight(shape, dtype, 100 + i, "outliers")
        args = _args(group, "mse")
        x = qmath.grouped(w, group)
        lo, hi = qmath.minmax_range(x)
        scale, zp = calculate_qparams(lo * 0.9, hi * 0.9, args)
        observed = x.unsqueeze(0)
        token = args.model_copy(update={"strategy": "token"})
        q = fake_quantize(observed, scale.unsqueeze(-1), zp.unsqueeze(-1), token).to(dtype)
        ref = torch.sum((q - observed).abs().pow(2.4), dim=(0, -1))
        out = torch.empty((1, *scale.shape), dtype=dtype)
        qmath._errors(x, scale.unsqueeze(0), 2.4, out)
        assert torch.equal(out[0], ref), shape


def _reference(w, group, observer, precision, **kw):
    """The step-by-step path: observers.py (compressed-tensors' functions, llmcompressor's loop)."""
    q, s = observers.quantize_weight(w, _args(group, observer, **kw), precision)
    return q, s.reshape(w.shape[0], -1)


@pytest.mark.parametrize("precision", ["fp32", "weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_quantize_weight_equals_the_step_by_step_path(observer, dtype, precision):
    if dtype == torch.float32 and precision == "weight":
        pytest.skip("an fp32 weight observed in its own dtype is the fp32 case")
    for i, shape in enumerate(SHAPES if observer == "minmax" else SHAPES[:5]):
        for group in (None, 32, 128):
            if group and shape[1] % group:
                continue
            w = _weight(shape, dtype, 200 + i, "outliers" if i % 2 else "normal")
            q, s = qmath.quantize_weight(w, group, observer, precision)
            rq, rs = _reference(w, group, observer, precision)
            assert s.dtype == rs.dtype and torch.equal(s, rs), (shape, group)
            assert torch.equal(q, rq), (shape, group)


def test_mse_early_stop_is_the_loops():
    """Cases where the early stop decides the result (patience 5 and 100 choose differently):
    the vectorized search stops where the loop stops."""
    decided = 0
    for seed in range(400):
        rows = 1 + seed % 3
        w = _weight((rows, 32), torch.float32, seed, "outliers" if seed % 2 else "normal")
        x = qmath.grouped(w, None)
        a = qmath.mse_range(x, patience=5)
        b = qmath.mse_range(x, patience=100)
        if torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]):
            continue
        decided += 1
        ref = observers._mse_min_max(x.unsqueeze(0), _args(None, "mse"), 0.2, 5, 100.0, 2.4)
        assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1]), seed
        if decided >= 10:
            break
    assert decided >= 3  # found real early-stop cases (4 in these 400 seeds), not only full searches


@pytest.mark.parametrize("shape", SHAPES + [(5, 7), (2, 9), (4, 33)], ids=str)
def test_pack_int4_equals_compressed_tensors(shape):
    """W4A16's packing (eight values per int32, pack-quantized) equal to compressed-tensors'
    pack_to_int32, every int in [-8, 7] present, columns not a multiple of 8 padded as there."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    q.view(-1)[:16] = torch.arange(-8, 8, dtype=torch.int8)[: q.numel()]
    ours = qmath.pack_int4(q)
    assert ours.dtype == torch.int32 and torch.equal(ours, pack_to_int32(q, 4))
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size(shape)), q)


@pytest.mark.parametrize("precision", ["fp32", "weight"])
def test_mse_value_table_equals_the_step_by_step_path(precision, monkeypatch):
    """The table search (wide channelwise bf16 rows: each distinct value's terms once, gathered back)
    gives the loop's scales: on a down_proj-wide row, and forced onto narrow rows with zero rows,
    exact zeros and outliers (the small/large split's edge cases)."""
    w = _weight((6, 14336), torch.bfloat16, 7, "outliers")
    assert qmath._uses_table(qmath.grouped(w, None))
    q, s = qmath.quantize_weight(w, None, "mse", precision)
    rq, rs = _reference(w, None, "mse", precision)
    assert torch.equal(s, rs) and torch.equal(q, rq)
    monkeypatch.setattr(qmath, "_TABLE_MIN_COLS", 32)
    for i, shape in enumerate(SHAPES[:6]):
        w = _weight(shape, torch.bfloat16, 300 + i, "outliers" if i % 2 else "normal")
        assert qmath._uses_table(qmath.grouped(w, None))
        q, s = qmath.quantize_weight(w, None, "mse", precision)
        rq, rs = _reference(w, None, "mse", precision)
        assert torch.equal(s, rs) and torch.equal(q, rq), shape


def test_mse_bounded_search_equals_the_step_by_step_path(monkeypatch):
    """fp32 math on channelwise bf16 rows (the learning path's): comparisons decided from error
    bounds, the overlapping rows summed the loop's way. Same scales as the loop on wide rows, with
    the bounds forced wide (every row summed) and forced onto narrow rows; and the bounds decide
    most rows (≈1% overlap on these, measured; a quarter would mean the bounds are not working)."""
    summed = []
    errors = qmath._errors
    monkeypatch.setattr(qmath, "_errors", lambda x, *a: summed.append(x.shape[0]) or errors(x, *a))
    for i, shape in enumerate([(96, 4096), (8, 14336)]):
        w = _weight(shape, torch.bfloat16, 400 + i, "outliers" if i else "normal")
        assert qmath._uses_bounds(qmath.grouped(w, None), torch.float32)
        q, s = qmath.quantize_weight(w, None, "mse", "fp32")
        rq, rs = _reference(w, None, "mse", "fp32")
        assert torch.equal(s, rs) and torch.equal(q, rq), shape
    assert sum(summed) < (96 + 8) / 4
    monkeypatch.setattr(qmath, "_gamma", lambda k: 0.5)  # every interval overlaps: rows summed
    w = _weight((16, 4096), torch.bfloat16, 402, "outliers")
    summed.clear()
    q, s = qmath.quantize_weight(w, None, "mse", "fp32")
    # all but row 0, all zeros: its errors are 0 with 0 width, decided exactly
    assert sum(summed) == 15 and torch.equal(s, _reference(w, None, "mse", "fp32")[1])
    monkeypatch.undo()
    monkeypatch.setattr(qmath, "_BOUNDS_MIN_COLS", 32)
    for i, shape in enumerate(SHAPES[:6]):
        w = _weight(shape, torch.bfloat16, 410 + i, "outliers" if i % 2 else "normal")
        q, s = qmath.quantize_weight(w, None, "mse", "fp32")
        rq, rs = _reference(w, None, "mse", "fp32")
        assert torch.equal(s, rs) and torch.equal(q, rq), shape
