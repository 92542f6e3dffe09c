"""arm_int4.quantize.npmath (the stream engine's torch-free min-max path) against qmath (torch,
itself compared with compressed-tensors in test_qmath.py), bit for bit, on many shapes, source
dtypes, group sizes and edge values."""

import numpy as np
import pytest
import torch

from arm_int4.quantize import npmath, qmath

SHAPES = [(1, 32), (3, 64), (7, 96), (64, 256), (256, 512), (130, 1024), (576, 576), (33, 4096), (2, 40)]
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
GROUPS = [None, 32, 64, 128]


def _weight(shape, dtype, seed, kind):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "edges":  # outliers, zero rows and zeros, one-signed rows, exact half-way quotients
        w[:, ::7] *= 40
        w[0] = 0
        w[-1, : shape[1] // 2] = 0
        if shape[0] > 2:
            w[1] = w[1].abs()  # min > 0: the zero clamp in qparams
            w[2] = -w[2].abs()
            w[2, 0] = -7.5  # scale 1.0 for its group: x / scale = -7.5, 2.5, 0.5… round half to even
            w[2, 1 : min(8, shape[1])] = torch.tensor([2.5, 0.5, -1.5, 3.5, -0.5, 6.5, -6.5])[: min(7, shape[1] - 1)]
    return w.to(dtype)


def _raw(w: torch.Tensor) -> np.ndarray:
    """The stored bits as the safetensors reader gives them to npmath (bf16 as uint16)."""
    return w.view(torch.int16).numpy().view(np.uint16) if w.dtype == torch.bfloat16 else w.numpy()


@pytest.mark.parametrize("precision", ["fp32", "weight"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("group", GROUPS)
def test_quantize_minmax_equals_qmath(precision, dtype, group):
    checked = 0
    for i, shape in enumerate(SHAPES):
        if group and shape[1] % group:
            continue
        for kind in ("normal", "edges"):
            w = _weight(shape, DTYPES[dtype], i, kind)
            ref_q, ref_scale = qmath.quantize_weight(w, group, "minmax", precision)
            q, scale = npmath.quantize_minmax(_raw(w), dtype, group, precision)
            assert q.dtype == np.int8, (shape, kind)
            assert np.array_equal(q, ref_q.numpy()), (shape, kind)
            # the scale's bits: fp32, fp16, or bf16 (npmath gives bf16 as its uint16 bits)
            assert np.array_equal(scale.view(f"u{scale.itemsize}"), _raw(ref_scale).view(f"u{scale.itemsize}"))
            # into a reused, larger buffer holding an earlier tensor's values
            out = np.full(w.numel() + 77, 99, dtype=np.int8)
            q2, _ = npmath.quantize_minmax(_raw(w), dtype, group, precision, out=out)
            assert np.shares_memory(q2, out) and np.array_equal(q2, ref_q.numpy()), (shape, kind)
            checked += 1
    assert checked >= 8  # every group size meets at least 4 shapes × 2 kinds (g128: 256…4096 columns)


def test_bf16_round_is_torchs():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(100_000, generator=g) * 10 ** torch.randint(-30, 30, (100_000,), generator=g)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.4e38])])  # ties
    ref = x.to(torch.bfloat16).float()
    assert np.array_equal(npmath.bf16_round(x.numpy().copy()).view(np.uint32), ref.numpy().view(np.uint32))


def test_widen_is_exact():
    w = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, -1.0e-40, float("inf"), 0.1], dtype=torch.float32)
    for dtype in ("BF16", "F16"):
        t = w.to(DTYPES[dtype])
        assert np.array_equal(npmath.widen(_raw(t), dtype).view(np.uint32), t.float().numpy().view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 8), (5, 16), (3, 13), (64, 4096), (7, 1)])
def test_pack_int4_equals_qmath(shape):
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = npmath.pack_int4(q.numpy())
    assert packed.dtype == np.int32 and np.array_equal(packed, qmath.pack_int4(q).numpy())
