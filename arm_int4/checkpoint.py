"""What a checkpoint says about itself: config.json and safetensors headers, never its folder name.

Only headers are read (no tensor data, no torch), so planning a server for a 100 GB checkpoint
takes milliseconds. bench reuses the weight byte counts for its GB/s figures.
"""

import glob
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Optional, Union

from .errors import ModelError
from .hub import model_name
from .schemes import MixedScheme, Scheme, scheme_from_config

__all__ = ["CheckpointFacts", "read_checkpoint", "weights_in_memory", "kv_bytes_per_token", "FLOAT_BYTES"]

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_FLOAT = {"F32", "BF16", "F16", "F64"}


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint says about itself (config.json + safetensors headers, never its name)."""

    path: str
    name: str  # served model name: org/name for a hub cache snapshot, else the directory's basename
    model_type: Optional[str] = None
    quant_method: Optional[str] = None
    scheme: Optional[Union[Scheme, MixedScheme]] = None  # ours (compressed-tensors W4A8/W4A16), else None
    is_moe: bool = False
    quantized_linear_bias: bool = False  # a quantized Linear carries a bias (Qwen2 q/k/v, ...)
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    kv_lora_rank: Optional[int] = None  # MLA models (DeepSeek): compressed KV per token
    max_position_embeddings: Optional[int] = None
    config_dtype: Optional[str] = None
    quantized_values: int = 0  # int4 weights (I8 one-per-byte, or I32 packed eight-per-word)
    float_values: int = 0  # every other floating-point parameter (embeddings, norms, lm_head)
    float_bytes: int = 0  # those parameters' bytes as stored
    other_bytes: int = 0  # scales, zero points, ints: kept as stored
    sources: tuple = ()

    @property
    def is_w4a8_groupwise(self) -> bool:
        s = self.scheme
        return bool(s and s.preset == "w4a8" and any(p.granularity == "groupwise" for p in s.parts))


def _text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg.get("llm_config") or cfg


def _safetensors_headers(path: str) -> dict:
    """{tensor name: TensorInfo} over every shard (headers only, no tensor data read)."""
    from .quantize.safetensors_io import ShardReader  # plain header parser; no torch import

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # the index names the shards vLLM loads; stray files are ignored
        with open(index, encoding="utf-8") as f:
            shards = sorted({os.path.join(path, n) for n in json.load(f)["weight_map"].values()})
    else:
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    tensors = {}
    for shard in shards:
        try:
            with ShardReader(shard) as r:
                tensors.update(r.tensors)
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"cannot read the safetensors header of {shard}: {exc}") from None
    return tensors


def read_checkpoint(path, *, weights_total: Optional[int] = None) -> CheckpointFacts:
    """Facts from DIR/config.json and the safetensors headers (ModelError when unreadable).
    weights_total: the weights are not here (a hub id planned before its download, hub.py); their
    bytes as the hub reports them stand in for the headers: float parameters in the config's dtype
    for an unquantized model, kept as stored (`other_bytes`) for a quantized one."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError:
        raise ModelError(f"{path} has no readable config.json: MODEL must be a Hugging Face model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    text = _text_config(cfg)
    qcfg = cfg.get("quantization_config") or {}
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
    experts = [text.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")]
    tensors = _safetensors_headers(path) if weights_total is None else {}
    names = set(tensors)
    quantized = {n.rsplit(".", 1)[0] for n in names if n.endswith((".weight_scale", ".weight_packed"))}
    q_values = f_values = f_bytes = other = 0
    for n, t in tensors.items():
        numel = math.prod(t.shape)
        if n.endswith(".weight_packed") and t.dtype == "I32":
            q_values += numel * 8
        elif n.endswith(".weight") and n[:-7] in quantized and t.dtype == "I8":
            q_values += numel
        elif (
            t.dtype in _ST_FLOAT
            and n[: -7 if n.endswith(".weight") else None] not in quantized
            and not n.endswith((".weight_scale", ".weight_zero_point"))
        ):
            f_values += numel
            f_bytes += t.nbytes
        else:
            other += t.nbytes
    dtype = text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype")
    if weights_total is not None and qcfg:
        other = weights_total
    elif weights_total is not None:
        f_bytes, f_values = weights_total, weights_total // FLOAT_BYTES.get(str(dtype), 2)
    biased = any(n.endswith(".bias") and n[:-5] in quantized for n in names)
    if not tensors and qcfg:  # no safetensors to look into: the config's bias switches speak
        biased = bool(text.get("attention_bias") or text.get("mlp_bias"))
    return CheckpointFacts(
        path=path,
        name=model_name(path),
        model_type=cfg.get("model_type"),
        quant_method=qcfg.get("quant_method"),
        scheme=scheme_from_config(qcfg) if qcfg else None,
        is_moe=any(isinstance(e, int) and e > 1 for e in experts),
        quantized_linear_bias=biased,
        num_layers=text.get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        kv_lora_rank=text.get("kv_lora_rank"),
        max_position_embeddings=text.get("max_position_embeddings"),
        config_dtype=dtype,
        quantized_values=q_values,
        float_values=f_values,
        float_bytes=f_bytes,
        other_bytes=other,
        sources=("config.json",)
        + (("safetensors headers",) if tensors else ())
        + (("weights' total size from the hub",) if weights_total is not None else ()),
    )


def weights_in_memory(facts: CheckpointFacts, dtype: str, arch: str) -> int:
    """Resident weight bytes once loaded. int4 weights: 1 byte each on Arm (the int8 tensor vLLM
    loads before KleidiAI packs it to ~0.5 byte), 4 bytes each on x86 (the reference fallback's
    packed weight is fp32-sized, measured). Float parameters are cast to the serving dtype."""
    per_q = 1 if arch == "aarch64" else 4
    return facts.quantized_values * per_q + facts.float_values * FLOAT_BYTES[dtype] + facts.other_bytes


def kv_bytes_per_token(facts: CheckpointFacts, dtype: str) -> Optional[int]:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes (MLA: one latent)."""
    b = FLOAT_BYTES[dtype]
    if not facts.num_layers:
        return None
    if facts.kv_lora_rank:
        return facts.num_layers * (facts.kv_lora_rank + 64) * b  # + qk_rope_head_dim (64 in DeepSeek)
    if facts.num_kv_heads and facts.head_dim:
        return 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * b
    return None
