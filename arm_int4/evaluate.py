"""Accuracy: sliding-window perplexity measured *through vLLM*, and comparisons against a baseline.

What is scored (docs/accuracy.md has the why):
- The text is tokenized with the model's own tokenizer, without special tokens, and cut to
  `num_tokens` tokens (tokenization happens here, before and outside any timing).
- Windows hold at most `max_len` tokens: the BOS token (when the tokenizer defines one: what
  lm-eval's rolling loglikelihood uses as prefix) followed by up to `max_len - 1` text tokens.
  Window k starts at text token k*stride. Each text token is scored exactly once, in the first
  window that contains it (the Hugging Face sliding-window recipe), so every scored token after
  the first window sees at least `max_len - 1 - stride` tokens of context. Without a BOS the
  text's first token has no context and is not scored.
- vLLM runs every window as `{"prompt_token_ids": ids}` with `prompt_logprobs=0`, which returns
  the log-probability of the actual prompt token at each position (fp32 log_softmax of the
  logits, vllm/v1/worker/gpu_model_runner.py). perplexity = exp(sum of -logprob / scored tokens).

vLLM runs in a fresh subprocess per model (arm_int4/workers/perplexity_worker.py), so what is measured is
what `arm-int4 serve` serves: same loader, same W4A8 kernel, same dtype.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from . import hub
from .errors import EnvironmentMissing, ModelError, UsageError
from .schemes import scheme_from_config

__all__ = [
    "DEFAULT_TEXT",
    "SEARCH_TEXT",
    "MAX_LEN",
    "NUM_TOKENS",
    "STRIDE",
    "TEXTS",
    "PackagedText",
    "Text",
    "Window",
    "check_comparable",
    "compare",
    "format_table",
    "load_text",
    "model_fingerprint",
    "perplexity",
    "perplexities",
    "quantization_label",
    "score_windows",
    "run_scorer",
    "scoring_spec",
    "check_env",
    "read_config",
    "provenance_note",
    "sliding_windows",
    "tokenize",
]

# Defaults, written once (the CLI's EvalOptions reads these). NUM_TOKENS caps the text: the whole
# packaged text is ~146k tokens, hours for the x86 W4A8 fallback (~10 tokens/s here).
MAX_LEN, STRIDE, NUM_TOKENS, DTYPE = 512, 256, 4096, "auto"


# ------------------------------------------------------------------------------------ texts
@dataclass(frozen=True)
class PackagedText:
    """A text file shipped inside arm_int4 (arm_int4/data, provenance in its SOURCE.md), pinned by
    content hash so that two results on it are known to score the same bytes; or a part of one:
    characters [start, end) of the same pinned file (the file is never changed, so every figure
    on record stays tied to its hash)."""

    file: str  # inside arm_int4/data
    sha256: str  # of the whole file
    description: str
    licence: str
    start: int = 0  # the part's first character (str index into the decoded file)
    end: Optional[int] = None  # one past its last (None: the end of the file)
    role: str = ""  # what the part is for, printed beside every figure scored on it


_OPTICKS = PackagedText(
    file="opticks.txt",  # copied byte for byte from libbacktrace's test data (see arm_int4/data/SOURCE.md)
    sha256="d4a9ac22462b35e7821a4f2706c211093da678620a8f9997989ee7cf8d507bbd",
    description="Isaac Newton, Opticks (4th ed., 1730): Project Gutenberg eBook #33504, 567 kB English prose",
    licence="public domain (Project Gutenberg text, header and licence stripped by libbacktrace)",
    role="the whole text (searched and held-out parts together: figures before 2026-12-06 are on it)",
)
# Where "THE\n\nSECOND BOOK\n\nOF\n\nOPTICKS" begins (character 253,198 = byte 253,288 of the file):
# before it the front matter and Book I, from it Books II and III (tests/test_evaluate.py checks it).
OPTICKS_BOOK_II = 253_198

TEXTS = {
    "opticks": _OPTICKS,
    "opticks-search": replace(
        _OPTICKS,
        description="Newton's Opticks, front matter and Book I (characters 0-253,197 of opticks)",
        role="search part: what quantize --budget decides on",
        end=OPTICKS_BOOK_II,
    ),
    "opticks-heldout": replace(
        _OPTICKS,
        description="Newton's Opticks, Books II and III (characters 253,198-567,037 of opticks)",
        role="held-out part: what quantize --budget reports but never decides on",
        start=OPTICKS_BOOK_II,
    ),
}
DEFAULT_TEXT = "opticks-heldout"  # what `arm-int4 eval` scores: text no --budget search decides on
SEARCH_TEXT = "opticks-search"  # what `quantize --budget`'s vLLM check decides on


@dataclass(frozen=True)
class Text:
    name: str  # a TEXTS key, a file path, or "<text>"
    text: str
    sha256: str  # of the UTF-8 bytes: two results are comparable only on the same text
    role: str = ""  # a packaged text's role (TEXTS[name].role)

    @classmethod
    def of(cls, text: Union[str, Text], name: str = "<text>") -> Text:
        if isinstance(text, Text):
            return text
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_text(spec: str = DEFAULT_TEXT) -> Text:
    """A packaged text or part by name (see TEXTS; its sha256 is the part's) or a UTF-8 text file by path."""
    if spec in TEXTS:
        pt = TEXTS[spec]
        f = importlib.resources.files(__package__) / "data" / pt.file
        try:
            data = f.read_bytes()
        except OSError:
            raise EnvironmentMissing(
                f"text {spec!r}: {f} is missing from this arm_int4 install: reinstall arm-int4 or pass a .txt file"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != pt.sha256:
            raise EnvironmentMissing(
                f"{f} changed (sha256 {digest[:12]}…, expected {pt.sha256[:12]}…): results "
                "would not compare with earlier ones; reinstall arm-int4 or pass a .txt file"
            )
        if pt.start == 0 and pt.end is None:
            return Text(spec, data.decode("utf-8"), digest, pt.role)
        part = data.decode("utf-8")[pt.start : pt.end]
        return Text(spec, part, hashlib.sha256(part.encode("utf-8")).hexdigest(), pt.role)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise UsageError(f"text {spec!r} is neither a packaged text ({', '.join(TEXTS)}) nor a file")
    try:
        return Text.of(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError as exc:
        raise UsageError(f"text file {p} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


# ---------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    ids: tuple  # token ids fed to the model, BOS first when there is one
    score_from: int  # positions score_from..len(ids)-1 are scored (each predicted from the ones before)

    @property
    def scored(self) -> int:
        return len(self.ids) - self.score_from


def sliding_windows(ids: Sequence[int], *, max_len: int, stride: int, bos_id: Optional[int] = None) -> list:
    """The Hugging Face sliding-window recipe, with BOS (if any) opening every window."""
    prefix = () if bos_id is None else (int(bos_id),)
    span = max_len - len(prefix)  # text tokens per window
    if span < 2:
        raise UsageError(f"--max-len {max_len} leaves no room for text tokens: use at least {len(prefix) + 2}")
    if not 0 < stride <= span:
        raise UsageError(
            f"--stride {stride} must be between 1 and {span} (max-len minus the BOS token), or tokens would be skipped"
        )
    n = len(ids)
    if n < (1 if prefix else 2):
        raise UsageError(f"the text is only {n} token(s) long: nothing to score")
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + span, n)
        first = max(prev_end - begin, 0 if prefix else 1)  # first text position not scored before
        windows.append(Window(prefix + tuple(int(t) for t in ids[begin:end]), len(prefix) + first))
        prev_end = end
        if end == n:
            break
    return windows


# ------------------------------------------------------------------------------------ model facts
def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {model_dir}/config.json: {exc}") from None


def quantization_label(config: dict) -> str:
    """`w4a8 mse-channelwise`, or the config's dtype for an unquantized model (from config.json)."""
    qc = config.get("quantization_config")
    if qc:
        s = scheme_from_config(qc)
        return f"{s.preset} {s.label}" if s else str(qc.get("quant_method", "quantized"))
    text = config.get("text_config") or config
    return str(text.get("torch_dtype") or text.get("dtype") or config.get("dtype") or "unknown")


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many types for an unusable tokenizer dir
        raise ModelError(f"cannot load the tokenizer of {model_dir}: {str(exc).splitlines()[0][:200]}") from None


def model_fingerprint(model_dir: Union[str, Path], tokenizer=None) -> dict:
    """What must match for two models' perplexities to be comparable on the same text."""
    cfg = read_config(Path(model_dir))
    text = cfg.get("text_config") or cfg
    tok = tokenizer or _tokenizer(Path(model_dir))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return {
        "tokenizer_sha256": hashlib.sha256(
            json.dumps([vocab, tok.bos_token_id, tok.eos_token_id]).encode()
        ).hexdigest(),
        "architectures": cfg.get("architectures"),
        "hidden_size": text.get("hidden_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
    }


def check_comparable(baseline_dir: Union[str, Path], candidate_dir: Union[str, Path]) -> None:
    """UsageError (one line) when the two models differ in tokenizer or architecture."""
    a, b = model_fingerprint(baseline_dir), model_fingerprint(candidate_dir)
    diffs = [
        f"tokenizer vocabulary ({a[k][:12]}… vs {b[k][:12]}…)" if k == "tokenizer_sha256" else f"{k} ({a[k]} vs {b[k]})"
        for k in a
        if a[k] != b[k]
    ]
    if diffs:
        raise UsageError(
            f"baseline {baseline_dir} is not comparable with {candidate_dir}: {', '.join(diffs)} "
            "differ; the baseline must be the unquantized model the candidate was made from"
        )


def tokenize(
    model_dir: Union[str, Path], text: Union[str, Text], num_tokens: Optional[int] = None, tokenizer=None
) -> tuple:
    """(text token ids cut to num_tokens (None or 0: all), BOS id or None), with the model's tokenizer."""
    tok = tokenizer or _tokenizer(Path(model_dir))
    ids = tok(Text.of(text).text, add_special_tokens=False)["input_ids"]
    if num_tokens:
        if num_tokens < 2:
            raise UsageError(f"--num-tokens {num_tokens}: score at least 2 tokens (0 scores the whole text)")
        ids = ids[:num_tokens]
    return ids, tok.bos_token_id


# ------------------------------------------------------------------------------------ vLLM
def check_env() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise EnvironmentMissing(
            f"perplexity runs vLLM, which {sys.executable} cannot import: run it with the "
            "serving environment's python (.venv/bin/python; scripts/setup.sh builds it)"
        )


def scoring_spec(model_dir: Union[str, Path], *, max_model_len: int, request=None, machine=None):
    """The engine for scoring `model_dir`: `request` (an EngineRequest; None: the defaults) planned as
    `arm-int4 serve` plans it (dtype, guards, binding, KV sizing), with `max_model_len` tokens per
    sequence and one of them per engine step (the x86 W4A8 fallback computes ~10 prompt tokens/s here,
    and vLLM's default 4096-token step outlived its 300 s execute_model RPC timeout); eager unless the
    request or its profile says otherwise (starts faster). -> (facts, EngineSpec)."""
    from . import hardware, launch, runner

    request = request or launch.EngineRequest()
    eager = request.enforce_eager
    if eager is None and request.profile.enforce_eager is None:
        eager = True
    facts = launch.read_checkpoint(model_dir)
    job = request.replace(max_model_len=max_model_len, max_num_batched_tokens=max_model_len, enforce_eager=eager)
    machine = machine or hardware.detect(probe_runtime=False)
    return facts, launch.plan(machine, facts, job, can_bind=runner.can_set_affinity())


def run_scorer(worker: str, job: dict, plan, *, said: str, failed: str, log=None, progress=None) -> tuple:
    """Run a scoring worker (perplexity, lmeval) from its spec: `said` (+ dtype, log) as progress,
    -> (result, WorkerRun); RunError starting with `failed` and naming the kept log otherwise."""
    from . import runner

    if progress:
        progress(f"{said}, dtype {plan.dtype}" + (f" (log: {log})" if log else ""))
    run = runner.run_worker(worker, job, plan=plan, log=log)
    return run.check(failed), run


def score_windows(
    model_dir: Union[str, Path],
    windows: Sequence[Window],
    *,
    request=None,
    machine=None,
    return_token_logprobs: bool = False,
    log: Optional[Union[str, Path]] = None,
    progress: Optional[Callable[[str], None]] = None,
    plan=None,
    groups: Optional[Sequence[int]] = None,
) -> dict:
    """Run the windows through a fresh vLLM engine planned by launch.plan (scoring_spec); the worker's
    result plus `linear_kernels` (from vLLM's log) and `dtype` (what the plan chose).

    groups: window counts (summing to len(windows)) each scored by its own `generate` call and timed
    apart (`group_seconds`); default one group.

    vLLM's log goes to `log` (default: a temporary file, removed on success, named on failure)."""

    check_env()
    model_dir = Path(model_dir)
    max_model_len = max(len(w.ids) for w in windows) + 1  # the prompt + the 1 generated token
    if plan is None or (plan.max_model_len or 0) < max_model_len:
        _, plan = scoring_spec(model_dir, max_model_len=max_model_len, request=request, machine=machine)
    job = {
        "model": str(model_dir),
        "seed": 0,
        "windows": [list(w.ids) for w in windows],
        "score_from": [w.score_from for w in windows],
        "return_token_logprobs": return_token_logprobs,
        "groups": list(groups) if groups else [len(windows)],
    }
    if groups and sum(groups) != len(windows):
        raise ValueError(f"groups {list(groups)} do not add up to the {len(windows)} windows")
    said = f"scoring {len(windows)} windows of {model_dir} with vLLM"
    failed = f"vLLM could not score {model_dir}"
    result, run = run_scorer("perplexity", job, plan, said=said, failed=failed, log=log, progress=progress)
    result["linear_kernels"] = run.linear_kernels
    result["dtype"] = plan.dtype
    return result


def provenance_note(model_dir: Path) -> Optional[str]:
    """The note arm_int4.models writes beside a converted model (quantize copies it along)."""
    try:
        return json.loads((model_dir / "arm-int4-provenance.json").read_text()).get("note")
    except (OSError, ValueError, AttributeError):
        return None


def perplexity(
    model_dir: Union[str, Path],
    text: Union[str, Text],
    *,
    max_len: int = MAX_LEN,
    stride: int = STRIDE,
    num_tokens: Optional[int] = NUM_TOKENS,
    bos: bool = True,
    request=None,
    machine=None,
    log: Optional[Union[str, Path]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Sliding-window perplexity of `text` (the text itself, or a Text from load_text) under
    `model_dir`, served by vLLM. One flat record.

    num_tokens: score only the first N text tokens (None or 0: all). bos=False: no BOS prefix.
    request: the EngineRequest (None: the defaults), planned by scoring_spec on `machine`."""
    return perplexities(
        model_dir,
        [text],
        max_len=max_len,
        stride=stride,
        num_tokens=num_tokens,
        bos=bos,
        request=request,
        machine=machine,
        log=log,
        progress=progress,
    )[0]


def perplexities(
    model_dir: Union[str, Path],
    texts: Sequence[Union[str, Text]],
    *,
    max_len: int = MAX_LEN,
    stride: int = STRIDE,
    num_tokens: Optional[int] = NUM_TOKENS,
    bos: bool = True,
    request=None,
    machine=None,
    log: Optional[Union[str, Path]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list:
    """perplexity() of each text, all in one vLLM engine (one start: `quantize --budget` scores its
    search and held-out parts this way). One record per text, in order; each text's windows are one
    `generate` call, timed on its own (`score_s`; the first call also carries the engine's first-step
    warm-up: 2 s against 0.06 s for the same work on the tiny test model), and `load_s` is the shared
    engine's."""
    model_dir = Path(model_dir)
    scored = [Text.of(t) for t in texts]
    cfg = read_config(model_dir)
    limit = (cfg.get("text_config") or cfg).get("max_position_embeddings")
    if limit and max_len > limit:
        raise UsageError(f"--max-len {max_len} exceeds the model's max_position_embeddings ({limit})")
    # planned first: a checkpoint the plan refuses (e.g. W4A8 MoE off Arm) is refused before any work
    _, plan = scoring_spec(model_dir, max_model_len=max_len + 1, request=request, machine=machine)
    tok = _tokenizer(model_dir)
    parts = []  # (ids, windows) per text
    for text in scored:
        ids, bos_id = tokenize(model_dir, text, num_tokens, tokenizer=tok)
        parts.append((ids, sliding_windows(ids, max_len=max_len, stride=stride, bos_id=bos_id if bos else None)))
    windows = [w for _, ws in parts for w in ws]
    result = score_windows(
        model_dir, windows, log=log, progress=progress, plan=plan, groups=[len(ws) for _, ws in parts]
    )
    records, first = [], 0
    for text, (ids, ws), seconds in zip(scored, parts, result["group_seconds"], strict=True):
        nll, count = sum(result["nll"][first : first + len(ws)]), sum(result["counts"][first : first + len(ws)])
        first += len(ws)
        computed = sum(len(w.ids) for w in ws)
        records.append(
            {
                "model": str(model_dir),
                "model_name": hub.model_name(model_dir),  # org/name for a hub cache snapshot
                "quantization": quantization_label(cfg),
                "dtype": result["dtype"],
                "text": text.name,
                "text_role": text.role,  # a packaged part's purpose (search / held-out), "" otherwise
                "text_sha256": text.sha256,
                "text_tokens": len(ids),
                "scored_tokens": count,
                "windows": len(ws),
                "max_len": max_len,
                "stride": stride,
                "bos_token_id": tok.bos_token_id if bos else None,
                "nll": nll / count,  # mean negative log-likelihood per token, nats
                "ppl": math.exp(nll / count),
                "load_s": result["load_seconds"],  # the engine's, shared by every text scored in it
                "score_s": seconds,
                "tokens_per_s": computed / seconds if seconds else None,  # incl. overlap
                "linear_kernels": result["linear_kernels"],
                "vllm_version": result["vllm_version"],
                "provenance": provenance_note(model_dir),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        )
    return records


def compare(
    baseline_dir: Union[str, Path],
    candidates: Sequence[Union[str, Path]],
    text: Union[str, Text],
    *,
    progress: Optional[Callable[[str], None]] = None,
    **kwargs,
) -> list:
    """Perplexity of a baseline and each candidate on the same text and windows.

    Rows = perplexity() records plus `delta_ppl` (ppl - baseline ppl) and `ratio` (ppl / baseline
    ppl); the baseline is row 0. Refused before any engine starts when a candidate's tokenizer
    or architecture differs from the baseline's. kwargs go to perplexity()."""
    if not candidates:
        raise UsageError("compare needs at least one candidate model besides the baseline")
    for c in candidates:
        check_comparable(baseline_dir, c)
    text = Text.of(text)
    rows = []
    for m in [baseline_dir, *candidates]:
        rows.append(perplexity(m, text, progress=progress, **kwargs))
        if progress:
            r = rows[-1]
            progress(f"{r['model_name']}: ppl {r['ppl']:.4f} (load {r['load_s']:.0f} s, score {r['score_s']:.0f} s)")
    base = rows[0]["ppl"]
    for r in rows:
        r["delta_ppl"] = r["ppl"] - base
        r["ratio"] = r["ppl"] / base
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of perplexity (or compare) records."""
    head = (
        "| model | quantization | ppl | Δ ppl | ratio | scored tokens | engine load s | scoring s | "
        "linear kernel (vLLM's log) |"
    )
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = f"{r['delta_ppl']:+.4f}" if "delta_ppl" in r else ""
        ratio = f"{r['ratio']:.4f}" if "ratio" in r else ""
        kernel = ", ".join(r.get("linear_kernels") or []) or f"dense ({r['dtype']})"
        out.append(
            f"| {r['model_name']} | {r['quantization']} | {r['ppl']:.4f} | {delta} | {ratio} | "
            f"{r['scored_tokens']} | {r['load_s']:.1f} | {r['score_s']:.1f} | {kernel} |"
        )
    r = rows[0] if rows else {}
    if r:
        out.append(
            f"\ntext {r['text']}"
            + (f", {r['text_role']}" if r.get("text_role") else "")
            + f" (sha256 {r['text_sha256'][:12]}…), first {r['text_tokens']} tokens, "
            f"windows of {r['max_len']} tokens every {r['stride']}, BOS {r['bos_token_id']}, dtype {r['dtype']}"
        )
    for note in dict.fromkeys(x.get("provenance") for x in rows if x.get("provenance")):
        out.append(f"note: {note}")
    return "\n".join(out)
