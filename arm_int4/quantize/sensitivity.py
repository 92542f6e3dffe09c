"""The cost of quantizing each unit of a model (`quantize --budget`'s step 2, budget.py).

The source model runs in transformers (fp32) on the packaged calibration text (chat rows, as GPTQ
sees them; never the evaluation text). A unit's weights are replaced by the stream engine's own
int values × scales (qmath: what is written to disk) and its inputs fake-quantized to INT8 per
token, as vLLM's W4A8 kernel does; the cost is the mean KL divergence of the next-token
distributions from the unquantized model's. Measured options are cached per model and settings.

A unit in decoder layer L changes nothing before L, so its candidates are scored by running layers
L… from the unquantized model's recorded input to L (the "suffix"), not the whole model: the same
operations on the same inputs, checked bit for bit against the whole forward pass when the model is
loaded (a model where replaying its layers does not reproduce its logits runs whole passes). Before
the pass starts its time is estimated from the replay's own per-layer times.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BudgetTooSlow, UsageError
from ..schemes import Scheme
from .preflight import QuantPlan

if TYPE_CHECKING:
    from .budget import Option, Unit

__all__ = ["Sensitivity", "calibration_ids", "calibration_rows"]


class Sensitivity:
    """The source model in transformers (fp32) and the calibration tokens: the KL divergence from
    its own next-token distributions with any set of units quantized (weights by qmath, inputs
    fake-quantized to INT8 per token)."""

    def __init__(
        self,
        plan: QuantPlan,
        precision: str,
        tokens: int,
        progress: Callable[[str], None] | None = None,
        suffix: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .llmc import packaged_calibration

        self.plan, self.precision, self.progress = plan, precision, progress or (lambda s: None)
        path = str(plan.checkpoint.path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        self.ids = calibration_ids(tok, packaged_calibration(), tokens)
        self.modules = dict(self.model.named_modules())
        self.original: dict[str, object] = {}
        self.replay: _Replay | None = None
        self.base_logp = self._logp({}) if not suffix else self._capture()
        self.full_seconds = math.nan  # one warm whole forward pass, timed only when it is the unit of work
        if self.replay is None:
            t0 = time.perf_counter()
            self._logp({})
            self.full_seconds = time.perf_counter() - t0
        self.base_p = self.base_logp.exp()
        self.base_nll = float(-self.base_logp[:-1].gather(1, self.ids[0, 1:, None]).mean())

    def _module(self, weight: str):
        name = self.plan.output_name(weight).removesuffix(".weight")
        if name not in self.modules:
            raise UsageError(f"--budget: layer {name} is not a module of the model transformers builds")
        return self.modules[name]

    def kl(self, schemes: dict[str, Scheme]) -> float:
        """Mean KL(unquantized ‖ quantized) of the next-token distributions, nats/token, with the
        weights in `schemes` (tensor name → scheme) quantized."""
        logp = self._logp(schemes)
        return float((self.base_p * (self.base_logp - logp)).sum(-1).mean())

    def _start(self, schemes) -> int:
        """The first decoder layer the quantized weights can change (0 without a replay)."""
        if self.replay is None or not schemes:
            return 0
        return min(self.replay.layer_of(self.plan.output_name(w)) for w in schemes)

    def _capture(self):
        """The whole forward pass with each decoder layer's inputs recorded; kept (self.replay)
        only if replaying every layer from layer 0 gives the same logits, bit for bit."""
        import torch

        replay = _Replay.of(self.model)
        if replay is None:
            self.progress("budget: this model's layers are not replayed one by one: one whole pass per candidate")
            return self._logp({})
        with torch.no_grad(), replay.recording():
            logits = self.model(self.ids, use_cache=False).logits[0].float()
        with torch.no_grad():
            again = replay.run(0, timed=True)[0].float()
        if not torch.equal(again, logits):
            self.progress(
                "budget: replaying this model's layers does not reproduce its logits: one whole pass per candidate"
            )
            replay = None
        self.replay = replay
        return torch.log_softmax(logits, dim=-1)

    def seconds(self, schemes_weights) -> float:
        """Estimated seconds of one scoring pass with these weights quantized."""
        if self.replay is None:
            return self.full_seconds
        return self.replay.seconds_from(self._start(dict.fromkeys(schemes_weights)))

    def _logp(self, schemes: dict[str, Scheme]):
        """log-softmax of the logits at every calibration position, [tokens, vocab]."""
        import torch

        hooks, saved = [], []
        try:
            for w, s in schemes.items():
                m = self._module(w)
                saved.append((m, m.weight.data))
                m.weight.data = self.dequantized(w, s)
                hooks.append(m.register_forward_pre_hook(_int8_per_token))
            start = self._start(schemes)
            with torch.no_grad():
                if self.replay is not None and start > 0:
                    logits = self.replay.run(start)[0]
                else:
                    logits = self.model(self.ids, use_cache=False).logits[0]
                return torch.log_softmax(logits.float(), dim=-1)
        finally:
            for h in hooks:
                h.remove()
            for m, data in saved:
                m.weight.data = data

    def dequantized(self, weight: str, scheme: Scheme):
        """int values × scales in fp32, from the stream engine's own math on the stored weight."""
        from .qmath import quantize_weight

        src = self._source(weight)
        q, scale = quantize_weight(src, scheme.group_size, scheme.observer, self.precision)
        g = scheme.group_size or src.shape[1]
        return (q.float().unflatten(-1, (-1, g)) * scale.float().unsqueeze(-1)).reshape(src.shape)

    def _source(self, weight: str):
        """The weight as stored (bf16…), read once from the checkpoint: what the stream engine sees."""
        if weight not in self.original:
            from .safetensors_io import ShardReader

            for shard, tensors in self.plan.checkpoint.shards.items():
                if weight in tensors:
                    with ShardReader(self.plan.checkpoint.path / shard) as r:
                        self.original[weight] = r.read(weight)
        return self.original[weight]

    def cache_key(self) -> str:
        """What the measured options depend on: the model's config and weights (each shard's size
        and mtime), the calibration tokens, the observer precision and the candidates."""
        import hashlib

        from .budget import CANDIDATES

        ck = self.plan.checkpoint
        files = sorted((ck.path / f for f in ck.shards), key=str)
        facts = {
            "config": ck.config,
            "shards": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            "ids": hashlib.sha256(json.dumps(self.ids[0].tolist()).encode()).hexdigest(),
            "precision": self.precision,
            "candidates": [s.label for s in CANDIDATES],
            "targets": sorted(self.plan.targets),
            "version": 1,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def options(
        self, units: list[Unit], cache_dir: Path | None = None, max_minutes: float | None = None
    ) -> dict[str, list[Option]]:
        """Every unit × candidate, measured one at a time; kept in cache_dir (by cache_key), so a
        second budget on the same model costs no sensitivity pass."""
        from .budget import CANDIDATES, Option

        cached = cache_dir / f"{self.cache_key()}.json" if cache_dir else None
        if cached and cached.is_file():
            by_label = {s.label: s for s in CANDIDATES}
            raw = json.loads(cached.read_text())
            self.progress(f"budget: per-layer sensitivity from {cached}")
            return {
                u: [Option(by_label[o["scheme"]] if o["scheme"] else None, o["nbytes"], o["kl"]) for o in opts]
                for u, opts in raw.items()
            }
        out = self._measure(units, max_minutes)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            rows = {
                u: [{"scheme": o.scheme.label if o.scheme else None, "nbytes": o.nbytes, "kl": o.kl} for o in opts]
                for u, opts in out.items()
            }
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, cached)
        return out

    def candidates(self, u: Unit) -> list[Scheme]:
        from .budget import CANDIDATES

        return [
            s
            for s in CANDIDATES
            if not (s.group_size and any(self.plan.targets[w].shape[1] % s.group_size for w in u.weights))
        ]

    def estimate(self, units: list[Unit]) -> tuple[float, list[float]]:
        """(seconds, each unit's seconds) the pass should take: its scoring passes, each timed from
        the replay's per-layer times (or the whole pass), ×1.1 for quantizing the candidates."""
        each = [1.1 * len(self.candidates(u)) * self.seconds(u.weights) for u in units]
        return sum(each), each

    def _measure(self, units: list[Unit], max_minutes: float | None = None) -> dict[str, list[Option]]:
        from .budget import Option, option_bytes

        total, each = self.estimate(units)
        passes = sum(len(self.candidates(u)) for u in units)
        how = "from each layer on" if self.replay is not None else "whole model"
        self.progress(
            f"budget: per-layer sensitivity: {len(units)} units, {passes} scoring passes ({how}) on "
            f"{self.ids.shape[1]} tokens; estimated {_duration(total)}"
        )
        if max_minutes is not None and total > 60 * max_minutes:
            raise BudgetTooSlow(
                f"--budget: the per-layer sensitivity pass would take about {_duration(total)} here, more than "
                f"--budget-max-minutes {max_minutes:g}; lower --budget-tokens (now {self.ids.shape[1]}: its time is "
                "about proportional) or raise --budget-max-minutes; nothing written"
            )
        out: dict[str, list[Option]] = {}
        t0, done = time.time(), 0.0
        for i, u in enumerate(units):
            opts = [Option(None, option_bytes(self.plan, u, None, self.precision), 0.0)]
            for s in self.candidates(u):
                d = self.kl({w: s for w in u.weights})
                opts.append(Option(s, option_bytes(self.plan, u, s, self.precision), max(d, 0.0)))
            out[u.name] = opts
            done += each[i]
            spent = time.time() - t0
            left = spent / done * (total - done) if done > 0 else math.nan
            self.progress(f"budget: sensitivity {i + 1}/{len(units)} units ({spent:.0f} s, ETA {_duration(left)})")
        return out


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class _Replay:
    """A decoder-only model's layers run one by one from recorded inputs: layers[i] gets the
    positional and keyword arguments the model gave it on the unquantized pass; after the last
    layer, the final norm and the LM head. Per-layer times are measured on the check replay."""

    _LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def __init__(self, layers, norm, head):
        self.layers, self.norm, self.head = layers, norm, head
        self.inputs: list[tuple] = []
        self.final = None  # the final norm's input
        self.times = [0.0] * (len(layers) + 1)  # per layer, then norm + head

    @classmethod
    def of(cls, model) -> _Replay | None:
        inner = getattr(model, "model", None)
        layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
        head = model.get_output_embeddings()
        if layers is None or norm is None or head is None or not len(layers):
            return None
        return cls(list(layers), norm, head)

    def layer_of(self, module_name: str) -> int:
        """The decoder layer a module is in; the LM head after all of them; anything else (an
        embedding) before layer 0."""
        m = self._LAYER.search(module_name)
        if m:
            return int(m.group(1))
        return len(self.layers) if module_name.removesuffix(".weight") == "lm_head" else 0

    @contextlib.contextmanager
    def recording(self):
        """While open, each layer's (args, kwargs) and the final norm's input are recorded."""
        self.inputs = []

        def pre(module, args, kwargs):
            self.inputs.append((args, dict(kwargs)))

        def final(module, args):
            self.final = args[0]

        hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in self.layers]
        hooks.append(self.norm.register_forward_pre_hook(final))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def run(self, start: int, timed: bool = False):
        """Logits [1, tokens, vocab] from layer `start` on (len(layers): the norm and head only)."""
        n = len(self.layers)
        h = self.inputs[start][0][0] if start < n else self.final
        for i in range(start, n):
            t = time.perf_counter()
            args, kwargs = self.inputs[i]
            h = self.layers[i](h, *args[1:], **kwargs)
            h = h[0] if isinstance(h, tuple) else h
            if timed:
                self.times[i] = time.perf_counter() - t
        t = time.perf_counter()
        out = self.head(self.norm(h))
        if timed:
            self.times[n] = time.perf_counter() - t
        return out

    def seconds_from(self, start: int) -> float:
        return sum(self.times[min(start, len(self.layers)) :])


def calibration_rows(tokenizer, path):
    """Token ids of each calibration row in turn, chat-templated as GPTQ sees them."""
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "messages" in row and tokenizer.chat_template:
                text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            else:
                text = row.get("text") or " ".join(m["content"] for m in row.get("messages", []))
            yield tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_ids(tokenizer, path, tokens: int):
    """The first `tokens` tokens of the calibration rows, one row after another: a [1, tokens] tensor."""
    import torch

    ids: list[int] = []
    for row in calibration_rows(tokenizer, path):
        ids += row
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise UsageError(f"--budget: the calibration set has {len(ids)} tokens, fewer than {tokens}")
    return torch.tensor([ids[:tokens]])


def _int8_per_token(module, args):
    """vLLM W4A8's activations: INT8, asymmetric, one scale and zero point per token (fake-quantized)."""
    import torch

    (x,) = args[:1]
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    scale = torch.clamp((hi - lo) / 255, min=1e-12)
    zp = torch.round(-lo / scale) - 128
    q = torch.clamp(torch.round(x / scale) + zp, -128, 127)
    return ((q - zp) * scale,) + tuple(args[1:])
