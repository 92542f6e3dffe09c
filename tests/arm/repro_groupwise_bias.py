"""Minimal reproducer: groupwise INT4 + a bf16 bias -> wrong output from KleidiAI on Arm.

Run (on aarch64, torch 2.13.0):  python repro_groupwise_bias.py
This is what vLLM 0.32's Dynamic4bitLinearKernel does for a bf16 model with linear biases and
groupwise W4A8 weights: it packs with bf16 scales *and the bf16 bias*, then runs fp32 activations.
Prints JSON: the max abs error against x @ (q * scale).T + bias with a bf16 bias and an fp32 one.
"""

import json

import torch

torch.manual_seed(0)
N, K, G = 256, 512, 32  # out features, in features, group size
q = torch.randint(-8, 8, (N, K), dtype=torch.int8)  # int4 values stored as int8
scales = (0.01 + 0.02 * torch.rand(N, K // G)).to(torch.bfloat16)  # [N, K // G]
bias = ((torch.randint(0, 2, (N,)) * 2 - 1) * (1 + 2 * torch.rand(N))).to(torch.bfloat16)  # |b| in [1, 3]
x = torch.randn(8, K)

u = q.add(8)  # uint4 with zero point 8, two per byte, low nibble first (as vLLM packs)
w_u8 = (u[:, 1::2] << 4 | u[:, ::2]).to(torch.uint8)
ref = x.double() @ (q.double() * scales.double().repeat_interleave(G, 1)).T + bias.double()

result = {"torch": torch.__version__, "kleidiai": torch.backends.kleidiai.is_available()}
for name, b in (("bf16_bias", bias), ("fp32_bias", bias.float())):
    try:
        w = torch.ops.aten._dyn_quant_pack_4bit_weight(w_u8, scales, b, G, K, N)
        y = torch.ops.aten._dyn_quant_matmul_4bit(x, w, G, K, N)
    except RuntimeError as e:
        result[name] = {"error": str(e).splitlines()[0]}
        continue
    err = (y.double() - ref).abs().amax(dim=0)  # per output channel
    result[name] = {"max_abs_err": err.max().item(), "wrong_channels": (err > 0.5).nonzero().flatten().tolist()}
print(json.dumps(result))
