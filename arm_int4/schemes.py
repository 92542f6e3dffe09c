"""Quantization schemes as typed values, mapped once to compressed-tensors arguments.

W4A8-dynamic (Arm's learning path, served by vLLM's CompressedTensorsW4A8Int on CPU):
  weights      INT4, symmetric, static; per output channel, or per group of G input features
  activations  INT8, asymmetric, dynamic, per token (not compressed-tensors' "W4A8" preset,
               which is symmetric and group 128)
W4A16 (vLLM's INT4 page): INT4 symmetric weights in groups of 128, activations unquantized.

Nothing here imports torch or compressed-tensors at module import time, so `--help` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

__all__ = [
    "GRANULARITIES",
    "OBSERVERS",
    "PRESETS",
    "KLEIDIAI_GROUP_MULTIPLE",
    "LEARNING_PATH_GROUP",
    "W4A16_GROUP",
    "Scheme",
    "MixedScheme",
    "output_dir_name",
    "scheme_from_config",
]

GRANULARITIES = ("channelwise", "groupwise")
OBSERVERS = ("minmax", "mse")
PRESETS = ("w4a8", "w4a16")
# KleidiAI's groupwise INT4 kernels take block sizes that are multiples of 32.
KLEIDIAI_GROUP_MULTIPLE = 32
# W4A16 is defined with group 128 (vLLM's INT4 W4A16 page); the learning path's W4A8 default is 32.
W4A16_GROUP = 128
LEARNING_PATH_GROUP = 32


@dataclass(frozen=True)
class Scheme:
    """One weight/activation quantization recipe.

    group_size is None for channelwise. `observer` is the weight observer (minmax or mse).
    """

    preset: str = "w4a8"
    granularity: str = "channelwise"
    group_size: int | None = None
    observer: str = "mse"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"unknown scheme {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise UsageError(f"unknown method {self.observer!r}: choose one of {', '.join(OBSERVERS)}")
        if self.granularity == "groupwise":
            g = self.group_size
            if g is None or g <= 0 or g % KLEIDIAI_GROUP_MULTIPLE:
                raise UsageError(
                    f"--groupsize {g} is not a positive multiple of {KLEIDIAI_GROUP_MULTIPLE} "
                    "(KleidiAI's INT4 kernels need it): use 32, 64 or 128"
                )
        elif self.group_size is not None:
            raise UsageError("internal: channelwise schemes carry no group size")

    @classmethod
    def from_options(cls, preset: str, scheme: str, method: str, groupsize: int | None) -> Scheme:
        """The learning path's flags → a Scheme (groupsize only counts for groupwise)."""
        if groupsize is None:
            groupsize = W4A16_GROUP if preset == "w4a16" else LEARNING_PATH_GROUP
        return cls(
            preset=preset,
            granularity=scheme,
            group_size=groupsize if scheme == "groupwise" else None,
            observer=method,
        )

    @property
    def parts(self) -> tuple[Scheme, ...]:
        """The schemes a checkpoint's layers use: this one (MixedScheme: several)."""
        return (self,)

    @property
    def act_tag(self) -> str:
        return "a8dyn" if self.preset == "w4a8" else "a16"

    @property
    def label(self) -> str:
        """`mse-channelwise`, `minmax-groupwise-g32` — the learning path's suffix."""
        s = f"{self.observer}-{self.granularity}"
        return s + (f"-g{self.group_size}" if self.group_size else "")

    @property
    def format(self) -> str:
        """The compressed-tensors format llmcompressor writes for this recipe: weight-only INT4 is
        packed eight values per int32 (pack-quantized, what vLLM's CompressedTensorsWNA16 loads);
        W4A8 keeps one int8 per value (int-quantized, what CompressedTensorsW4A8Int loads)."""
        return "int-quantized" if self.preset == "w4a8" else "pack-quantized"

    # ---- compressed-tensors mapping (plain dicts; pydantic objects built lazily) ----
    def weight_args(self) -> dict[str, Any]:
        return {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "dynamic": False,
            "strategy": "group" if self.group_size else "channel",
            "group_size": self.group_size,
            "observer": self.observer,
        }

    def input_args(self) -> dict[str, Any] | None:
        if self.preset != "w4a8":
            return None
        return {
            "num_bits": 8,
            "type": "int",
            "symmetric": False,
            "dynamic": True,
            "strategy": "token",
            "observer": None,
        }

    def quantization_scheme(self, targets: list[str] | None = None):
        """compressed-tensors QuantizationScheme for this recipe (imports compressed_tensors)."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        inputs = self.input_args()
        return QuantizationScheme(
            targets=targets or ["Linear"],
            weights=QuantizationArgs(**self.weight_args()),
            input_activations=QuantizationArgs(**inputs) if inputs else None,
            output_activations=None,
        )


def output_dir_name(model: str, scheme: Scheme) -> str:
    """The learning path's output naming: `{basename}-w4a8dyn-{method}-{scheme}[-g{N}]`."""
    base = os.path.basename(model.rstrip("/"))
    return f"{base}-w4{scheme.act_tag}-{scheme.label}"


@dataclass(frozen=True)
class MixedScheme:
    """Several INT4 schemes of one preset in one checkpoint, a config group each (`quantize
    --budget`: each Linear gets its own; layers kept in BF16 are in the ignore list)."""

    parts: tuple[Scheme, ...]

    def __post_init__(self) -> None:
        if len(self.parts) < 2 or len({p.preset for p in self.parts}) != 1:
            raise UsageError("internal: a mixed scheme has 2 or more parts of one preset")

    @property
    def preset(self) -> str:
        return self.parts[0].preset

    @property
    def format(self) -> str:
        return self.parts[0].format

    @property
    def act_tag(self) -> str:
        return self.parts[0].act_tag

    @property
    def label(self) -> str:
        """`mixed(mse-channelwise+minmax-groupwise-g32)`."""
        return "mixed(" + "+".join(p.label for p in self.parts) + ")"

    def input_args(self) -> dict[str, Any] | None:
        return self.parts[0].input_args()


def _group_scheme(group: dict[str, Any]) -> Scheme | None:
    w = group.get("weights") or {}
    a = group.get("input_activations")
    if w.get("num_bits") != 4 or w.get("type") != "int" or not w.get("symmetric"):
        return None
    strategy = w.get("strategy")
    if strategy not in ("channel", "group"):
        return None
    preset = "w4a8" if a and a.get("num_bits") == 8 and a.get("dynamic") else "w4a16"
    try:
        return Scheme(
            preset=preset,
            granularity="groupwise" if strategy == "group" else "channelwise",
            group_size=w.get("group_size") if strategy == "group" else None,
            observer=w.get("observer") or "minmax",
        )
    except UsageError:
        return None


def scheme_from_config(quant_config: dict[str, Any]) -> Scheme | MixedScheme | None:
    """Read a Scheme back from config.json's quantization_config (artifacts describe themselves):
    one config group → its Scheme; several of one preset (a budgeted checkpoint) → MixedScheme.

    Returns None when the block is not one of ours (another method or format)."""
    if quant_config.get("quant_method") != "compressed-tensors":
        return None
    groups = list((quant_config.get("config_groups") or {}).values())
    parts = [_group_scheme(g) for g in groups]
    if not parts or any(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    try:
        return MixedScheme(tuple(p for p in parts if p is not None))
    except UsageError:
        return None
