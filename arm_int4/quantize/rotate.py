"""Offline rotations fused into the weights (QuaRot / SpinQuant R1 and R2), before quantizing.

An orthogonal Q leaves a pre-norm decoder's function unchanged when the residual stream x is
carried as x·Q everywhere: RMSNorm without its weight commutes with Q (‖xQ‖ = ‖x‖), so each
norm's weight γ is folded into the Linears that read it (W·diag(γ)) and the norm becomes 1. Then
  readers (q/k/v, gate/up, lm_head; embeddings' rows):  W ← W·Q
  writers (o_proj, down_proj, and their biases):         W ← Qᵀ·W,  b ← b·Q
R2 rotates each attention head's values by R (head_dim²): v_proj's output rows per head
W_h ← Rᵀ·W_h (bias b_h ← b_h·R), o_proj's input columns per head W_h ← W_h·R; attention mixes
positions, never dimensions of one head, so the rotation passes through it. Rotary q/k are not
touched (R1 only rotates their inputs), so q/k biases (Qwen2) stay as they are.

The point for INT4: a (randomized) Hadamard Q spreads the few large residual-stream channels of
real models over all channels, so per-channel weight scales and per-token INT8 activation scales
see fewer outliers. Q = diag(s)·H/√n with random signs s (seeded) and H a Hadamard matrix: Sylvester
for powers of two, times a Paley-construction factor otherwise (576 = 36 × 16, 36 by Paley II
with q = 17), or, when no such H is known here, a random orthogonal matrix (QR of a Gaussian).
Hadamard over random orthogonal: every entry is ±1/√n, so no channel keeps more than its
1/n share of any outlier (QuaRot, Ashkboos et al. 2024, §3; SpinQuant reports random Hadamard
ahead of random orthogonal).

Written as a normal safetensors checkpoint in the source dtype, tensor by tensor (one tensor and
the norm weights in memory at a time), untied (`tie_word_embeddings: false`: the embeddings and
lm_head differ once γ is folded into lm_head), with `config.json["arm_int4_rotation"]` saying
what was applied. vLLM serves it as any Llama/Qwen2 checkpoint; llmcompressor's SpinQuantModifier
does the same math inside `oneshot` in the quantization environment (docs/accuracy.md says why
this is done here instead).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ModelError, UsageError
from .safetensors_io import ShardReader, ShardWriter, TensorInfo

__all__ = ["ROTATABLE", "Rotation", "hadamard", "orthogonal", "rotate_checkpoint"]

# pre-norm decoders whose tensors are named as below (Mistral/Qwen2 share Llama's names)
ROTATABLE = ("llama", "mistral", "qwen2")
CONFIG_KEY = "arm_int4_rotation"


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int):
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q (0, +1, −1)."""
    import torch

    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int):
    """A Hadamard matrix of order m from Paley's constructions, or None.
    I: m = q + 1, q prime ≡ 3 (mod 4). II: m = 2(q + 1), q prime ≡ 1 (mod 4)."""
    import torch

    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # symmetric conference matrix
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # replaces ±1
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # replaces the 0 diagonal
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int):
    """An n×n matrix of ±1 with H·Hᵀ = n·I (float64), or None when n is not 2^k × (1 or a Paley order)."""
    import torch

    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(k, -1, -1):  # the largest Sylvester factor whose cofactor Paley can build
        base = _paley(n >> j)
        if base is not None:
            h = base
            for _ in range(j):
                h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
            return h
    return None


def orthogonal(n: int, seed: int):
    """Random n×n orthogonal (float64): Q·diag(s)·H/√n when a Hadamard H exists, else QR of a Gaussian."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * h / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed (Mezzadri 2007)


@dataclass(frozen=True)
class Rotation:
    """What was fused, recorded in config.json (`arm_int4_rotation`)."""

    r1: str  # e.g. "hadamard 576" or "orthogonal 600"
    r2: str
    seed: int


def _kind(n: int) -> str:
    return f"{'hadamard' if hadamard(n) is not None else 'orthogonal'} {n}"


def _read_config(src: Path) -> dict:
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{src}: cannot read config.json ({e})") from None
    if cfg.get("quantization_config"):
        raise UsageError(f"--rotate: {src} is already quantized: give the BF16/FP16/FP32 source model")
    if cfg.get(CONFIG_KEY):
        raise UsageError(f"--rotate: {src} is already rotated ({CONFIG_KEY} in config.json): drop --rotate")
    if cfg.get("model_type") not in ROTATABLE:
        raise UsageError(
            f"--rotate: model type {cfg.get('model_type')!r} is not supported (supported: {', '.join(ROTATABLE)}); "
            "drop --rotate"
        )
    return cfg


def _shards(src: Path) -> list[Path]:
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"--rotate: {src} has no .safetensors files (convert the model to safetensors first)")
    return shards


class _Rotator:
    """The new value of each tensor of a checkpoint, from its name (float64 math, source dtype out)."""

    def __init__(self, cfg: dict, norms: dict, seed: int, dtype=None):
        self.dtype = dtype  # the written dtype (None: each tensor's own)
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.q1 = orthogonal(self.hidden, seed)  # [hidden, hidden]
        self.r2 = orthogonal(self.head_dim, seed + 1)  # [head_dim, head_dim]
        self.norms = norms  # name -> γ (float64)
        self.rotation = Rotation(_kind(self.hidden), _kind(self.head_dim), seed)

    def _gamma(self, name: str):
        """The weight of the norm feeding Linear `name` (model.layers.N.self_attn.q_proj.weight, ...)."""
        if name.startswith("lm_head.") or name == "model.embed_tokens.weight#lm_head":
            return self.norms["model.norm.weight"]
        layer = name.split(".self_attn.")[0] if ".self_attn." in name else name.split(".mlp.")[0]
        norm = "input_layernorm" if ".self_attn." in name else "post_attention_layernorm"
        return self.norms[f"{layer}.{norm}.weight"]

    def __call__(self, name: str, t):
        import torch

        w = t.to(torch.float64)
        q1, r2, hd = self.q1, self.r2, self.head_dim
        if name == "model.embed_tokens.weight":
            w = w @ q1  # rows are tokens: [vocab, hidden]
        elif name in ("lm_head.weight", "model.embed_tokens.weight#lm_head"):
            w = (w * self._gamma(name)[None, :]) @ q1
        elif name.endswith("norm.weight"):
            w = torch.ones_like(w)  # folded into the Linears that read it
        elif name.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight", "up_proj.weight")):
            w = (w * self._gamma(name)[None, :]) @ q1
        elif name.endswith("v_proj.weight"):  # [kv_heads·hd, hidden]: R1 on the input, R2 per head on the output
            w = (w * self._gamma(name)[None, :]) @ q1
            w = torch.einsum("ji,hjk->hik", r2, w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
        elif name.endswith("v_proj.bias"):
            w = (w.reshape(-1, hd) @ r2).reshape(-1)
        elif name.endswith("o_proj.weight"):  # [hidden, heads·hd]: R2 per head on the input, R1 on the output
            w = (w.reshape(w.shape[0], -1, hd) @ r2).reshape(w.shape)
            w = q1.T @ w
        elif name.endswith("down_proj.weight"):
            w = q1.T @ w
        elif name.endswith(("o_proj.bias", "down_proj.bias")):
            w = w @ q1
        elif not name.endswith(("q_proj.bias", "k_proj.bias", "gate_proj.bias", "up_proj.bias", "rotary_emb.inv_freq")):
            raise UsageError(
                f"--rotate: tensor {name} is not one a Llama/Qwen2 decoder has; this checkpoint cannot be "
                "rotated safely: drop --rotate"
            )
        return w.to(self.dtype or t.dtype)


def rotate_checkpoint(src: Path, dst: Path, seed: int = 0, dtype: str | None = None, progress=None) -> Rotation:
    """Write src rotated (R1 + R2, norms folded, embeddings untied) into the new directory dst, in
    the source's dtype or `dtype` ("float32": the exactness check, free of bf16 rounding)."""
    import torch

    from .safetensors_io import st_dtype, torch_dtype

    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    shards = _shards(src)
    dst.mkdir(parents=True)  # a new directory: removed again if anything below fails
    readers = [ShardReader(p) for p in shards]
    writers: list[ShardWriter] = []
    try:
        where = {name: r for r in readers for name in r.tensors}
        if "model.embed_tokens.weight" not in where:
            raise UsageError(f"--rotate: {src} has no model.embed_tokens.weight: drop --rotate")
        norms = {n: where[n].read(n).to(torch.float64) for n in where if n.endswith("norm.weight")}
        out_dtype = getattr(torch, dtype) if dtype else None
        rot = _Rotator(cfg, norms, seed, out_dtype)
        tied = "lm_head.weight" not in where
        total = 0  # bytes of tensors written (the index's total_size)
        for f in src.iterdir():  # tokenizer, generation config, ...
            if (
                f.is_file()
                and f.suffix != ".safetensors"
                and f.name not in ("config.json", "model.safetensors.index.json")
            ):
                shutil.copy2(f, dst / f.name)
        for r in readers:
            specs = [
                TensorInfo(
                    i.name,
                    st_dtype(out_dtype) if out_dtype and torch_dtype(i.dtype).is_floating_point else i.dtype,
                    i.shape,
                )
                for i in r.tensors.values()
            ]
            if tied and "model.embed_tokens.weight" in r.tensors:  # lm_head = γ-folded, rotated embeddings
                e = next(i for i in specs if i.name == "model.embed_tokens.weight")
                specs.append(TensorInfo("lm_head.weight", e.dtype, e.shape))
            total += sum(i.nbytes for i in specs)
            w = ShardWriter(dst / r.path.name, specs, r.metadata or None)
            writers.append(w)
            for name in r.tensors:
                w.write(name, rot(name, r.read(name)))
                if tied and name == "model.embed_tokens.weight":
                    w.write("lm_head.weight", rot("model.embed_tokens.weight#lm_head", r.read(name)))
            w.close()
            if progress:
                progress(f"rotate: {r.path.name} written ({len(specs)} tensors)")
        index = src / "model.safetensors.index.json"
        if index.exists():
            idx = json.loads(index.read_text())
            if tied:
                idx["weight_map"]["lm_head.weight"] = idx["weight_map"]["model.embed_tokens.weight"]
            if "total_size" in idx.get("metadata", {}):
                idx["metadata"]["total_size"] = total
            (dst / index.name).write_text(json.dumps(idx, indent=2))
        cfg["tie_word_embeddings"] = False
        if dtype:
            cfg["torch_dtype"] = cfg["dtype"] = dtype
        cfg[CONFIG_KEY] = asdict(rot.rotation)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    except BaseException:
        for w in writers:
            w.discard()
        shutil.rmtree(dst, ignore_errors=True)
        raise
    finally:
        for r in readers:
            r.close()
    return rot.rotation
