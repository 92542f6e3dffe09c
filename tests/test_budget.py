"""arm_int4.quantize.budget / `arm-int4 quantize --budget`: units as vLLM fuses them, sizes as the
stream engine writes them, the choice, mixed checkpoints (layout, loading in vLLM, per-layer
schemes as vLLM built them), and the budget measured through vLLM on tiny models the tests train
(a Llama and a Qwen2) where one scheme for every layer misses the budget."""

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli, w4a8_class, write_mixed
from safetensors import safe_open
from safetensors.torch import load_file

from arm_int4 import evaluate
from arm_int4.quantize import BUDGET_BASE, budget, quantize, verify_dir
from arm_int4.quantize.options import QuantizeOptions
from arm_int4.quantize.preflight import plan_quantization, read_source_checkpoint
from arm_int4.quantize.sensitivity import Sensitivity
from arm_int4.quantize.stream import run_stream
from arm_int4.schemes import MixedScheme, scheme_from_config

# The budget the vLLM tests ask for. On the trained tiny Llama, measured through vLLM on the
# search part of the packaged text (its first 4096 tokens: the whole text's first 4096): BF16
# 130.65, every layer channelwise-mse 137.69 (+5.4%), every layer g32 130.50 (-0.1%): 2% is missed
# by the smallest uniform scheme, and within reach.
BUDGET = 2.0


def _plan(model: Path):
    return plan_quantization(read_source_checkpoint(model), BUDGET_BASE, ["lm_head"], require_safetensors=True)


def test_units_are_vllms_fused_layers(tiny_llama):
    plan = _plan(tiny_llama)
    units = budget.fused_units(plan)
    layers = read_source_checkpoint(tiny_llama).config["num_hidden_layers"]
    assert len(units) == 4 * layers  # qkv, o_proj, gate_up, down_proj per layer
    by_name = {u.name: u for u in units}
    for i in range(layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert by_name[f"{a}.qkv"].weights == tuple(f"{a}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj"))
        assert by_name[f"{m}.gate_up"].weights == (f"{m}.gate_proj.weight", f"{m}.up_proj.weight")
        assert by_name[f"{a}.o_proj"].weights == (f"{a}.o_proj.weight",)
    assert sorted(w for u in units for w in u.weights) == sorted(plan.targets)


def test_option_bytes_are_what_the_stream_engine_writes(tiny_llama, tmp_path):
    plan = _plan(tiny_llama)
    units = budget.fused_units(plan)
    src = read_source_checkpoint(tiny_llama)
    for precision, scheme in itertools.product(("weight", "fp32"), budget.CANDIDATES):
        uniform = plan_quantization(src, scheme, ["lm_head"], require_safetensors=True)
        out = tmp_path / f"{precision}-{scheme.label}"
        out.mkdir()
        run_stream(uniform, out, precision, jobs=2, progress=False)
        with safe_open(out / "model.safetensors", "pt") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        width = {"I8": 1, "BF16": 2, "F32": 4}
        for u in units:
            names = [n for w in u.weights for n in (w, w.replace(".weight", ".weight_scale"))]
            written = sum(math.prod(sizes[n]) * width[dtypes[n]] for n in names)
            assert budget.option_bytes(plan, u, scheme, precision) == written, (u.name, scheme.label, precision)
    for u in units:  # BF16: the source tensors as they are
        assert budget.option_bytes(plan, u, None, "weight") == sum(plan.targets[w].nbytes for w in u.weights)


def _options(rows):
    return {
        u: [budget.Option(None if i == 0 else budget.CANDIDATES[i - 1], b, d) for i, (b, d) in enumerate(r)]
        for u, r in rows.items()
    }


def test_choose_meets_the_target_at_the_smallest_size_on_small_cases():
    """Against brute force over every assignment (4 units × 3 options, random sizes and costs):
    the choice meets the target and is the smallest that does (the DP rounds each cost up to
    1/2000 of the target, so a case whose optimum sits within that of the target could differ:
    none of these 200 does)."""
    g = torch.Generator().manual_seed(0)
    for case in range(200):
        rows = {}
        for u in range(4):
            big = int(torch.randint(800, 1200, (1,), generator=g))
            small = sorted(int(x) for x in torch.randint(300, 700, (2,), generator=g))
            costs = sorted((float(x) for x in torch.rand(2, generator=g)), reverse=True)
            rows[f"u{u}"] = [(big, 0.0), (small[0], costs[0]), (small[1], costs[1])]
        options = _options(rows)
        target = float(torch.rand(1, generator=g)) * 2
        pick = budget.choose(options, target)
        assert sum(o.kl for o in pick.values()) <= target + 1e-12, case
        best = min(
            sum(o.nbytes for o in combo)
            for combo in itertools.product(*options.values())
            if sum(o.kl for o in combo) <= target + 1e-12
        )
        assert sum(o.nbytes for o in pick.values()) == best, case


def test_choose_extremes():
    options = _options({"a": [(100, 0.0), (40, 0.3), (50, 0.1)], "b": [(100, 0.0), (45, 0.2), (60, 0.0)]})
    assert {u: o.nbytes for u, o in budget.choose(options, 10.0).items()} == {"a": 40, "b": 45}  # all smallest
    assert {u: o.nbytes for u, o in budget.choose(options, 0.0).items()} == {"a": 100, "b": 60}  # ΔNLL 0 only
    assert budget.budget_nats(10) == pytest.approx(math.log(1.1))


def test_mixed_checkpoint_layout(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    _, units, choice = write_mixed(tiny_llama, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = scheme_from_config(qc)
    assert isinstance(scheme, MixedScheme) and scheme.parts == budget.CANDIDATES
    group_of = {t: i for i, g in enumerate(qc["config_groups"].values()) for t in g["targets"]}
    kept = [u for u in units if choice[u.name].scheme is None]
    for u in units:
        modules = [w.removesuffix(".weight") for w in u.weights]
        s = choice[u.name].scheme
        if s is None:  # kept: in the ignore list, in no group
            assert all(m in qc["ignore"] and m not in group_of for m in modules), u.name
        else:  # a fused unit's parts are in one group: the group of its scheme
            assert {group_of[m] for m in modules} == {budget.CANDIDATES.index(s)}, u.name
    assert kept and "lm_head" in qc["ignore"]
    # every tensor: kept units byte for byte the source, quantized ones equal to a uniform run of their scheme
    ours, src = load_file(out / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    src_ck = read_source_checkpoint(tiny_llama)
    for i, s in enumerate(budget.CANDIDATES):
        ref_dir = tmp_path / f"uniform-{i}"
        ref_dir.mkdir()
        run_stream(plan_quantization(src_ck, s, ["lm_head"], require_safetensors=True), ref_dir, "weight", 2, False)
        ref = load_file(ref_dir / "model.safetensors")
        for u in units:
            if choice[u.name].scheme == s:
                for w in u.weights:
                    for n in (w, w.replace(".weight", ".weight_scale")):
                        assert torch.equal(ours[n], ref[n]) and ours[n].dtype == ref[n].dtype, n
    for u in kept:
        for w in u.weights:
            assert torch.equal(ours[w], src[w]) and w.replace(".weight", ".weight_scale") not in ours
    # an independent re-read: every layer checked against its own group's scheme
    report = verify_dir(out)
    assert report.layers == sum(len(u.weights) for u in units if choice[u.name].scheme is not None)


def test_sensitivity_quantizes_as_the_stream_engine_writes(trained_llama, tmp_path):
    """The weights the sensitivity pass measures are the written int values × scales."""
    out = tmp_path / "mixed"
    plan, units, choice = write_mixed(trained_llama, out)
    sens = Sensitivity(plan, "weight", 64)
    written = load_file(out / "model.safetensors")
    for u in units:
        s = choice[u.name].scheme
        for w in u.weights if s is not None else ():
            q, scale = written[w].float(), written[w.replace(".weight", ".weight_scale")].float()
            deq = (q.unflatten(-1, (scale.shape[1], -1)) * scale.unsqueeze(-1)).flatten(1)
            assert torch.equal(sens.dequantized(w, s), deq), w
    # and its unquantized NLL is transformers' own loss on the same tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained_llama), dtype=torch.float32)
    with torch.no_grad():
        assert sens.base_nll == pytest.approx(float(model(sens.ids, labels=sens.ids).loss), abs=1e-6)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--budget", "0"], "--budget 0: give a perplexity increase in percent"),
        (["--budget", "5", "--preset", "w4a16"], "--budget chooses among W4A8"),
        (["--budget", "5", "--engine", "llmcompressor"], "--budget chooses among W4A8"),
        (["--budget", "5", "--budget-tokens", "4"], "--budget-tokens 4"),
    ],
)
def test_bad_budget_options_are_one_line(extra, needle, tiny_llama, tmp_path):
    r = run_cli("quantize", tiny_llama, "--output", tmp_path / "o", *extra)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ through vLLM
@pytest.fixture(scope="module")
def budgeted(trained_llama, trained_qwen2, tmp_path_factory) -> dict:
    """`quantize --budget 2` on the trained Llama and Qwen2 (each: its source's perplexity and every
    attempt's through vLLM), and the Llama with every layer channelwise-mse (the smallest uniform
    scheme), measured the same way on the part the budget decides on."""
    root = tmp_path_factory.mktemp("budget")
    out = {}
    for name, model in (("llama", trained_llama), ("qwen2", trained_qwen2)):
        out[name] = quantize(QuantizeOptions(model=str(model), output=str(root / name), budget=BUDGET))
    cw = quantize(QuantizeOptions(model=str(trained_llama), output=str(root / "cw"), method="mse"))
    out["cw"] = evaluate.perplexity(cw.output, evaluate.load_text(evaluate.SEARCH_TEXT))
    return out


@pytest.mark.requires_vllm
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_budget_is_met_through_vllm(name, budgeted):
    r = budgeted[name]
    rep = r.budget
    best = rep.best()
    assert Path(best.path) == r.output and (r.output / "config.json").is_file()
    # decided through vLLM on the search part, against the source measured the same way …
    assert rep.base["text"] == best.record["text"] == evaluate.SEARCH_TEXT
    assert rep.base["scored_tokens"] == best.record["scored_tokens"] == evaluate.NUM_TOKENS
    increase = 100 * (best.record["ppl"] / rep.base["ppl"] - 1)
    assert increase == pytest.approx(best.increase_pct) and increase <= BUDGET, rep.summary()
    # … and reported on the held-out part (what `arm-int4 eval` scores by default), in the same engine
    assert rep.base_heldout["text"] == best.heldout["text"] == evaluate.DEFAULT_TEXT != evaluate.SEARCH_TEXT
    assert rep.base_heldout["scored_tokens"] == best.heldout["scored_tokens"] == evaluate.NUM_TOKENS
    assert best.heldout_pct == pytest.approx(100 * (best.heldout["ppl"] / rep.base_heldout["ppl"] - 1))
    assert best.heldout["load_s"] == best.record["load_s"]  # one engine start scored both parts
    assert rep.base_heldout["ppl"] != rep.base["ppl"]  # another text, another figure
    assert best.record["linear_kernels"] == [w4a8_class()], best.record["linear_kernels"]
    assert r.bytes_out < 0.75 * rep.source_bytes  # smaller than BF16 by more than a quarter (W4A8 = 1 byte/value)
    assert isinstance(r.scheme, MixedScheme) or r.scheme in budget.CANDIDATES


@pytest.mark.requires_vllm
def test_one_scheme_everywhere_misses_the_budget_the_choice_meets(budgeted):
    """What the per-layer choice buys on this model: channelwise everywhere (the smallest uniform
    scheme, the learning path's default) is over the budget through vLLM."""
    base = budgeted["llama"].budget.base["ppl"]
    assert 100 * (budgeted["cw"]["ppl"] / base - 1) > BUDGET, (budgeted["cw"]["ppl"], base)
    # the Llama's outlier layers (o_proj, down_proj) are not left channelwise
    choice = budgeted["llama"].budget.best().choice.choice
    outliers = [o for u, o in choice.items() if u.endswith(("o_proj", "down_proj"))]
    assert any(o.scheme is None or o.scheme.group_size for o in outliers)


@pytest.mark.requires_vllm
def test_mixed_checkpoints_load_and_generate_with_each_layers_scheme(budgeted, tmp_path):
    """vLLM's own per-layer view of the budgeted checkpoints: every fused layer (qkv_proj,
    gate_up_proj) got the scheme its unit was given, kept units run unquantized, and it generates."""
    from test_quantize import vllm_generate

    runs = [{"label": n, "model": budgeted[n].output, "max_tokens": 8} for n in ("llama", "qwen2")]
    got = vllm_generate(runs, tmp_path)
    for n in ("llama", "qwen2"):
        choice = budgeted[n].budget.best().choice.choice
        layers = got[n]["layers"]
        assert all(len(ids) == 8 for ids in got[n]["token_ids"])
        fused = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}
        for unit, option in choice.items():
            head, kind = unit.rsplit(".", 1)
            built = layers[f"{head}.{fused.get(kind, kind)}"]
            if option.scheme is None:
                assert built["scheme"] is None, unit
            else:
                assert built["scheme"] == "CompressedTensorsW4A8Int", unit
                assert built["group_size"] == (option.scheme.group_size or -1), unit


@pytest.mark.requires_vllm
def test_summary_prints_the_map_size_and_vllm_perplexity(budgeted):
    text = budgeted["llama"].summary()
    assert re.search(r"qkv\s+[c863B]{2}\n", text) and re.search(r"down_proj\s+[c863B]{2}", text), text
    best = budgeted["llama"].budget.best()
    # both parts, named, with the source's and the attempt's perplexity and the increase on each
    num = r"([\d.]+) → ([\d.]+) \(([-+][\d.]+)%"
    m = re.search(
        r"of tensors \(\d+% of [\d.]+ MiB\), perplexity through vLLM on opticks-search \(searched, 4096 tokens\): "
        + num
        + r", budget 2%\); on opticks-heldout \(held out, 4096 tokens\): "
        + num
        + r"\); vLLM ran ",
        text,
    )
    assert m, text
    assert float(m.group(2)) == pytest.approx(best.record["ppl"], abs=1e-3)
    assert float(m.group(5)) == pytest.approx(best.heldout["ppl"], abs=1e-3)
    assert float(m.group(6)) == pytest.approx(best.heldout_pct, abs=0.05)
    assert f"; vLLM ran {w4a8_class()}\n" in text  # the kernel the checks ran on (x86: arm_int4's, where installed)


def test_sensitivity_is_cached_per_model_and_settings(trained_llama, tmp_path):
    plan = _plan(trained_llama)
    units = budget.fused_units(plan)
    said: list[str] = []
    first = Sensitivity(plan, "weight", 64, said.append).options(units, tmp_path)
    again = Sensitivity(plan, "weight", 64, said.append)
    assert again.options(units, tmp_path) == first and said[-1].startswith("budget: per-layer sensitivity from")
    # other settings: another key, measured afresh
    assert Sensitivity(plan, "fp32", 64).cache_key() != again.cache_key()
    assert Sensitivity(plan, "weight", 32).cache_key() != again.cache_key()
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_budget_check_scores_what_arm_int4_eval_scores_by_default():
    assert QuantizeOptions.__dataclass_fields__["budget_eval_tokens"].default == evaluate.NUM_TOKENS


def test_a_budget_no_layer_fits_is_one_line_and_writes_nothing(trained_llama, tmp_path):
    """On the trained tiny Llama the least costly unit × scheme costs 2.2e-6 nats (KL, 512
    calibration tokens): a 0.0001% budget (1e-6 nats) fits no INT4 layer. Refused before vLLM."""
    r = run_cli("quantize", trained_llama, "--budget", "0.0001", "--output", tmp_path / "o")
    assert r.returncode == 1, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("arm-int4 quantize: error:")]
    needle = "--budget 0.0001: cannot be met: the least costly INT4 layer alone costs"
    assert len(err) == 1 and needle in err[0], r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.arm-int4-*"))


# ------------------------------------------------------------------------------ a budget vLLM misses
# On the trap model (tests/helpers/budget_trap.py) every INT4 layer is free on the calibration text
# and costly on the search text (the part the vLLM check decides on): alone, each costs +2.9% to
# +30000% perplexity on its first 1024 tokens (transformers, fake-quantized, every candidate; +7.3%
# the least through vLLM in the run by hand), so a 1% budget chosen on calibration misses through
# vLLM at every attempt.
TRAP_BUDGET = ["--budget", "1", "--budget-eval-tokens", "1024"]


@pytest.fixture(scope="module")
def trap(trained_llama, tmp_path_factory) -> Path:
    from helpers import budget_trap

    return budget_trap.build(trained_llama, tmp_path_factory.mktemp("trap") / "trap")


def _attempts(stderr: str) -> list[float]:
    """The perplexity increase of each attempt, from its progress line."""
    return [float(x) for x in re.findall(r"^arm-int4: budget: .* through vLLM .*\(([-+][\d.]+)%, budget", stderr, re.M)]


@pytest.mark.requires_vllm
def test_a_budget_vllm_misses_keeps_the_best_only_with_keep_best(trap, tmp_path):
    r = run_cli("quantize", trap, *TRAP_BUDGET, "--keep-best", "--output", tmp_path / "kept")
    assert r.returncode == 1, r.stderr[-3000:]
    tried = _attempts(r.stderr)
    assert 1 <= len(tried) <= budget.VLLM_ROUNDS and min(tried) > 1.0, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("arm-int4 quantize: error:")]
    assert len(err) == 1 and f"not met through vLLM after {len(tried)} attempts" in err[0], r.stderr[-3000:]
    assert f"(best {min(tried):+.1f}% perplexity" in err[0] and err[0].endswith("kept it as asked (--keep-best)")
    # the attempt with the lowest perplexity is what was kept: a checkpoint that verifies, with its summary
    assert verify_dir(tmp_path / "kept").layers > 0
    # the summary's line: the search part's increase, the held-out part's, and the kernel vLLM's log named
    assert f"({min(tried):+.1f}%, budget 1%); on opticks-heldout (held out, 1024 tokens): " in r.stdout
    assert "; vLLM ran " in r.stdout and f"output: {tmp_path / 'kept'}" in r.stdout
    assert not list(tmp_path.glob(".kept.arm-int4-*"))  # the other attempts are gone

    r = run_cli("quantize", trap, *TRAP_BUDGET, "--output", tmp_path / "not-kept")
    assert r.returncode == 1, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("arm-int4 quantize: error:")]
    assert len(err) == 1 and err[0].endswith("nothing written: raise --budget, or --keep-best to keep it"), err
    assert min(_attempts(r.stderr)) > 1.0
    assert not (tmp_path / "not-kept").exists() and not list(tmp_path.glob(".not-kept.arm-int4-*"))


@pytest.mark.parametrize("model", ["trained_llama", "trained_qwen2"])
def test_replaying_from_each_layer_scores_as_the_whole_pass_does(model, request):
    """A unit's candidates are scored from its own layer on (the layers before it see no quantized
    weight): the options, KL included, are bit for bit those of whole forward passes, so the
    choice --budget makes is unchanged while each pass costs (layers after L + head) / (all + head)."""
    plan = _plan(request.getfixturevalue(model))
    units = budget.fused_units(plan)
    said: list[str] = []
    fast = Sensitivity(plan, "weight", 64, said.append)
    assert fast.replay is not None, said  # these decoders replay exactly (checked at load)
    whole = Sensitivity(plan, "weight", 64, suffix=False)
    assert whole.replay is None
    assert fast.options(units) == whole.options(units)
    # the estimate is printed before the pass, an ETA with every unit
    assert any(
        re.fullmatch(r"budget: per-layer sensitivity: \d+ units, \d+ scoring passes .*estimated \d+ s", s) for s in said
    )
    assert re.fullmatch(r"budget: sensitivity \d+/\d+ units \(\d+ s, ETA \d+ s\)", said[-1]), said[-1]
    # a unit of the last layer is estimated cheaper than one of the first
    first, last = fast.estimate(units)[1][0], fast.estimate(units)[1][-1]
    assert last < first


def test_a_sensitivity_pass_over_the_limit_stops_before_it_starts(trained_llama, tmp_path):
    """The trained tiny Llama's pass is estimated at seconds: a limit of 0.0001 min (6 ms) refuses it
    in one line naming the estimate and both knobs, before anything is measured or written."""
    r = run_cli(
        "quantize",
        trained_llama,
        "--budget",
        "10",
        "--budget-max-minutes",
        "0.0001",
        "--output",
        tmp_path / "o",
        env={"ARM_INT4_HOME": str(tmp_path / "home")},
    )
    assert r.returncode == 1, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("arm-int4 quantize: error:")]
    assert len(err) == 1, r.stderr
    assert re.search(
        r"would take about \d+ s here, more than --budget-max-minutes 0.0001; lower --budget-tokens", err[0]
    )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.arm-int4-*"))
    assert not list((tmp_path / "home").glob("budget/*.json"))  # no half pass cached
