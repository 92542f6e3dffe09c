"""What a command asks of a vLLM engine: one `EngineRequest`, built once where the command starts.

Every command that starts vLLM (serve, bench, tune, eval, lm-eval tasks, quantize --budget/--eval,
the demo) builds one from its options and hands it to `launch.plan`. Knobs enter here and only here:
a tuned `Profile`, the ranks/reserve/KV/length/dtype/eager options, and the user's own vLLM
arguments after `--`. Those stay opaque for the server's command line (`vllm_args`, appended
unchanged) and are read once, here, into `vllm_kwargs` for offline engines (LLM(**kwargs)) and for
the few values the plan must respect (dtype, tensor-parallel size, max-model-len, the KV bytes).
Light: no torch, no vLLM.
"""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .checkpoint import FLOAT_BYTES
from .errors import UsageError

__all__ = ["Profile", "EngineRequest", "Decision", "parse_vllm_args", "SERVER_ONLY"]

# vLLM server arguments an offline engine (LLM(...)) does not take: dropped from its keyword arguments.
SERVER_ONLY = ("model", "host", "port", "served_model_name")
# vLLM's short spellings (engine/arg_utils.py)
_ALIASES = {
    "tp": "tensor_parallel_size",
    "pp": "pipeline_parallel_size",
    "dp": "data_parallel_size",
    "dpl": "data_parallel_size_local",
    "n": "nnodes",
    "r": "node_rank",
}


@dataclass(frozen=True)
class Decision:
    """One value the plan chose: what (an env var or engine argument), its value, where it came from
    ("rule", "profile", "request", "vllm args"), and why, as the line `serve --dry-run` prints."""

    field: str
    value: object
    source: str
    reason: str


@dataclass(frozen=True)
class Profile:
    """Tuned overrides (written by `arm-int4 tune`, read with Profile.load); None = plan decides."""

    ranks: Optional[int] = None  # 1 = one rank over all bound CPUs even on several NUMA nodes
    reserve: Optional[int] = None  # CPUs kept out of the OMP bind lists, total over ranks
    bind: Optional[str] = None  # "auto" or "nobind": leave CPU placement to vLLM / the OS
    kv_cache_gib: Optional[int] = None
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    block_size: Optional[int] = None
    dtype: Optional[str] = None
    enforce_eager: Optional[bool] = None
    tcmalloc: Optional[bool] = None
    meta: dict = field(default_factory=dict)  # free-form provenance (machine, date, scores)

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> "Profile":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        for f in dataclasses.fields(cls):
            v = data.get(f.name)
            if v is not None and f.type == Optional[int] and (type(v) is not int or v < 0):
                raise UsageError(f"{where}: {f.name} must be a whole number >= 0, not {v!r}")
        if data.get("bind") not in (None, "auto", "nobind"):
            raise UsageError(f"{where}: bind must be 'auto' or 'nobind', not {data['bind']!r}")
        if data.get("dtype") not in (None, *FLOAT_BYTES):
            raise UsageError(f"{where}: dtype must be one of {', '.join(FLOAT_BYTES)}, not {data['dtype']!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise UsageError(f"cannot read profile {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"profile {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"profile {path} must hold a JSON object")
        return cls.from_dict(data, where=f"profile {path}")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != {}}


def parse_vllm_args(args, *, offline: bool) -> dict:
    """The user's vLLM arguments as engine keyword values, read once at the command's edge:
    `--max-num-seqs 8` -> max_num_seqs=8, `--enforce-eager` -> True, `--no-enable-prefix-caching` ->
    enable_prefix_caching=False, `-tp 2` -> tensor_parallel_size=2. Values are JSON where they are
    JSON (numbers, booleans, objects), else text. A value with no --flag before it is refused for an
    offline engine (it has no positional arguments) and skipped for the server, which gets the
    arguments unchanged anyway."""
    args, out, i = list(args), {}, 0
    while i < len(args):
        name, eq, val = args[i].partition("=")
        if not re.match(r"-+[A-Za-z]", name):
            if offline:
                raise UsageError(
                    f"vLLM argument {args[i]!r} has no --flag before it: bench passes only --flags to LLM()"
                )
            i += 1
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            val = nxt if nxt is not None and not re.match(r"-+[A-Za-z]", nxt) else None  # "-1" is a value
            i += val is not None
        i += 1
        key = name.lstrip("-").replace("-", "_")
        key = _ALIASES.get(key, key)
        if val is None and key.startswith("no_"):
            out[key[3:]] = False
            continue
        try:
            out[key] = True if val is None else json.loads(val)
        except ValueError:
            out[key] = val
    return out


@dataclass(frozen=True)
class EngineRequest:
    """One command's wishes for its engine; `launch.plan` turns it into an EngineSpec. Precedence:
    the user's vLLM arguments over these fields, these fields over the profile, the profile over
    the plan's rules."""

    profile: Profile = Profile()
    ranks: Optional[int] = None
    reserve: Optional[int] = None
    kv_cache_gib: Optional[int] = None
    max_model_len: Optional[int] = None
    # scoring engines: one window per engine step (vLLM's 4096-token step outlived its 300 s RPC timeout
    # on the x86 W4A8 fallback); max_num_seqs is kept <= it, as vLLM's SchedulerConfig requires
    max_num_batched_tokens: Optional[int] = None
    dtype: Optional[str] = None  # explicit: the plan's dtype guards refuse what would break
    enforce_eager: Optional[bool] = None
    cpus: Optional[str] = None  # a cpulist: place the engine on these CPUs only (within the usable ones)
    host: str = "127.0.0.1"  # the server's; offline engines have none
    port: int = 8000
    vllm_args: tuple = ()  # opaque: last on the server's command line, unchanged
    vllm_kwargs: Mapping = field(default_factory=lambda: MappingProxyType({}))  # the same, parsed once

    def __post_init__(self):
        for key, low in (("reserve", 0), ("kv_cache_gib", 1), ("max_model_len", 1)):
            val = getattr(self, key)
            if val is not None and val < low:
                raise UsageError(f"--{key.replace('_', '-')} {val} is out of range")
        if self.ranks is not None and self.ranks < 1:
            raise UsageError(f"--ranks {self.ranks} is out of range: use 1 or more tensor-parallel ranks")
        if self.dtype is not None and self.dtype not in FLOAT_BYTES:
            raise UsageError(f"--dtype {self.dtype!r}: choose one of auto, {', '.join(FLOAT_BYTES)}")
        if self.cpus is not None and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", self.cpus):
            raise UsageError(f"--cpus {self.cpus!r} is not a CPU list: write it as 0-3,8 (ids, ranges, commas)")
        tp = self.vllm_kwargs.get("tensor_parallel_size")
        if tp is not None and (type(tp) is not int or tp < 1):
            raise UsageError(f"--tensor-parallel-size {tp!r} is not a whole number")
        object.__setattr__(self, "vllm_args", tuple(self.vllm_args))
        object.__setattr__(self, "vllm_kwargs", MappingProxyType(dict(self.vllm_kwargs)))

    @classmethod
    def build(cls, *, profile: Optional[str] = None, vllm_args=None, offline: bool = True, **fields) -> "EngineRequest":
        """From a command's options: `profile` is a file path (loaded here), `vllm_args` the words after
        `--` (parsed here, once). offline: the engine is LLM(...) (bench, tune, eval...), not a server."""
        args = tuple(vllm_args or ())
        return cls(
            profile=Profile.load(profile) if profile else Profile(),
            vllm_args=args,
            vllm_kwargs=parse_vllm_args(args, offline=offline),
            **fields,
        )

    def replace(self, **changes) -> "EngineRequest":
        return dataclasses.replace(self, **changes)
