"""The cost of quantizing each unit of a model (`quantize --budget`'s step 2, budget.py).

The source model runs in transformers (fp32) on the packaged calibration text (chat rows, as GPTQ
sees them; never the evaluation text). A unit's weights are replaced by the stream engine's own
int values × scales (qmath: what is written to disk) and its inputs fake-quantized to INT8 per
token, as vLLM's W4A8 kernel does; the cost is the mean KL divergence of the next-token
distributions from the unquantized model's. Measured options are cached per model and settings.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..schemes import Scheme
from .preflight import QuantPlan

if TYPE_CHECKING:
    from .budget import Option, Unit

__all__ = ["Sensitivity", "calibration_ids", "calibration_rows"]


class Sensitivity:
    """The source model in transformers (fp32) and the calibration tokens: the KL divergence from
    its own next-token distributions with any set of units quantized (weights by qmath, inputs
    fake-quantized to INT8 per token)."""

    def __init__(self, plan: QuantPlan, precision: str, tokens: int, progress: Callable[[str], None] | None = None):
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
        self.base_logp = self._logp({})
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
            with torch.no_grad():
                return torch.log_softmax(self.model(self.ids).logits[0].float(), dim=-1)
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

    def options(self, units: list[Unit], cache_dir: Path | None = None) -> dict[str, list[Option]]:
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
        out = self._measure(units)
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

    def _measure(self, units: list[Unit]) -> dict[str, list[Option]]:
        from .budget import CANDIDATES, Option, option_bytes

        out: dict[str, list[Option]] = {}
        t0 = time.time()
        for i, u in enumerate(units):
            opts = [Option(None, option_bytes(self.plan, u, None, self.precision), 0.0)]
            for s in CANDIDATES:
                if s.group_size and any(self.plan.targets[w].shape[1] % s.group_size for w in u.weights):
                    continue
                d = self.kl({w: s for w in u.weights})
                opts.append(Option(s, option_bytes(self.plan, u, s, self.precision), max(d, 0.0)))
            out[u.name] = opts
            self.progress(f"budget: sensitivity {i + 1}/{len(units)} units ({time.time() - t0:.0f} s)")
        return out


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
