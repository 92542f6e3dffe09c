#!/usr/bin/env python3
"""Groupwise W4A8 GEMM time per layer on x86: arm_int4's exact C kernel vs the path it replaced vs bf16.

Run: PYTHONPATH=. .venv/bin/python benchmarks/x86_w4a8_layers.py [--group 32] [--threads N]

Shapes: SmolLM2-135M's linears (576→960 qkv, 576→576 o, 576→3072 gate_up, 1536→576 down), summed
over its 30 layers, at 1 row (decode) and 128 rows (prefill). Columns:
- exact: x86_w4a8_gemm.gemm (the C kernel where it builds; bit-identical to vLLM's reference path);
- earlier: what X86W4A8LinearKernel ran for groupwise before it (≤ 2^-7 off the reference): torch's
  int4-packed GEMM below 16 rows, bf16 dequantized weights + one bf16 GEMM from 16 rows;
- bf16: a dense bf16 F.linear (what a BF16 model runs).
The GEMM alone (activation quantization, bias and casts excluded: they are the same ops either
way); the minimum of 200 (1 row) or 20 (128 rows) calls after 3 warm-ups, in µs.
"""

import argparse
import time

import torch

from arm_int4 import x86_w4a8, x86_w4a8_gemm

SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # (in, out)
LAYERS = 30


def best(f, n: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def time_layer(k: int, n: int, m: int, g: int) -> dict:
    """µs per call of each path for one [m, k] × [k, n] layer at group g."""
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    s = (torch.rand(n, k // g) * 0.02 + 1e-3).bfloat16()
    wp, wsum, sc = x86_w4a8_gemm.pack(w, s)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((w.int() + 8).contiguous(), 1)
    sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).contiguous()
    dense = (w.float() * s.float().repeat_interleave(g, 1)).bfloat16()
    x = torch.randn(m, k)
    q, zp, recip = x86_w4a8.quantize_rows(x)
    a, xb = (q.int() - zp).bfloat16(), x.bfloat16()

    def earlier():
        if m < 16:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(a, packed, g, sz)
        # the dequantization was part of every call
        return torch.nn.functional.linear(a, (w.view(n, k // g, g) * s.view(n, -1, 1)).view(n, k))

    calls = 200 if m == 1 else 20
    return {
        "exact": best(lambda: x86_w4a8_gemm.gemm(q, zp, recip, wp, wsum, sc), calls),
        "earlier": best(earlier, calls),
        "bf16": best(lambda: torch.nn.functional.linear(xb, dense), calls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}; groupwise GEMM: {x86_w4a8_gemm.backend()}")
    total: dict = {}
    for k, n in SHAPES:
        for m in (1, 128):
            row = time_layer(k, n, m, args.group)
            for name, us in row.items():
                total[(m, name)] = total.get((m, name), 0.0) + us * LAYERS
            print(f"{k}->{n} rows {m}: " + ", ".join(f"{name} {us:.1f} µs" for name, us in row.items()))
    for m in (1, 128):
        line = ", ".join(f"{name} {us / 1000:.2f} ms" for (mm, name), us in total.items() if mm == m)
        print(f"rows {m}, {LAYERS} layers: {line}")


if __name__ == "__main__":
    main()
