"""Mixture-of-experts layers, found and named the way llmcompressor 0.14 finds and names them.

transformers 5 holds a MoE layer's experts fused: one module with 3-D parameters
gate_up_proj [E, 2*I, H] and down_proj [E, H, I]. llmcompressor linearizes each such module into
E per-expert Linear layers `experts.E.{gate_proj,up_proj,down_proj}` (llmcompressor/modeling/moe/
linearize.py), quantizes them like any Linear and saves them under *checkpoint* names: transformers'
reverse conversion mapping (Mixtral: `mlp.` → `block_sparse_moe.`, but its experts keep the
gate/up/down names, not the hub's w1/w3/w2, which vLLM's Mixtral loader maps back).

Routers (`…TopKRouter` classes) are not nn.Linear, so the "Linear" target skips them, yet
compressed-tensors counts them as Linear when it writes the config's ignore list
(`get_vllm_module_type`: "Router", "Gating", "Gate" class names), so they are listed there.
Qwen2-MoE's `shared_expert_gate` (Linear H→1) *is* an nn.Linear: llmcompressor would quantize
it, and vLLM builds that layer without quantization (qwen2_moe.py: quant_config=None), so we add
it to the ignore list for MoE checkpoints (llmcompressor's own Qwen-MoE examples do the same).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PreflightError

__all__ = [
    "ExpertLinear",
    "MOE_IGNORE",
    "LEGACY_NAMES",
    "is_moe_config",
    "fused_experts",
    "expert_linears",
    "linear_typed_modules",
    "checkpoint_namer",
]

# Added to the ignore list of MoE checkpoints, by both engines.
MOE_IGNORE = ["re:.*shared_expert_gate$"]
# The hub's Mixtral layout names experts w1 (gate), w3 (up), w2 (down); transformers 5 reads both.
LEGACY_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_moe_config(config: dict) -> bool:
    text = config.get("text_config") or config
    return any(isinstance(text.get(k), int) and text[k] > 1 for k in _EXPERT_COUNT_KEYS)


@dataclass(frozen=True)
class ExpertLinear:
    """One expert projection as llmcompressor's linearized model has it."""

    module: str  # model-side module name, e.g. model.layers.1.mlp.experts.3.down_proj
    in_features: int
    out_features: int


def _is_router_type(cls_name: str) -> bool:
    """compressed-tensors' get_vllm_module_type: these classes count as "Linear" for the ignore list."""
    return "ExpertMLP" not in cls_name and bool(
        "Router" in cls_name or "Gating" in cls_name or re.search(r"Gate(?![a-z])", cls_name)
    )


def fused_experts(model) -> list[tuple[str, object]]:
    """(name, module) of every fused experts module (3-D gate_up_proj and down_proj)."""
    import torch

    found = []
    for name, mod in model.named_modules():
        down = getattr(mod, "down_proj", None)
        if not (isinstance(down, torch.nn.Parameter) and down.dim() == 3):
            continue
        gate_up = getattr(mod, "gate_up_proj", None)
        if (
            not (isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3)
            or getattr(mod, "is_transposed", False)
            or getattr(mod, "has_bias", False)
        ):
            raise PreflightError(
                f"experts {name} ({type(mod).__name__}): only SwiGLU experts stored as gate_up_proj "
                "[E, 2I, H] without bias are supported by the stream engine — use --engine llmcompressor"
            )
        found.append((name, mod))
    return found


def _experts_of(name: str, mod) -> list[ExpertLinear]:
    n_exp, two_i, hidden = mod.gate_up_proj.shape
    _, out_down, inter = mod.down_proj.shape
    return [
        x
        for e in range(n_exp)
        for x in (
            ExpertLinear(f"{name}.{e}.gate_proj", hidden, two_i // 2),
            ExpertLinear(f"{name}.{e}.up_proj", hidden, two_i // 2),
            ExpertLinear(f"{name}.{e}.down_proj", inter, out_down),
        )
    ]


def expert_linears(model) -> list[ExpertLinear]:
    """The per-expert Linear layers llmcompressor's linearization creates, expert by expert."""
    return [x for name, mod in fused_experts(model) for x in _experts_of(name, mod)]


def linear_typed_modules(model) -> list[str]:
    """Names of the modules compressed-tensors treats as Linear (nn.Linear, routers, and the
    linearized experts), in named_modules order: the candidates for the config's ignore list."""
    import torch

    fused = dict(fused_experts(model))
    names = []
    for name, mod in model.named_modules():
        if name in fused:
            names += [x.module for x in _experts_of(name, mod)]
        elif isinstance(mod, torch.nn.Linear) or _is_router_type(type(mod).__name__):
            names.append(name)
    return names


def checkpoint_namer(model):
    """model-side name → checkpoint name, by transformers' reverse conversion mapping (what
    save_pretrained and compressed-tensors' ignore list apply). Identity when there is none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        inverse = [c.reverse_transform() for c in reversed(get_model_conversion_mapping(model, add_legacy=False))]
    except (ImportError, AttributeError, TypeError):  # transformers without conversion mappings
        inverse = []

    def name(n: str) -> str:
        for rev in inverse:
            renamed, matched = rev.rename_source_key(n)
            if matched is not None:
                n = renamed
        return n

    return name
