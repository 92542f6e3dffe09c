"""arm_int4.evaluate: windows, the packaged text and refusals (fast); perplexity through vLLM
against a transformers reference, real vs shuffled tokens, W4A8 vs BF16 (requires_vllm).

Engines are the slow part (~40-60 s to start here, and the x86 W4A8 fallback scores ~10
tokens/s), so each model is started once per module and the texts are kept short.
"""

import hashlib
import importlib.util
import json
import math
import random

import pytest
from conftest import run_cli, w4a8_class

from arm_int4 import evaluate as ev
from arm_int4.errors import UsageError
from arm_int4.request import EngineRequest


def vllm_test(f):
    f = pytest.mark.requires_vllm(f)
    return pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")(f)


@pytest.fixture(scope="module")
def opticks():
    return ev.load_text("opticks")


# ---------------------------------------------------------------- windows
@pytest.mark.parametrize(
    "n,max_len,stride,bos",
    [
        (1000, 64, 32, 1),
        (1000, 64, 63, 1),
        (1000, 64, 1, None),
        (63, 64, 32, 1),
        (64, 64, 32, 1),
        (65, 64, 32, None),
        (2, 8, 3, None),
        (1, 8, 4, 7),
        (777, 100, 50, None),
    ],
)
def test_windows_score_every_token_exactly_once(n, max_len, stride, bos):
    ids = list(range(1000, 1000 + n))
    windows = ev.sliding_windows(ids, max_len=max_len, stride=stride, bos_id=bos)
    scored = []
    for k, w in enumerate(windows):
        assert len(w.ids) <= max_len
        assert (w.ids[0] == bos) if bos is not None else (w.ids[0] == ids[k * stride])
        text = w.ids[1:] if bos is not None else w.ids
        assert list(text) == ids[k * stride : k * stride + len(text)]  # contiguous text, window k at k*stride
        assert w.score_from >= 1  # position 0 (BOS or the first token) is never a prediction target
        scored += w.ids[w.score_from :]
        if k:  # every window before the last is full, so later windows start scoring after span-stride
            span = max_len - (bos is not None)  # tokens of context: the overlap with the previous window
            assert w.score_from - (bos is not None) == span - stride
    # each text token scored once; without BOS the first token has no context
    assert scored == (ids if bos is not None else ids[1:])


def test_windows_refuse_strides_that_skip_tokens():
    with pytest.raises(UsageError, match="between 1 and 511"):
        ev.sliding_windows(list(range(2000)), max_len=512, stride=512, bos_id=1)
    with pytest.raises(UsageError, match="between 1 and 512"):
        ev.sliding_windows(list(range(2000)), max_len=512, stride=0)
    with pytest.raises(UsageError, match="nothing to score"):
        ev.sliding_windows([5], max_len=512, stride=256)


# ---------------------------------------------------------------- texts
def test_packaged_text_ships_in_arm_int4_and_is_pinned(opticks):
    from pathlib import Path

    shipped = Path(ev.__file__).parent / "data" / ev.TEXTS["opticks"].file
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == ev.TEXTS["opticks"].sha256
    assert opticks.name == "opticks" and opticks.sha256 == ev.TEXTS["opticks"].sha256
    assert len(opticks.text) == 567_038 and "OPTICKS" in opticks.text  # 567,198 UTF-8 bytes
    assert "Reflections" in opticks.text[:2000] and "Gutenberg" not in opticks.text


def test_packaged_text_refuses_other_bytes_or_a_missing_file(monkeypatch):
    import dataclasses

    from arm_int4.errors import EnvironmentMissing

    real = ev.TEXTS["opticks"]
    monkeypatch.setitem(ev.TEXTS, "opticks", dataclasses.replace(real, sha256="0" * 64))
    with pytest.raises(EnvironmentMissing, match=r"changed \(sha256 d4a9ac22462b…, expected 000000000000…\)"):
        ev.load_text("opticks")
    monkeypatch.setitem(ev.TEXTS, "opticks", dataclasses.replace(real, file="absent.txt"))
    with pytest.raises(EnvironmentMissing, match=r"absent\.txt is missing from this arm_int4 install"):
        ev.load_text("opticks")


def test_the_search_and_held_out_parts_are_disjoint_and_cover_the_text(opticks):
    """`quantize --budget` fits on opticks-search, `eval` reports on opticks-heldout: the two are cut
    from the pinned file (never edited) at the start of the Second Book, share no character and
    together are the whole text."""
    search, heldout = ev.load_text(ev.SEARCH_TEXT), ev.load_text(ev.DEFAULT_TEXT)
    assert (search.name, heldout.name) == ("opticks-search", "opticks-heldout")
    assert search.text + heldout.text == opticks.text  # disjoint, in order, nothing left out
    assert len(search.text) == ev.OPTICKS_BOOK_II == 253_198 and len(heldout.text) == 567_038 - 253_198
    # a clean boundary: the Second Book's title opens the held-out part; Book I is all in the search part
    assert heldout.text.startswith("THE\n\nSECOND BOOK\n\nOF\n\nOPTICKS\n") and search.text.endswith("\n\n\n\n")
    assert "SECOND BOOK" not in search.text and search.text.count("THE FIRST BOOK OF OPTICKS") == 2
    assert "FIRST BOOK" not in heldout.text and "THIRD BOOK" in heldout.text
    assert search.text.startswith("Produced by") and "TITLE PAGE" in search.text  # the front matter
    # each part is its own text (sha256 of its bytes), and says what it is for
    assert len({opticks.sha256, search.sha256, heldout.sha256}) == 3
    assert heldout.sha256 == hashlib.sha256(heldout.text.encode()).hexdigest()
    assert "held-out" in heldout.role and "quantize --budget" in heldout.role
    assert "search" in search.role and heldout.role.startswith("held-out part")
    # the parts are checked against the same pin as the whole file
    for name in ("opticks-search", "opticks-heldout"):
        assert (ev.TEXTS[name].file, ev.TEXTS[name].sha256) == (ev.TEXTS["opticks"].file, ev.TEXTS["opticks"].sha256)


def test_eval_scores_the_held_out_part_by_default_and_says_so(tiny_llama, monkeypatch):
    """The default text of `arm-int4 eval` (and of evaluate.load_text) is the held-out part; every
    record and the table's text line name it and its role. Several texts share one engine
    (`perplexities`, as quantize --budget scores both parts): one scoring call, one group each."""
    from arm_int4.options import EvalOptions

    assert ev.DEFAULT_TEXT == "opticks-heldout" != ev.SEARCH_TEXT
    assert EvalOptions.__dataclass_fields__["text"].default == ev.DEFAULT_TEXT
    assert ev.load_text().name == ev.DEFAULT_TEXT
    calls = []

    def fake_engine(model_dir, windows, *, groups, plan, **kw):  # no vLLM: each token costs 1 nat
        calls.append(groups)
        return {
            "nll": [float(w.scored) for w in windows],
            "counts": [w.scored for w in windows],
            "load_seconds": 1.0,
            "group_seconds": [2.0] * len(groups),
            "vllm_version": "fake",
            "linear_kernels": [],
            "dtype": plan.dtype,
        }

    monkeypatch.setattr(ev, "score_windows", fake_engine)
    texts = [ev.load_text(ev.SEARCH_TEXT), ev.load_text()]
    recs = ev.perplexities(tiny_llama, texts, num_tokens=300, max_len=128, stride=64)
    assert len(calls) == 1 and len(calls[0]) == 2  # one engine, two groups of windows
    assert [r["text"] for r in recs] == ["opticks-search", "opticks-heldout"]
    assert [r["windows"] for r in recs] == calls[0] and all(r["scored_tokens"] == 300 for r in recs)
    assert all(r["ppl"] == pytest.approx(math.e) for r in recs)
    assert [r["text_sha256"] for r in recs] == [t.sha256 for t in texts]
    assert "held-out" in recs[1]["text_role"] and "search" in recs[0]["text_role"]
    line = ev.format_table([recs[1]]).splitlines()[-1]
    assert line.startswith(
        "text opticks-heldout, held-out part: what quantize --budget reports but never decides on ("
    ), line
    r = run_cli("eval", "--help")
    assert "(default: opticks-heldout)" in " ".join(r.stdout.split()), r.stdout


def test_text_from_a_file_and_refusals(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox.\n", encoding="utf-8")
    t = ev.load_text(str(f))
    assert t.text == "The quick brown fox.\n" and t.name == str(f)
    with pytest.raises(UsageError, match="neither a packaged text"):
        ev.load_text("no-such-text")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UsageError, match="not UTF-8"):
        ev.load_text(str(tmp_path / "b.txt"))


def test_quantization_label_reads_the_config():
    assert ev.quantization_label({"torch_dtype": "bfloat16"}) == "bfloat16"
    qc = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 32,
                    "observer": "minmax",
                },
                "input_activations": {"num_bits": 8, "dynamic": True},
            }
        },
    }
    assert ev.quantization_label({"quantization_config": qc}) == "w4a8 minmax-groupwise-g32"


def test_bad_dtype_is_refused_before_any_engine(tiny_llama):
    with pytest.raises(UsageError, match="--dtype"):
        ev.score_windows(tiny_llama, [ev.Window((1, 2, 3), 1)], request=EngineRequest(dtype="int8"))


# ---------------------------------------------------------------- baseline refusal
def test_baseline_with_another_tokenizer_is_refused_in_one_line(tiny_llama, smollm2, opticks, monkeypatch):
    def no_engine(*a, **k):
        raise AssertionError("an engine was started before the refusal")

    monkeypatch.setattr(ev, "score_windows", no_engine)
    with pytest.raises(UsageError) as exc:
        ev.compare(tiny_llama, [smollm2], opticks)
    msg = str(exc.value)
    assert "\n" not in msg and "not comparable" in msg and "tokenizer vocabulary" in msg
    assert str(tiny_llama) in msg and str(smollm2) in msg and "hidden_size (256 vs 576)" in msg


def test_architecture_mismatch_is_named(tiny_llama, tmp_path):
    import shutil

    other = tmp_path / "wider"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 512
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"hidden_size \(256 vs 512\) differ"):
        ev.check_comparable(tiny_llama, other)
    ev.check_comparable(tiny_llama, tiny_llama)  # same model: comparable


# ---------------------------------------------------------------- through vLLM
def _reference_token_logprobs(model_dir, windows):
    """transformers, float32, on exactly the windows vLLM scored."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w.ids])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            pos = torch.arange(w.score_from, len(w.ids))
            out.append(lp[pos - 1, torch.tensor(w.ids)[pos]].tolist())
    return out


@pytest.fixture(scope="module")
def tiny_runs(tiny_llama):
    """One engine, both parts of the packaged text (300 tokens each) as two groups of windows, as
    quantize --budget scores them."""
    windows, groups = [], []
    for name in (ev.SEARCH_TEXT, ev.DEFAULT_TEXT):
        ids, bos = ev.tokenize(tiny_llama, ev.load_text(name), num_tokens=300)
        part = ev.sliding_windows(ids, max_len=256, stride=128, bos_id=bos)
        windows, groups = windows + part, groups + [len(part)]
    got = ev.score_windows(
        tiny_llama, windows, request=EngineRequest(dtype="float32"), return_token_logprobs=True, groups=groups
    )
    return windows, got, _reference_token_logprobs(tiny_llama, windows)


@vllm_test
def test_vllm_perplexity_matches_transformers_on_tiny_llama(tiny_runs):
    """Same fp32 weights, same windows, two implementations (vLLM's CPU attention and custom ops vs
    transformers' eager PyTorch): only the order of fp32 operations differs. Measured here: max
    per-token |Δ logprob| 9.5e-7 nats (2 ulps at |logprob| ~7), perplexity ratio 1 - 3e-8 (600 tokens of
    the whole text; 1 - 5e-8 on 300 of each part, 2026-12-06).
    Tolerance: 1e-4 nats per token, 1e-5 relative on the perplexity — 100× the measured
    agreement, yet far below what a scoring bug costs on this model: scoring each token from
    the wrong position moves tokens by up to 0.66 nats (mean 0.12), dropping the BOS by up to 0.10."""
    windows, got, ref = tiny_runs
    assert [len(x) for x in got["token_logprobs"]] == [w.scored for w in windows]
    assert len(got["group_seconds"]) == 2  # each part its own generate call, in one engine
    diffs = [abs(a - b) for gw, rw in zip(got["token_logprobs"], ref, strict=True) for a, b in zip(gw, rw, strict=True)]
    assert max(diffs) < 1e-4, f"max per-token |Δ logprob| {max(diffs):.2e}"
    n = sum(len(r) for r in ref)
    ppl_vllm = math.exp(sum(got["nll"]) / n)
    ppl_ref = math.exp(-sum(map(sum, ref)) / n)
    assert abs(ppl_vllm / ppl_ref - 1) < 1e-5, (ppl_vllm, ppl_ref)
    assert got["linear_kernels"] == []  # an unquantized model: no INT4 kernel


@pytest.fixture(scope="module")
def smol_real_and_shuffled(smollm2, opticks):
    """One engine: the first 512 tokens of the text, and the same tokens shuffled."""
    ids, bos = ev.tokenize(smollm2, opticks, num_tokens=512)
    shuffled = list(ids)
    random.Random(0).shuffle(shuffled)
    real_w = ev.sliding_windows(ids, max_len=512, stride=256, bos_id=bos)
    shuf_w = ev.sliding_windows(shuffled, max_len=512, stride=256, bos_id=bos)
    got = ev.score_windows(smollm2, real_w + shuf_w)
    k = len(real_w)
    ppl = lambda a, b: math.exp(sum(got["nll"][a:b]) / sum(got["counts"][a:b]))
    return ppl(0, k), ppl(k, len(got["nll"]))


@vllm_test
def test_real_text_is_far_more_likely_than_shuffled_tokens(smol_real_and_shuffled):
    """Measured (vLLM 0.32 CPU, bf16, 512 tokens, windows 512/256): real 35.11 on an Intel Xeon
    (AMX) box, 35.19 on an AMD EPYC one (docs/demo.md); shuffled 3465 (Xeon). Repeated runs on one
    box agree to every digit; between the two boxes' bf16 kernels the baseline moved 0.2 %. Bounds:
    ±3 % on real (15x the cross-machine spread), ±10 % on shuffled (its tokens are the model's
    least likely, where bf16 rounding weighs most). Seen outside them, inside the old 5-100 bound:
    windows re-scoring their overlap (38.96), the W4A8 channelwise-mse model instead of BF16 (80.66).
    (Dropping the BOS is not caught here: it costs only the first token's score at 512 tokens.)"""
    real, shuffled = smol_real_and_shuffled
    assert 34.1 < real < 36.2, real
    assert 3120 < shuffled < 3810, (real, shuffled)


@pytest.fixture(scope="module")
def smol_w4a8_rows(smollm2, opticks, tmp_path_factory):
    """SmolLM2 BF16 vs its W4A8 (channelwise minmax: seconds to make; mse takes ~30 s-4 min here)."""
    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize

    out = tmp_path_factory.mktemp("eval") / "smol-w4a8"
    quantize(QuantizeOptions(model=str(smollm2), output=str(out), scheme="channelwise", method="minmax"))
    # 2 windows, 225 tokens computed: the x86 W4A8 fallback scores ~10 tokens/s (~1/40 of BF16)
    return ev.compare(smollm2, [out], opticks, num_tokens=160, max_len=128, stride=64)


@vllm_test
def test_w4a8_perplexity_differs_from_bf16_and_runs_the_int4_kernel(smol_w4a8_rows):
    base, w4 = smol_w4a8_rows
    assert base["quantization"] == "bfloat16" and w4["quantization"] == "w4a8 minmax-channelwise"
    assert base["scored_tokens"] == w4["scored_tokens"] == 160 and base["windows"] == w4["windows"] == 2
    assert (base["delta_ppl"], base["ratio"]) == (0.0, 1.0)
    assert w4["ratio"] == pytest.approx(w4["ppl"] / base["ppl"])
    assert abs(w4["ratio"] - 1) > 1e-3, "W4A8 scored exactly like BF16: was the quantized model loaded?"
    # Measured here (Intel Xeon, vLLM 0.32 CPU, these 160 tokens, windows 128/64): BF16 43.79, W4A8
    # channelwise minmax 120.78, ratio 2.758; deterministic run to run. (docs/accuracy.md's 2.05 is
    # channelwise *mse* on 2048 tokens: another row.) Bounds: ±3 % on the baseline and ±10 % on the
    # ratio, which carries the x86 reference INT4 kernel's fp32 rounding as well as bf16's: wide
    # enough for another x86 box, narrow enough that a W4A8 model scored as BF16 (ratio 1.0) or a
    # finer scheme (groupwise g32: 1.32 on 2048 tokens, docs/accuracy.md) falls outside.
    assert 42.5 < base["ppl"] < 45.1, base["ppl"]
    assert 2.48 < w4["ratio"] < 3.03, w4["ratio"]
    assert w4["linear_kernels"] == [w4a8_class()] and base["linear_kernels"] == []
    table = ev.format_table(smol_w4a8_rows).splitlines()
    assert len([line for line in table if line.startswith("| ")]) == 3 and "w4a8 minmax-channelwise" in table[3]
    assert any(line.startswith("note: baseline = SmolLM2") for line in table)  # the dequantized-GGUF caveat


@vllm_test
def test_tradeoff_table_and_plot_from_real_records(smol_w4a8_rows, tmp_path):
    """`eval --plot`'s table and PNG on the two real records: the W4A8 model is smaller and less
    accurate, so both sit on the Pareto front; bits/weight as stored (tests/test_tradeoff.py)."""
    from arm_int4 import tradeoff

    rows = tradeoff.rows(smol_w4a8_rows)
    base, w4 = rows
    assert base["params"] == w4["params"] and base["bits_per_weight"] == 16.0  # SmolLM2 ships in bf16
    # channelwise: 4 bits + one bf16 scale per row of each Linear; the tied embedding (28 M of 135 M
    # parameters) stays bf16, so the whole model lands near 4 x 0.79 + 16 x 0.21 = 6.5
    assert 6.0 < w4["bits_per_weight"] < 7.0, w4["bits_per_weight"]
    assert w4["size_bytes"] < base["size_bytes"] and w4["ppl"] > base["ppl"]
    assert [r["pareto"] for r in rows] == [True, True]
    assert w4["delta_ppl"] == pytest.approx(w4["ppl"] - base["ppl"])
    md = tradeoff.format_markdown(rows).splitlines()
    assert len(md) == 4 and md[3].startswith(f"| {w4['model_name']} | w4a8 minmax-channelwise |")
    png = tradeoff.plot(rows, str(tmp_path / "t.png"))
    assert png == str(tmp_path / "t.png") and (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]  # no temporary left behind
