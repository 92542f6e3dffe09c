"""`arm-int4 quantize MODEL --budget PCT`: a scheme per Linear, the smallest model within PCT%
perplexity of the unquantized one.

1. Units. Layers vLLM fuses into one GEMM (q/k/v → qkv_proj, gate/up → gate_up_proj: its
   packed_modules_mapping for Llama, Qwen2, Mistral…) get one scheme together: vLLM picks one
   scheme for a fused layer, so a split would be served wrong. Every other Linear is its own unit.
2. Sensitivity. The model runs in transformers (fp32). For each unit and candidate (channelwise
   mse, groupwise g128/g64/g32 minmax where the input width allows), that unit alone is
   quantized with the stream engine's own math (qmath: the values written to disk), its inputs
   fake-quantized to INT8 per token as vLLM's W4A8 kernel does, and the cost is the mean KL
   divergence of the next-token distributions from the unquantized model's on calibration text:
   the expected NLL increase on text like it, never negative, and steadier than the NLL change on
   one text (which a unit can lower by chance there and raise elsewhere: measured on the tiny test
   model, units "free" by ΔNLL on the calibration text cost +2.6% on the evaluation text). The
   calibration text is the packaged GPTQ set (chat rows of Alice in Wonderland), never the
   evaluation text (Newton's Opticks).
3. Choice. Bytes on disk per unit and option (int8 values + scales, or the source dtype for BF16,
   the last resort): the smallest total whose predicted cost (KL) sum is within budget
   (ln(1 + PCT/100) nats), a multiple-choice knapsack solved by dynamic programming.
4. Check. The whole choice is applied at once and its KL measured on the calibration text;
   effects do not add exactly, so when the whole exceeds the limit the target is scaled down by
   the miss and the choice repeats (a few rounds). The caller then writes it (one config group
   per scheme) and measures perplexity through vLLM on the search part of the packaged text
   (evaluate.SEARCH_TEXT: Opticks' front matter and Book I), and rescales the limit by what it
   measured (calibration KL → vLLM perplexity): tighter after a miss, looser when well under the
   budget, so a smaller model may fit (≤ VLLM_ROUNDS writes; the smallest within budget is kept).
5. Held out. The same engine also scores the held-out part (evaluate.DEFAULT_TEXT: Books II–III,
   what `arm-int4 eval` reports by default). The search fitted its rescaling to the search part,
   so its increase there is not an independent check; the held-out increase is, and the summary
   prints both. The decision uses the search part only.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BudgetNotMet, UsageError
from ..schemes import MixedScheme, Scheme
from .preflight import QuantPlan
from .sensitivity import Sensitivity

__all__ = [
    "CANDIDATES",
    "Unit",
    "Option",
    "BudgetChoice",
    "fused_units",
    "option_bytes",
    "choose",
    "budget_nats",
    "mixed_plan",
    "format_map",
    "fit",
    "Attempt",
    "BudgetReport",
    "VLLM_ROUNDS",
]

VLLM_ROUNDS = 3  # checkpoints written and measured through vLLM at most per --budget run
CLOSE_ENOUGH = 0.75  # a vLLM-measured increase within [0.75, 1] × budget ends the search

CANDIDATES = (
    Scheme("w4a8", "channelwise", None, "mse"),
    Scheme("w4a8", "groupwise", 128, "minmax"),
    Scheme("w4a8", "groupwise", 64, "minmax"),
    Scheme("w4a8", "groupwise", 32, "minmax"),
)
_CODE = {None: "c", 128: "8", 64: "6", 32: "3"}  # the map's one-character cells; B = kept in BF16
# vLLM's packed_modules_mapping for the dense decoders we name (fused layer → its parts)
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
_UNIT_NAME = re.compile(r"(.*\.)?(\w+)\.weight")


@dataclass(frozen=True)
class Unit:
    """Linears quantized together: one, or the parts of a layer vLLM fuses."""

    name: str  # e.g. model.layers.3.self_attn.qkv
    weights: tuple[str, ...]  # their weight tensors' names in the source checkpoint

    @property
    def layer(self) -> int | None:
        m = re.search(r"\.layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Option:
    scheme: Scheme | None  # None: kept in BF16 (the source dtype)
    nbytes: int
    kl: float  # mean KL divergence from the unquantized model, nats/token, this unit alone so quantized

    @property
    def code(self) -> str:
        return "B" if self.scheme is None else _CODE.get(self.scheme.group_size, "?")


@dataclass
class BudgetChoice:
    budget_pct: float
    choice: dict[str, Option]  # unit name → option
    units: list[Unit]
    base_nll: float  # unquantized model's mean NLL on the calibration text
    predicted_kl: float  # sum of the chosen options' KL
    measured_kl: float  # the whole choice applied at once, on the calibration text
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def calibration_increase_pct(self) -> float:
        return 100 * math.expm1(self.measured_kl)

    @property
    def any_int4(self) -> bool:
        """Whether any unit is quantized (an all-BF16 choice is no INT4 model at all)."""
        return any(o.scheme is not None for o in self.choice.values())


def fused_units(plan: QuantPlan) -> list[Unit]:
    """The plan's targets grouped as vLLM fuses them, in checkpoint order."""
    groups: dict[str, list[str]] = {}
    for name in plan.targets:
        m = _UNIT_NAME.fullmatch(plan.output_name(name))
        prefix, proj = (m.group(1) or "", m.group(2)) if m else ("", name)
        groups.setdefault(prefix + _FUSED.get(proj, proj), []).append(name)
    return [Unit(k, tuple(v)) for k, v in groups.items()]


def option_bytes(plan: QuantPlan, unit: Unit, scheme: Scheme | None, precision: str) -> int:
    """Bytes on disk: BF16 = the source tensors; W4A8 = one int8 per value + a scale per row
    (channelwise) or per group of G inputs, fp32 or in the source dtype."""
    total = 0
    for w in unit.weights:
        t = plan.targets[w]
        rows, cols = t.shape
        if scheme is None:
            total += t.nbytes
        else:
            scale_bytes = 4 if precision == "fp32" else t.nbytes // (rows * cols)
            total += rows * cols + rows * (cols // scheme.group_size if scheme.group_size else 1) * scale_bytes
    return total


def budget_nats(pct: float) -> float:
    """A perplexity increase of pct% as a mean-NLL increase: ln(1 + pct/100)."""
    return math.log1p(pct / 100)


def choose(options: dict[str, list[Option]], target_nats: float, steps: int = 2000) -> dict[str, Option]:
    """The smallest options whose cost (KL) sum is within target: a multiple-choice knapsack solved
    exactly by dynamic programming over the target cut into `steps` (each option's cost rounded
    up to a step, so the sum never exceeds the target). Every unit's BF16 option costs 0, so a
    choice always exists."""
    import numpy as np

    units = list(options)
    step = target_nats / steps if target_nats > 0 else 0.0
    inf = np.iinfo(np.int64).max // 4
    best: np.ndarray = np.full(steps + 1, inf, dtype=np.int64)  # best[c]: fewest bytes at a total cost of c steps
    best[0] = 0
    picks: list[np.ndarray] = []
    for u in units:
        new = np.full_like(best, inf)
        pick: np.ndarray = np.zeros(steps + 1, dtype=np.int64)
        for i, o in enumerate(options[u]):
            cost = math.ceil(o.kl / step - 1e-9) if step else (0 if o.kl <= 0 else steps + 1)
            if cost > steps:
                continue
            cand = np.full_like(best, inf)
            cand[cost:] = best[: steps + 1 - cost] + o.nbytes
            better = cand < new
            new[better], pick[better] = cand[better], i
        best, picks = np.minimum(new, inf), picks + [pick]
    c = int(np.argmin(best))
    out: dict[str, Option] = {}
    for u, pick in zip(reversed(units), reversed(picks), strict=True):
        o = options[u][int(pick[c])]
        out[u] = o
        c -= math.ceil(o.kl / step - 1e-9) if step else 0
    return {u: out[u] for u in units}


def mixed_plan(plan: QuantPlan, units: list[Unit], choice: dict[str, Option]) -> QuantPlan:
    """The plan with each unit's chosen scheme: units kept in BF16 leave the targets and join the
    ignore list (as module names); the quantized ones form one config group per scheme."""
    layer_schemes: dict[str, Scheme] = {}
    kept: list[str] = []
    for u in units:
        s = choice[u.name].scheme
        for w in u.weights:
            if s is None:
                kept.append(plan.output_name(w).removesuffix(".weight"))
            else:
                layer_schemes[w] = s
    if not layer_schemes:  # fit() refuses this with the figures first; a guard for other callers
        raise UsageError("the budget keeps every layer in BF16: nothing would be quantized")
    parts = tuple(s for s in CANDIDATES if s in layer_schemes.values())
    targets = {n: t for n, t in plan.targets.items() if n in layer_schemes}
    ignore = list(plan.ignore if plan.config_ignore is None else plan.config_ignore) + kept
    return QuantPlan(
        plan.checkpoint,
        parts[0] if len(parts) == 1 else MixedScheme(parts),
        list(plan.ignore),
        targets,
        plan.renames,
        ignore,
        layer_schemes if len(parts) > 1 else {},
    )


def format_map(units: list[Unit], choice: dict[str, Option]) -> str:
    """One row per kind of unit (qkv, o_proj, gate_up, down_proj), one character per layer."""
    legend = "c channelwise-mse, 8/6/3 groupwise g128/g64/g32 minmax, B kept in BF16"
    layers = sorted({u.layer for u in units if u.layer is not None})
    rows: dict[str, dict[int, str]] = {}
    others = []
    for u in units:
        if u.layer is None:
            others.append(f"{u.name}: {choice[u.name].code}")
        else:
            rows.setdefault(u.kind, {})[u.layer] = choice[u.name].code
    width = max((len(k) for k in rows), default=0)
    lines = [f"per-layer schemes ({legend}); layers {layers[0]}…{layers[-1]} left to right" if layers else legend]
    lines += [f"  {k:<{width}}  " + "".join(r.get(i, " ") for i in layers) for k, r in rows.items()]
    lines += [f"  {x}" for x in others]
    return "\n".join(lines)


def fit(
    sens: Sensitivity,
    units: list[Unit],
    options: dict[str, list[Option]],
    budget_pct: float,
    limit: float | None = None,
    rounds: int = 4,
) -> BudgetChoice:
    """Choose the smallest options whose summed KL is within `limit` (calibration-KL nats; default
    the budget's ln(1 + PCT/100)), check the choice as a whole on the calibration text, and tighten
    while the whole exceeds the limit. The caller rescales `limit` from what vLLM measures."""
    t0 = time.time()
    want = budget_nats(budget_pct)
    limit = want if limit is None else limit
    target = limit
    cheapest = min((o.kl for opts in options.values() for o in opts if o.scheme is not None), default=math.inf)
    if cheapest > want:
        raise BudgetNotMet(
            f"--budget {budget_pct:g}: cannot be met: the least costly INT4 layer alone costs {cheapest:.2g} nats "
            f"(≈ {100 * math.expm1(cheapest):.2g}% perplexity) on the calibration text; nothing written: raise --budget"
        )
    log: list[dict] = []
    choice: dict[str, Option] = {}
    measured = predicted = 0.0
    for _ in range(rounds):
        choice = choose(options, target)
        predicted = sum(o.kl for o in choice.values())
        schemes = {w: o.scheme for u in units for w in u.weights if (o := choice[u.name]).scheme is not None}
        measured = sens.kl(schemes)
        log.append({"target_nats": target, "predicted_nats": predicted, "measured_nats": measured})
        sens.progress(
            f"budget: target {target:.4f} nats, predicted KL {predicted:.4f}, measured {measured:.4f} "
            f"on the calibration text (limit {limit:.4f})"
        )
        if measured <= limit or predicted <= 0:
            break
        target *= limit / measured  # the whole missed by measured/limit: aim lower by that ratio
    return BudgetChoice(budget_pct, choice, units, sens.base_nll, predicted, measured, log, time.time() - t0)


@dataclass
class Attempt:
    """One written choice and its perplexity through vLLM."""

    choice: BudgetChoice
    plan: QuantPlan
    stats: Any  # StreamStats
    verified: Any  # VerifyReport
    record: dict  # evaluate.perplexity's record on the search part: what the budget decides on
    heldout: dict  # the same engine's record on the held-out part: the independent check
    path: Path
    increase_pct: float  # on the search part
    heldout_pct: float

    def line(self, report: BudgetReport) -> str:
        b, h = report.base, report.base_heldout
        return (
            f"budget: {self.verified.nbytes / 2**20:.1f} MiB of tensors "
            f"({100 * self.verified.nbytes / report.source_bytes:.0f}% of {report.source_bytes / 2**20:.1f} MiB), "
            f"perplexity through vLLM on {self.record['text']} (searched, {self.record['scored_tokens']} tokens): "
            f"{b['ppl']:.3f} → {self.record['ppl']:.3f} ({self.increase_pct:+.1f}%, budget {report.budget_pct:g}%); "
            f"on {self.heldout['text']} (held out, {self.heldout['scored_tokens']} tokens): "
            f"{h['ppl']:.3f} → {self.heldout['ppl']:.3f} ({self.heldout_pct:+.1f}%); "
            f"vLLM ran {', '.join(self.record.get('linear_kernels') or []) or 'no INT4 kernel'}"
        )


@dataclass
class BudgetReport:
    budget_pct: float
    source_bytes: int
    base: dict = field(default_factory=dict)  # the source model's perplexity record on the search part
    base_heldout: dict = field(default_factory=dict)  # … and on the held-out part (same engine)
    attempts: list[Attempt] = field(default_factory=list)
    exhausted: bool = False  # vLLM's measurements left no INT4 layer within the rescaled limit

    def add(
        self, choice: BudgetChoice, plan: QuantPlan, stats, verified, record: dict, heldout: dict, path: Path
    ) -> None:
        pct = 100 * (record["ppl"] / self.base["ppl"] - 1)
        held = 100 * (heldout["ppl"] / self.base_heldout["ppl"] - 1)
        self.attempts.append(Attempt(choice, plan, stats, verified, record, heldout, path, pct, held))

    def best(self) -> Attempt:
        """The smallest attempt within budget, else the one with the lowest perplexity."""
        within = [a for a in self.attempts if a.increase_pct <= self.budget_pct]
        if within:
            return min(within, key=lambda a: a.verified.nbytes)
        return min(self.attempts, key=lambda a: a.increase_pct)

    def not_met_line(self, kept: bool) -> str:
        b = self.best()
        then = " (then no INT4 layer fitted what vLLM measured)" if self.exhausted else ""
        kept_or_not = (
            "kept it as asked (--keep-best)" if kept else "nothing written: raise --budget, or --keep-best to keep it"
        )
        return (
            f"--budget {self.budget_pct:g}: not met through vLLM after {len(self.attempts)} attempts{then} "
            f"(best {b.increase_pct:+.1f}% perplexity on {b.record['text']}, {b.heldout_pct:+.1f}% on "
            f"{b.heldout['text']}, at {b.verified.nbytes / 2**20:.1f} MiB); " + kept_or_not
        )

    def summary(self) -> str:
        a = self.best()
        c = a.choice
        counts: dict[str, int] = {}
        for o in c.choice.values():
            counts[o.code] = counts.get(o.code, 0) + 1
        return "\n".join(
            [
                f"  budget {self.budget_pct:g}%: {len(c.units)} units (fused as vLLM fuses them), "
                + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
                + f"; on the calibration text ({len(c.rounds)} rounds): predicted "
                f"{100 * math.expm1(c.predicted_kl):+.1f}%, measured {c.calibration_increase_pct:+.1f}% (KL as a "
                "perplexity increase)",
                "  " + format_map(c.units, c.choice).replace("\n", "\n  "),
                "  " + a.line(self),
            ]
        )
