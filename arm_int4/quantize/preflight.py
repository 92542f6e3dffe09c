"""Checks before any heavy work: every refusal is one line naming the layer and the value.

The model's Linear layers are found the way llmcompressor finds them (compressed-tensors'
match_named_modules over the model built on the meta device, so no weights are loaded), then
mapped onto the checkpoint's tensor names. Mixture-of-experts layers: see moe.py — each expert's
gate/up/down projection is a layer of its own, as llmcompressor's linearization makes it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PreflightError
from ..schemes import MixedScheme, Scheme
from .moe import is_moe_config
from .safetensors_io import ShardReader, TensorInfo

__all__ = [
    "Checkpoint",
    "QuantPlan",
    "Layer",
    "read_source_checkpoint",
    "quantizable_layers",
    "named_linear_layers",
    "plan_quantization",
    "check_output",
    "check_free_space",
    "checkpoint_from_index",
    "NAMED_LINEAR_ARCHITECTURES",
]


@dataclass
class Checkpoint:
    """A local HF model dir: its config and, per safetensors shard, the tensor headers."""

    path: Path
    config: dict
    shards: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # file name → tensors

    def tensor(self, name: str) -> TensorInfo | None:
        for tensors in self.shards.values():
            if name in tensors:
                return tensors[name]
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.shards.values() for t in ts.values())


@dataclass
class QuantPlan:
    checkpoint: Checkpoint
    scheme: Scheme | MixedScheme
    ignore: list[str]
    targets: dict[str, TensorInfo]  # tensor name (`….weight`) → its header, in checkpoint order
    renames: dict[str, str] = field(default_factory=dict)  # source tensor → output name (Mixtral w1 → gate_proj)
    config_ignore: list[str] | None = None  # ignore list for config.json when not `ignore` (MoE: routers…)
    layer_schemes: dict[str, Scheme] = field(default_factory=dict)  # mixed: tensor name → its scheme

    def output_name(self, name: str) -> str:
        return self.renames.get(name, name)

    def scheme_for(self, name: str) -> Scheme:
        """The scheme target tensor `name` is quantized with."""
        if isinstance(self.scheme, Scheme):
            return self.scheme
        return self.layer_schemes[name]


def read_source_checkpoint(path: str | Path) -> Checkpoint:
    """The model to quantize: config.json and every tensor's safetensors header (name, dtype, shape),
    never the data. (arm_int4.checkpoint.read_checkpoint reads a checkpoint's facts for serving plans.)"""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise PreflightError(f"{p}: no config.json — MODEL must be a Hugging Face model directory")
    config = json.loads(cfg_file.read_text())
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PreflightError(f"{index}: unreadable ({e.__class__.__name__}: {e}): download the model again") from e
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        from .stream import WEIGHT_SUFFIXES

        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in p.iterdir()):
            raise PreflightError(
                f"{p}: no weights (no *.safetensors, *.bin…): MODEL must hold the model's weight files, "
                "e.g. `hf download ID --local-dir DIR`"
            )
    ck = Checkpoint(p, config)
    for name in files:
        ck.shards[name] = _read_shard_header(p / name)
    return ck


def _read_shard_header(f: Path) -> dict[str, TensorInfo]:
    """One shard's tensors, refused in one line when the file is missing, unreadable, not
    safetensors, or shorter than its header says (an interrupted download)."""
    try:
        with ShardReader(f) as r:
            size, need = f.stat().st_size, r.data_start + max((t.end for t in r.tensors.values()), default=0)
            tensors = r.tensors
    except FileNotFoundError as e:
        raise PreflightError(f"{f}: missing (listed in the model's index): download the model again") from e
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:  # ValueError: JSON, UTF-8
        raise PreflightError(f"{f}: unreadable safetensors shard ({e.__class__.__name__}: {e})") from e
    if size < need:
        raise PreflightError(f"{f}: truncated ({size} bytes, its header needs {need}): download it again")
    return tensors


@dataclass(frozen=True)
class Layer:
    """A Linear layer llmcompressor would quantize (a per-expert projection counts as one)."""

    module: str  # model-side name
    weight: str  # its weight's tensor name in a checkpoint llmcompressor writes
    in_features: int
    out_features: int
    expert: bool = False


@dataclass
class ModelLayers:
    layers: list[Layer]
    ignored: list[str]  # checkpoint names of Linear-typed modules left unquantized (MoE ignore list)
    moe: bool


# Dense decoder families whose nn.Linear modules are exactly these projections and lm_head
# (transformers' modeling_{llama,mistral,qwen2,qwen3}.py): their layers can be read off the
# checkpoint's tensor names without importing transformers (~4 s). Anything else, and any MoE,
# takes the meta-model path. tests/test_stream.py checks both paths agree.
NAMED_LINEAR_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight")


_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _named_shape(name: str, cfg: dict) -> tuple[int, ...] | None:
    """The shape of a dense family's tensor from config.json (transformers' modeling_{llama,mistral,
    qwen2,qwen3}.py), None for a name these families do not have."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, h)
    if name == "model.norm.weight":
        return (h,)
    m = re.fullmatch(r"model\.layers\.\d+\.((?:self_attn|mlp)\.\w+|\w+)\.(weight|bias)", name)
    if not m:
        return None
    part, kind = m.groups()
    rows = {
        "self_attn.q_proj": heads * hd,
        "self_attn.k_proj": kv * hd,
        "self_attn.v_proj": kv * hd,
        "self_attn.o_proj": h,
        "mlp.gate_proj": inter,
        "mlp.up_proj": inter,
        "mlp.down_proj": h,
    }
    cols = {"self_attn.o_proj": heads * hd, "mlp.down_proj": inter}
    if part in rows:
        return (rows[part], cols.get(part, h)) if kind == "weight" else (rows[part],)
    if part in ("input_layernorm", "post_attention_layernorm") and kind == "weight":
        return (h,)
    if part in ("self_attn.q_norm", "self_attn.k_norm") and kind == "weight":
        return (hd,)
    return None


def checkpoint_from_index(path: Path, config: dict, weight_map: dict, total_size: int | None) -> Checkpoint | None:
    """A Checkpoint whose headers come from the index's tensor names and config.json's shapes, for a
    model whose weights are not here (a hub id planned before its download). Only for the dense
    families in NAMED_LINEAR_ARCHITECTURES, and only when the bytes add up to the index's total_size;
    None otherwise (the caller estimates instead)."""
    if (config.get("architectures") or [None])[0] not in NAMED_LINEAR_ARCHITECTURES or is_moe_config(config):
        return None
    dtype = _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")))
    if dtype is None:
        return None
    ck, offsets = Checkpoint(path, config), dict[str, int]()
    try:
        for name, shard in weight_map.items():
            shape = _named_shape(name, config)
            if shape is None:
                return None
            begin = offsets.get(shard, 0)
            info = TensorInfo(name, dtype, shape, begin, begin + TensorInfo(name, dtype, shape).nbytes)
            ck.shards.setdefault(shard, {})[name] = info
            offsets[shard] = info.end
    except (KeyError, TypeError, ZeroDivisionError):  # a config without the fields these families have
        return None
    return ck if total_size is None or ck.nbytes == total_size else None


def _ignored(name: str, ignore: list[str]) -> bool:
    """compressed-tensors is_match for an nn.Linear: "re:" regex match, exact name, or a class
    name of nn.Linear's MRO (Linear, Module)."""
    return any(
        re.match(t[3:], name) is not None if t.startswith("re:") else t in (name, "Linear", "Module") for t in ignore
    )


def named_linear_layers(ck: Checkpoint, ignore: list[str]) -> ModelLayers | None:
    """The Linear layers of a known dense architecture from tensor names alone, in the model's
    module order (layers, then q k v o gate up down, then lm_head); None for other models."""
    if (ck.config.get("architectures") or [None])[0] not in NAMED_LINEAR_ARCHITECTURES or is_moe_config(ck.config):
        return None
    found = []
    for tensors in ck.shards.values():
        for t in tensors.values():
            m = _LAYER_NAME.fullmatch(t.name)
            if m and m.group(3) in _PROJECTIONS and len(t.shape) == 2:
                found.append((int(m.group(1)), _PROJECTIONS.index(m.group(3)), t))
    layers = [Layer(t.name.removesuffix(".weight"), t.name, t.shape[1], t.shape[0]) for _, _, t in sorted(found)]
    head = ck.tensor("lm_head.weight")
    vocab = ck.config.get("vocab_size", 0)
    hidden = ck.config.get("hidden_size", 0)
    # lm_head is a module even when tied to the embeddings (not in the checkpoint)
    layers.append(
        Layer("lm_head", "lm_head.weight", head.shape[1] if head else hidden, head.shape[0] if head else vocab)
    )
    return ModelLayers([x for x in layers if not _ignored(x.module, ignore)], [], False)


def quantizable_layers(config_dir: Path, scheme_targets: list[str], ignore: list[str]) -> ModelLayers:
    """Layers llmcompressor would quantize, from the model built on the meta device (no weights)."""
    import torch
    from compressed_tensors.utils import match_name, match_named_modules
    from transformers import AutoConfig, AutoModelForCausalLM

    from .moe import expert_linears, linear_typed_modules

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = expert_linears(model)
    if not experts:  # dense: the names as they are (the path every dense test pins)
        return ModelLayers(
            [
                Layer(n, f"{n}.weight", m.weight.shape[-1], m.weight.shape[0])
                for n, m in match_named_modules(model, scheme_targets, ignore)
            ],
            [],
            False,
        )
    from .moe import checkpoint_namer

    ck_name = checkpoint_namer(model)

    def ignored(name: str) -> bool:
        return any(match_name(name, t) or match_name(ck_name(name), t) for t in ignore)

    layers = [
        Layer(n, ck_name(f"{n}.weight"), m.weight.shape[-1], m.weight.shape[0])
        for n, m in match_named_modules(model, scheme_targets, ignore)
        if not ignored(n)
    ]
    if "Linear" in scheme_targets:
        layers += [
            Layer(x.module, ck_name(f"{x.module}.weight"), x.in_features, x.out_features, True)
            for x in experts
            if not ignored(x.module)
        ]
    chosen = {x.module for x in layers}
    return ModelLayers(layers, [ck_name(n) for n in linear_typed_modules(model) if n not in chosen], True)


def _source_tensor(ck: Checkpoint, layer: Layer) -> tuple[str, TensorInfo | None]:
    """The checkpoint tensor holding `layer`'s weight: its own name, or the hub's Mixtral w1/w3/w2."""
    from .moe import LEGACY_NAMES

    info = ck.tensor(layer.weight)
    if info is None and layer.expert:
        head, proj, _ = layer.weight.rsplit(".", 2)
        legacy = f"{head}.{LEGACY_NAMES[proj]}.weight"
        if ck.tensor(legacy) is not None:
            return legacy, ck.tensor(legacy)
    return layer.weight, info


def plan_quantization(ck: Checkpoint, scheme: Scheme, ignore: list[str], *, require_safetensors: bool) -> QuantPlan:
    qc = ck.config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown")
        fmt = qc.get("format", "")
        raise PreflightError(
            f"{ck.path} is already quantized ({method} {fmt}".rstrip() + "): quantize the original "
            "BF16/FP16 checkpoint instead"
        )
    if require_safetensors and not ck.shards:
        raise PreflightError(
            f"{ck.path}: no *.safetensors files — the stream engine reads safetensors; "
            "use --engine llmcompressor for .bin checkpoints"
        )
    found = (named_linear_layers(ck, ignore) if require_safetensors else None) or quantizable_layers(
        ck.path, ["Linear"], ignore
    )
    modules = found.layers
    if not modules:
        raise PreflightError(
            f"{ck.path}: no Linear layers left to quantize (ignore list: {' '.join(ignore) or 'none'})"
        )
    targets: dict[str, TensorInfo] = {}
    renames: dict[str, str] = {}
    for layer in modules:
        mod = layer.module
        name, info = _source_tensor(ck, layer)
        if info is None and layer.expert:  # experts stored fused (3-D) or under unknown names
            if not require_safetensors:
                continue  # llmcompressor loads them through transformers' own conversion
            fused = [t for ts in ck.shards.values() for t in ts.values() if len(t.shape) == 3]
            raise PreflightError(
                f"expert layer {layer.weight} is not in the checkpoint"
                + (f" (its experts are stored fused: {fused[0].name} {list(fused[0].shape)})" if fused else "")
                + " — use --engine llmcompressor"
            )
        if info is None:
            if ck.shards:
                raise PreflightError(
                    f"layer {mod}: its weight {name} is not in the checkpoint (tied to another tensor?) — "
                    f"add --ignore {mod}"
                )
            continue
        if len(info.shape) != 2:
            raise PreflightError(f"layer {mod}: weight shape {list(info.shape)} is not 2-D")
        if info.dtype not in ("BF16", "F16", "F32"):
            raise PreflightError(f"layer {mod}: weight dtype {info.dtype} is not a float type")
        if layer.expert and tuple(info.shape) != (layer.out_features, layer.in_features):
            raise PreflightError(
                f"expert layer {name}: shape {list(info.shape)} in the checkpoint, the model config says "
                f"[{layer.out_features}, {layer.in_features}] — config.json and weights disagree"
            )
        targets[name] = info
        if name != layer.weight:
            renames[name] = layer.weight
    g = scheme.group_size
    if g:
        bad = [(x.module, x.in_features) for x in modules if x.in_features % g]
        if bad:
            name, cols = bad[0]
            more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
            divisors = [x for x in (32, 64, 128) if all(m.in_features % x == 0 for m in modules)]
            hint = f"use --groupsize {' or '.join(map(str, divisors))}" if divisors else "use --scheme channelwise"
            raise PreflightError(
                f"--groupsize {g} does not divide the {cols} input features of layer {name}{more}: {hint}"
            )
    return QuantPlan(ck, scheme, list(ignore), targets, renames, found.ignored if found.moe else None)


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise PreflightError(f"output {out} already exists: pass --overwrite to replace it, or --output DIR")
    if not out.parent.exists():
        raise PreflightError(f"output parent directory {out.parent} does not exist")


FREE_SPACE_MARGIN = 64 * 2**20  # headers, config, tokenizer files, and the filesystem's own rounding


def check_free_space(out: Path, need: int) -> None:
    """Refuse before writing when the output's filesystem has less free space than the output needs."""
    import shutil

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    free = shutil.disk_usage(out.parent).free
    if free < need + FREE_SPACE_MARGIN:
        raise PreflightError(
            f"not enough free space for {out}: the output needs {size(need)} (+ {size(FREE_SPACE_MARGIN)} "
            f"margin), {out.parent} has {size(free)} free: free some space or pass --output DIR on another disk"
        )
