"""vLLM 0.32's W4A8 MoE experts (CPUExpertsInt4) at the torch level, plus a float64 reference.

Run: python tests/arm/moe_kernel.py LAYERS.pt [VLLM_C_SO]       (host: x86 reference path)
     "$(scripts/arm_emulation.sh --print)" tests/arm/moe_kernel.py LAYERS.pt [VLLM_C_SO]  (KleidiAI)
Prints one JSON object on stdout; needs only torch. LAYERS.pt is written by tests/arm/test_moe.py
from checkpoints our stream engine quantized.

What CPUExpertsInt4.apply runs (vllm/model_executor/layers/fused_moe/experts/cpu_int4_moe.py):
routing (softmax, top-k, renormalize), then torch.ops._C.dynamic_4bit_int_moe over experts packed
by fused_moe/oracle/w4a8_int8.py convert_to_w4a8_int8_moe_format (one
torch.ops.aten._dyn_quant_pack_4bit_weight per expert for w13 [E, 2I, H] and w2 [E, H, I]).
`pack_experts` copies that packing; `moe_transcribed` copies the C++ op (csrc/cpu/
dynamic_4bit_int_moe_cpu.cpp: per expert _dyn_quant_matmul_4bit on w13, SiLU(g) * u, then w2,
times the router weight, index_add). When VLLM_C_SO (vLLM's own aarch64 _C.abi3.so) loads, the
real op runs as well, on the same packed weights.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import sys

import torch

__all__ = ["export_layer", "pack_experts", "route", "moe_transcribed", "moe_reference", "sqnr_db", "run_layer", "main"]


def sqnr_db(ref, out):
    """10 log10(|ref|^2 / |ref-out|^2) in dB (as int4_kernel.py; this file stays self-contained)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    if not math.isfinite(noise):
        return -math.inf
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def export_layer(ckpt, prefix, label, top_k, renormalize, tokens=6, seed=0):
    """Host side: one MoE layer of a quantized checkpoint (int8 experts + scales, float router),
    stacked as vLLM's FusedMoE loader stacks it (w13 = [gate; up] along the output dim), with a
    seeded bf16 input, as a dict of plain tensors for LAYERS.pt."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as st:
        names = set(st.keys())
        n_exp = len({n.split(".experts.")[1].split(".")[0] for n in names if n.startswith(prefix + ".experts.")})
        w = lambda e, p, s="": st.get_tensor(f"{prefix}.experts.{e}.{p}.weight{s}")
        scale = st.get_tensor(f"{prefix}.experts.0.down_proj.weight_scale")
        layer = dict(
            label=label,
            top_k=top_k,
            renormalize=renormalize,
            router=st.get_tensor(f"{prefix}.gate.weight"),
            group_size=-1 if scale.shape[1] == 1 else w(0, "down_proj").shape[1] // scale.shape[1],
            w13=torch.stack([torch.cat([w(e, "gate_proj"), w(e, "up_proj")]) for e in range(n_exp)]),
            w13_scale=torch.stack(
                [torch.cat([w(e, "gate_proj", "_scale"), w(e, "up_proj", "_scale")]) for e in range(n_exp)]
            ),
            w2=torch.stack([w(e, "down_proj") for e in range(n_exp)]),
            w2_scale=torch.stack([w(e, "down_proj", "_scale") for e in range(n_exp)]),
        )
    hidden = layer["w13"].shape[2]
    layer["x"] = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return layer


def _pack_one(q, scale, in_features, out_features, group_size):
    """pack_int4_weights_for_kleidi (vLLM 0.32 w4a8_int8.py), no bias."""
    tmp = q.add(8)
    nibbles = ((tmp[:, 1::2] << 4) | tmp[:, ::2]).to(torch.uint8)
    scales = scale.to(torch.float32 if group_size == -1 else torch.bfloat16)
    g = in_features if group_size == -1 else group_size
    return torch.ops.aten._dyn_quant_pack_4bit_weight(nibbles, scales, None, g, in_features, out_features)


def pack_experts(w13, w13_scale, w2, w2_scale, group_size):
    """convert_to_w4a8_int8_moe_format: w13 [E, 2I, H], w2 [E, H, I] int8 → stacked packed buffers."""
    n_exp, two_i, hidden = w13.shape
    inter = w2.shape[2]
    p13 = torch.stack([_pack_one(w13[e], w13_scale[e], hidden, two_i, group_size) for e in range(n_exp)])
    p2 = torch.stack([_pack_one(w2[e], w2_scale[e], inter, hidden, group_size) for e in range(n_exp)])
    return p13, p2


def route(x, router, top_k, renormalize):
    """Softmax top-k routing in float32 (vLLM's CPU select_experts, scoring_func="softmax")."""
    probs = torch.softmax(x.float() @ router.float().T, dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.long)


def moe_transcribed(x, ids, weights, p13, p2, hidden, inter, group_size):
    """dynamic_4bit_int_moe_cpu, line by line in torch (activation kind SiLU/SwiGLU_Gu)."""
    out_dtype = x.dtype
    x_c = x.float() if (group_size != -1 and x.dtype == torch.bfloat16) or x.dtype == torch.float16 else x
    gates = weights.to(x_c.dtype)
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)  # bucket (token, k) pairs by expert, token order kept
    tokens = order // ids.shape[1]
    expert_gates = gates.flatten()[order]
    counts = torch.bincount(flat_ids, minlength=p13.shape[0]).tolist()
    x_all = x_c.index_select(0, tokens)
    y_all = torch.empty(len(tokens), hidden, dtype=x_c.dtype)
    g13 = group_size if group_size != -1 else hidden
    g2 = group_size if group_size != -1 else inter
    start = 0
    for e, n in enumerate(counts):
        if n:
            y13 = torch.ops.aten._dyn_quant_matmul_4bit(x_all[start : start + n], p13[e], g13, hidden, 2 * inter)
            act = torch.nn.functional.silu(y13[:, :inter]) * y13[:, inter:]
            y_all[start : start + n] = torch.ops.aten._dyn_quant_matmul_4bit(act, p2[e], g2, inter, hidden)
        start += n
    y_all = (y_all * expert_gates.unsqueeze(1)).to(out_dtype)
    return torch.zeros(x.shape[0], hidden, dtype=x.dtype).index_add(0, tokens, y_all)


def _dequant(q, scale):
    group = q.shape[-1] // scale.shape[-1]
    return q.double() * scale.double().repeat_interleave(group, dim=-1)


def moe_reference(x, ids, weights, w13, w13_scale, w2, w2_scale):
    """Float64, from the checkpoint's q * scale; same routing as the kernel (the router stays float)."""
    inter = w2.shape[2]
    w13d, w2d = _dequant(w13, w13_scale), _dequant(w2, w2_scale)
    xd, out = x.double(), torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y13 = w13d[e] @ xd[t]
            out[t] += weights[t, k].double() * (w2d[e] @ (torch.nn.functional.silu(y13[:inter]) * y13[inter:]))
    return out


def _load_vllm_op(path):
    """vLLM's own aarch64 _C.abi3.so. It links libgomp and BLAS's sbgemm_ without NEEDED entries
    (the wheel leans on torch having loaded them); scripts/arm_emulation.sh puts both beside it."""
    if not path:
        return None, "no vLLM _C library given"
    try:
        for dep in ("libgomp.so.1", os.path.join(os.path.dirname(path), "libsbgemm_shim.so")):
            ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
        torch.ops.load_library(path)
        return torch.ops._C.dynamic_4bit_int_moe, None
    except (OSError, RuntimeError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}".splitlines()[0]


def run_layer(L, op):
    x, group_size = L["x"], L["group_size"]
    weights, ids = route(x, L["router"], L["top_k"], L["renormalize"])
    hidden, inter = L["w13"].shape[2], L["w2"].shape[2]
    p13, p2 = pack_experts(L["w13"], L["w13_scale"], L["w2"], L["w2_scale"], group_size)
    ref = moe_reference(x, ids, weights, L["w13"], L["w13_scale"], L["w2"], L["w2_scale"])
    y = moe_transcribed(x, ids, weights, p13, p2, hidden, inter, group_size)
    res = dict(
        label=L["label"],
        tokens=x.shape[0],
        experts=p13.shape[0],
        top_k=L["top_k"],
        packed_dtype=str(p13.dtype).replace("torch.", ""),
        out_dtype=str(y.dtype).replace("torch.", ""),
        experts_used=sorted(set(ids.flatten().tolist())),
        sqnr_db=sqnr_db(ref, y),
        out=y.float().flatten().tolist(),
    )
    if op is not None:
        try:
            yv = op(x, ids, weights, p13, p2, hidden, inter, group_size, False, 2)  # 2 = SiLU (Qwen/Mixtral)
            res.update(vllm_sqnr_db=sqnr_db(ref, yv), vllm_vs_transcribed=(yv.double() - y.double()).abs().max().item())
        except RuntimeError as e:
            res["vllm_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    op, why = _load_vllm_op(argv[1] if len(argv) > 1 else None)
    result = dict(
        probe=dict(
            machine=platform.machine(),
            torch=torch.__version__,
            kleidiai=bool(torch.backends.kleidiai.is_available()),
            vllm_op=op is not None,
            vllm_op_error=why,
        )
    )
    result["layers"] = [run_layer(L, op) for L in torch.load(argv[0])]
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
