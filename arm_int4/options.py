"""One dataclass per command: every default and its help text, written once.

cli.py builds argparse from these (through argparse-dataclass), and the library takes the
dataclass instances, so a default shown by `--help` is the default the code runs with.
No `from __future__ import annotations` here: argparse-dataclass reads real field types.
"""

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import List, Literal, Optional

import argparse_dataclass

from . import bench, evaluate, llamacpp, lmeval, manifests, tune  # light: their defaults only (no torch/vLLM at import)
from .fields import opt, positional, vllm_args
from .quantize.options import QuantizeOptions
from .request import EngineRequest
from .schemes import LEARNING_PATH_GROUP

__all__ = [
    "BenchOptions",
    "BuildOptions",
    "DemoOptions",
    "DoctorOptions",
    "EvalOptions",
    "InfoOptions",
    "LearningPathOptions",
    "QuantizeOptions",
    "ServeOptions",
    "TuneOptions",
    "OptionsParser",
    "options_from_namespace",
    "engine_request",
    "workload",
]

# The request surface: every command that starts vLLM takes these options (where they apply), and
# engine_request() is the one place they become an EngineRequest.
_REQUEST_FIELDS = ("ranks", "reserve", "kv_cache_gib", "max_model_len", "cpus", "host", "port")


@dataclass
class InfoOptions:
    json: bool = opt(False, "print the machine facts as JSON instead of a table")


@dataclass
class DoctorOptions:
    model: Optional[str] = opt(
        None,
        "also check a model: a local directory (serve plan: KV cache vs the NUMA node's memory; free disk for "
        "its INT4 output) or a hub id (the token gated models need)",
        metavar="MODEL",
    )
    json: bool = opt(False, "print the findings as JSON instead of a table")


@dataclass
class DemoOptions:
    output: Optional[str] = opt(
        None, "where the demo's checkpoints go (default: ~/.cache/arm-int4/demo)", metavar="DIR"
    )
    quick: bool = opt(
        False,
        "a shorter run for CI: 128 tokens of perplexity instead of 512, bench batch 1 only "
        "with shorter prompts and outputs",
    )
    overwrite: bool = opt(False, "replace the demo's outputs in --output (the default cache dir is always reused)")


_Q = {f.name: f for f in fields(QuantizeOptions)}


@dataclass
class LearningPathOptions:
    """scripts/quantize_vllm_models.py: the learning path's four arguments, defaults shared with
    QuantizeOptions (only --scheme differs: required there, as in Arm's script)."""

    model_id: str = field(metadata={**_Q["model"].metadata, "args": ["model_id"], "metavar": "model_id"})
    scheme: Literal["channelwise", "groupwise"] = field(metadata=_Q["scheme"].metadata)
    method: Literal["minmax", "mse"] = field(default=QuantizeOptions.method, metadata=_Q["method"].metadata)
    groupsize: int = field(
        default=LEARNING_PATH_GROUP,
        metadata={
            **_Q["groupsize"].metadata,
            "help": "input features per scale for --scheme groupwise (a multiple of 32)",
        },
    )

    def to_quantize_options(self) -> QuantizeOptions:
        # fp32 observers: the learning path's script casts the model to fp32 before quantizing
        return QuantizeOptions(
            model=self.model_id,
            scheme=self.scheme,
            method=self.method,
            groupsize=self.groupsize,
            observer_precision="fp32",
        )


def _describe_default(f) -> str:
    if f.default is not MISSING:
        d = f.default
    elif f.default_factory is not MISSING:
        d = " ".join(map(str, f.default_factory()))
    else:
        return ""
    if isinstance(d, bool) or d is None or d == "":
        return ""
    return f" (default: {d})"


class OptionsParser(argparse_dataclass.ArgumentParser):
    """argparse-dataclass's parser (one argument per field of `options_class`), plus two things its
    field metadata does not carry: the default shown at the end of each help text, and `const`
    (the value of a bare `--flag` with nargs="?"). Both are added where argparse takes them, in
    add_argument, which argparse-dataclass calls once per field."""

    def __init__(self, options_class, *args, **kwargs):
        self._fields = {f.name: f for f in fields(options_class)}
        super().__init__(options_class, *args, **kwargs)

    def add_argument(self, *args, **kwargs):
        name = kwargs.get("dest") or (args[0].lstrip("-").replace("-", "_") if args else None)
        f = self._fields.get(name) if name and hasattr(self, "_fields") else None
        if f is not None:
            if kwargs.get("help"):
                kwargs["help"] += _describe_default(f)
            if "const" in f.metadata:
                kwargs["const"] = f.metadata["const"]
            if f.metadata.get("action") == "append":  # repeatable: None when never given
                kwargs.update(action="append", default=None)
        return super().add_argument(*args, **kwargs)


def workload(opts) -> bench.Workload:
    """The Workload of bench's or tune's -p/-n/-b/-r/--warmup (and bench's --seed)."""
    seed = {"seed": opts.seed} if hasattr(opts, "seed") else {}
    return bench.Workload(
        prompts=tuple(opts.prompt),
        gens=tuple(opts.gen),
        batches=tuple(opts.batch),
        repetitions=opts.repetitions,
        warmup=opts.warmup,
        **seed,
    )


def engine_request(opts, *, offline: bool = True) -> EngineRequest:
    """The EngineRequest of a command's options (serve, bench, tune, eval): its profile file, the
    ranks/reserve/KV/length options it has, its dtype ("auto": the plan's), and the words after `--`,
    parsed here once. offline: the engine is LLM(...), not the OpenAI server."""
    dtype = getattr(opts, "dtype", None)
    return EngineRequest.build(
        profile=getattr(opts, "profile", None),
        vllm_args=getattr(opts, "vllm_args", None),
        offline=offline,
        dtype=None if dtype == "auto" else dtype,
        **{k: getattr(opts, k) for k in _REQUEST_FIELDS if hasattr(opts, k)},
    )


def options_from_namespace(options_class, ns: argparse.Namespace):
    names = {f.name for f in fields(options_class)}
    kwargs = {k: v for k, v in vars(ns).items() if k in names and v is not MISSING}
    return options_class(**kwargs)


@dataclass
class ServeOptions:
    model: str = positional(
        "model", "a local Hugging Face model dir (quantized or not), a hub id, or 'default'", metavar="MODEL"
    )
    vllm_args: Optional[List[str]] = vllm_args(
        "after --: passed to vLLM's server unchanged and last, so they win over the plan"
    )
    profile: Optional[str] = opt(
        None, "a tuned profile (JSON from `arm-int4 tune`) overriding the plan's rules", metavar="FILE"
    )
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port to listen on; checked free before vLLM starts")
    kv_cache_gib: Optional[int] = opt(
        None,
        "KV cache per rank in whole GiB (VLLM_CPU_KVCACHE_SPACE; default: sized from available memory)",
        metavar="N",
    )
    max_model_len: Optional[int] = opt(
        None, "longest prompt + output in tokens (default: the model's, capped by the KV cache)", metavar="TOKENS"
    )
    reserve: Optional[int] = opt(
        None,
        "CPUs kept free of inference threads for vLLM's scheduler and API "
        "server, in total (default: 1 per rank, as vLLM)",
        metavar="N",
    )
    ranks: Optional[int] = opt(
        None,
        "tensor-parallel ranks, each bound to its own CPUs (several may share a NUMA "
        "node); default: one per NUMA node (vLLM's --tensor-parallel-size)",
        metavar="N",
    )
    cpus: Optional[str] = opt(
        None, "only these CPUs (a cpulist such as 0-15,32); with --replicas, split between them", metavar="LIST"
    )
    replicas: Optional[int] = opt(
        None,
        "N independent engines, each on its own slice of the CPUs and its NUMA node's memory, behind vllm-router "
        "on --host/--port (engines on the next ports, 127.0.0.1 only)",
        metavar="N",
    )
    upstream: Optional[List[str]] = opt(
        None,
        "a running engine elsewhere (base URL) that joins the router; repeatable; alone: a router only",
        action="append",
        type=str,
        metavar="URL",
    )
    dry_run: bool = opt(
        False,
        "print the plan as a shell snippet (export lines + command; every process's with --replicas) and exit; a "
        "hub id is planned from its config.json and safetensors index, no weights downloaded (exit 1 if the "
        "download would not fit the disk)",
    )
    emit: Optional[str] = opt(
        None,
        "print deployment files rendered from the plan and exit: k8s (a Deployment of one replica per NUMA node "
        "unless --replicas, Guaranteed QoS, arm64 nodes, and a Service) or compose (replicas + vllm-router)",
        choices=manifests.KINDS,
        metavar="KIND",
    )
    machine_dump: Optional[str] = opt(
        None,
        "plan for a recorded machine instead of this one (with --dry-run or --emit): a folder holding cpuinfo or "
        "lscpu.txt, and meminfo for its memory (tests/fixtures/machines has some)",
        metavar="DIR",
    )


@dataclass
class BuildOptions:
    """Every default is None: the defaults live once, in scripts/build_vllm_cpu.sh."""

    vllm_version: Optional[str] = opt(
        None, "vLLM release to build (script default: the version arm-int4 runs)", metavar="V"
    )
    source: Optional[str] = opt(None, "build this vLLM source tree instead (kept as is)", metavar="DIR")
    source_from: Optional[str] = opt(
        None, "where a release comes from (script default: sdist)", args=["--from"], choices=("sdist", "git")
    )
    jobs: Optional[int] = opt(None, "compile jobs (script default: min(usable CPUs, memory / 4 GiB))", metavar="N")
    out: Optional[str] = opt(None, "wheel + build record dir (script default: build/dist)", metavar="DIR")
    workdir: Optional[str] = opt(None, "source tree, venvs, logs; kept (script default: build/work)", metavar="DIR")
    offline_deps: Optional[str] = opt(
        None, "local oneDNN/ComputeLibrary (and wheels/, sdist) instead of github.com", metavar="DIR"
    )
    machine_dump: Optional[str] = opt(None, "plan as a recorded machine (only with --dry-run)", metavar="DIR")
    test_wheel: Optional[str] = opt(None, "only install WHL in a scratch venv and smoke-test it", metavar="WHL")
    dry_run: bool = opt(False, "print the plan and exit (exit 1 if a check would stop the build)")
    no_test: bool = opt(False, "skip the scratch-venv install and smoke test")


@dataclass
class EvalOptions:
    models: List[str] = positional(
        "models",
        "models to score: local Hugging Face model dirs (quantized or not), hub ids, or 'default'",
        nargs="+",
        metavar="MODEL",
    )
    baseline: Optional[str] = opt(
        None,
        "also score this unquantized model and report Δ ppl and ratio against it (refused unless its "
        "tokenizer and architecture match every MODEL's)",
        metavar="MODEL",
    )
    text: str = opt(
        evaluate.DEFAULT_TEXT,
        "text to score: 'opticks-heldout' (Books II-III of Newton's Opticks, shipped in arm_int4: text no "
        "quantize --budget search decides on), 'opticks-search' (front matter and Book I: what --budget fits on), "
        "'opticks' (the whole book: figures before 2026-12-06), or a UTF-8 .txt file",
        metavar="NAME|FILE",
    )
    num_tokens: int = opt(evaluate.NUM_TOKENS, "score the first N tokens of the text (0: all of it)", metavar="N")
    max_len: int = opt(evaluate.MAX_LEN, "tokens per window, BOS included", metavar="TOKENS")
    stride: int = opt(
        evaluate.STRIDE,
        "tokens between window starts; each token is scored once, with at least max-len - 1 - stride tokens of context",
        metavar="TOKENS",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        evaluate.DTYPE, "vLLM's activation dtype (auto: the plan's, as serve picks it)"
    )
    no_bos: bool = opt(False, "do not open each window with the tokenizer's BOS token")
    format: Literal["md", "json", "jsonl"] = opt("md", "md: a table; json/jsonl: the full records")
    log: Optional[str] = opt(
        None, "append vLLM's logs here (default: a temp file, kept only on failure)", metavar="FILE"
    )
    tasks: List[str] = opt(
        list(lmeval.TASKS),
        f"what to score: '{lmeval.PERPLEXITY}' (the --text check), "
        "'opticks_cloze' (a packaged multiple-choice task, offline), or lm-eval "
        "task names (e.g. gsm8k, as in vLLM's INT4 doc; hub data needs network)",
        nargs="+",
        metavar="TASK",
    )
    num_fewshot: int = opt(lmeval.NUM_FEWSHOT, "lm-eval tasks: few-shot examples per prompt", metavar="N")
    limit: float = opt(lmeval.LIMIT, "lm-eval tasks: documents per task (a fraction if < 1; 0: all)", metavar="N")
    batch_size: str = opt(
        lmeval.BATCH_SIZE, "lm-eval tasks: requests per vLLM call ('auto': all at once)", metavar="auto|N"
    )
    include_path: Optional[str] = opt(
        None,
        "lm-eval tasks: a directory of task YAML files (local data: dataset_path: json + data_files)",
        metavar="DIR",
    )
    output: Optional[str] = opt(
        None, "also save every record (perplexity, lm-eval results and samples) as JSON", metavar="FILE"
    )
    plot: Optional[str] = opt(
        None,
        "perplexity: also draw perplexity against size on disk as a PNG, the Pareto front marked (a new file)",
        metavar="FILE.png",
    )
    bench: Optional[str] = opt(
        None,
        "perplexity: add decode tok/s at batch 1 to the trade-off table from these bench records "
        "(arm-int4 bench --json FILE, or the demo's demo-bench.json)",
        metavar="FILE.json",
    )
    vllm_args: Optional[List[str]] = vllm_args(
        "after --: engine args passed to vLLM unchanged in every engine, as for bench"
    )
    profile: Optional[str] = opt(
        None,
        "a tuned profile (JSON from `arm-int4 tune`) as for serve: score what serve --profile serves",
        metavar="FILE",
    )
    kv_cache_gib: Optional[int] = opt(
        None, "KV cache per rank in whole GiB (default: sized from the windows and available memory)", metavar="N"
    )
    reserve: Optional[int] = opt(None, "CPUs kept free of inference threads, as for serve", metavar="N")
    ranks: Optional[int] = opt(None, "tensor-parallel ranks, each bound to its own CPUs, as for serve", metavar="N")


@dataclass
class BenchOptions:
    models: List[str] = field(
        default_factory=list,
        metadata=dict(  # none given: [] ('default'), not a crash
            args=["models"],
            help="model dirs (quantized or not), hub ids, or 'default' (when none is given); several = "
            "one side-by-side table with speed-ups over the first unquantized one",
            nargs="*",
            metavar="MODEL",
        ),
    )
    vllm_args: Optional[List[str]] = vllm_args(
        "after --: engine args passed to vLLM unchanged and last (e.g. -- --enforce-eager)"
    )
    prompt: List[int] = opt(
        list(bench.PROMPTS), "prompt lengths in tokens", args=["-p", "--prompt"], nargs="+", type=int, metavar="N"
    )
    gen: List[int] = opt(
        list(bench.GENS), "tokens generated per request", args=["-n", "--gen"], nargs="+", type=int, metavar="N"
    )
    batch: List[int] = opt(
        list(bench.BATCHES), "concurrent requests per batch", args=["-b", "--batch"], nargs="+", type=int, metavar="N"
    )
    repetitions: int = opt(
        bench.REPETITIONS, "timed batches per test (mean ± sd over them)", args=["-r", "--repetitions"], metavar="N"
    )
    warmup: int = opt(bench.WARMUP, "untimed batches per test before the timed ones", metavar="N")
    seed: int = opt(bench.SEED, "seed of the random prompt token ids and of vLLM", metavar="N")
    json: Optional[str] = opt(
        None, "also write the records as JSON ('-': to stdout instead of the table)", metavar="FILE"
    )
    jsonl: Optional[str] = opt(None, "also write the records as JSON lines ('-': to stdout)", metavar="FILE")
    csv: Optional[str] = opt(None, "also write the records as CSV ('-': to stdout)", metavar="FILE")
    plot: Optional[str] = opt(None, "draw prefill and decode tok/s per model and test", metavar="FILE.png")
    server: Optional[str] = opt(
        None,
        "time this running OpenAI-compatible server instead (batch = concurrent "
        "clients); MODEL, if given, is its checkpoint dir (for GB/s)",
        metavar="URL",
    )
    profile: Optional[str] = opt(None, "a tuned profile (JSON from `arm-int4 tune`) as for serve", metavar="FILE")
    kv_cache_gib: Optional[int] = opt(
        None, "KV cache per rank in whole GiB (default: sized from the workload and available memory)", metavar="N"
    )
    reserve: Optional[int] = opt(None, "CPUs kept free of inference threads, as for serve", metavar="N")
    ranks: Optional[int] = opt(None, "tensor-parallel ranks, each bound to its own CPUs, as for serve", metavar="N")
    log_dir: Optional[str] = opt(
        None, "keep every vLLM log here (default: temp files, kept only on failure)", metavar="DIR"
    )
    refresh_bandwidth: bool = opt(False, "measure this machine's memory bandwidth again (it is cached)")
    vs_llamacpp: Optional[str] = opt(
        None,
        "also run llama.cpp (llama-cpp-python, set up by ARM_INT4_LLAMACPP=1 scripts/setup.sh) on the same "
        "tests and threads as the first MODEL, in the same table, which says what precision it compares: "
        "FILE.gguf; or a type (Q4_0, Q4_1, Q8_0, BF16): llama.cpp's own conversion of the run's unquantized "
        "MODEL to it; or no value: Q4_0 when a MODEL is INT4 (INT4 against INT4), else Q4_1 (the shipped "
        "GGUF for 'default') (put MODELs first)",
        nargs="?",
        const=llamacpp.AUTO,
        type=str,
        metavar="GGUF|TYPE",
    )


@dataclass
class TuneOptions:
    model: str = positional(
        "model", "the model dir to tune for (quantized or not), a hub id, or 'default'", metavar="MODEL"
    )
    vllm_args: Optional[List[str]] = vllm_args(
        "after --: engine args passed to vLLM unchanged in every candidate (not written to the profile)"
    )
    objective: Literal["decode", "throughput"] = opt(
        tune.OBJECTIVES[0],
        "decode: best batch-1 decode tok/s; throughput: best output tok/s among batch sizes "
        "whose per-request TPOT p50 is within --tpot-limit-ms (sets max_num_seqs)",
    )
    tpot_limit_ms: float = opt(tune.TPOT_LIMIT_MS, "TPOT p50 limit for --objective throughput, in ms", metavar="MS")
    modes: List[str] = opt(
        list(tune.MODES),
        "compilation modes to try: eager (--enforce-eager, starts faster) and compiled (vLLM's default)",
        nargs="+",
        choices=tune.MODES,
        metavar="MODE",
    )
    placements: List[str] = opt(
        list(tune.PLACEMENTS),
        "CPU placements to try, where they apply: all CPUs bound; "
        "reserve1 (one left to vLLM); half (16+ CPUs); numa (one "
        "rank per node, 2+ nodes); tp2 (two tensor-parallel ranks on one node); auto (vLLM's own binding)",
        nargs="+",
        choices=tune.PLACEMENTS,
        metavar="KIND",
    )
    output: Optional[str] = opt(
        None, "where the profile JSON goes (default: ./{model}-{objective}.profile.json)", metavar="FILE"
    )
    overwrite: bool = opt(False, "replace an existing --output file")
    prompt: List[int] = opt(
        list(tune.PROMPTS), "prompt lengths in tokens", args=["-p", "--prompt"], nargs="+", type=int, metavar="N"
    )
    gen: List[int] = opt(
        list(tune.GENS), "tokens generated per request", args=["-n", "--gen"], nargs="+", type=int, metavar="N"
    )
    batch: List[int] = opt(
        list(tune.BATCHES),
        "concurrent requests per batch (throughput objective; decode measures batch 1)",
        args=["-b", "--batch"],
        nargs="+",
        type=int,
        metavar="N",
    )
    repetitions: int = opt(
        tune.REPETITIONS, "timed batches per test (mean ± sd over them)", args=["-r", "--repetitions"], metavar="N"
    )
    warmup: int = opt(bench.WARMUP, "untimed batches per test before the timed ones", metavar="N")
    json: Optional[str] = opt(
        None, "also write every candidate's records as JSON ('-': to stdout instead of the tables)", metavar="FILE"
    )
    log_dir: Optional[str] = opt(
        None, "keep every vLLM log here (default: temp files, kept only on failure)", metavar="DIR"
    )
