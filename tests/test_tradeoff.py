"""arm_int4.tradeoff: bits per weight as stored, the Pareto front, and `eval --plot/--bench` refusals.
The table and plot from real perplexity records: tests/test_evaluate.py; from real bench records:
tests/test_bench.py (TestEngineRun)."""

import json

import pytest
from conftest import run_cli
from safetensors import safe_open

from arm_int4 import tradeoff
from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize


def _count(model_dir) -> dict:
    """Independent count through safetensors' own reader: {params, linear, scale_bits, float_bits}."""
    out = dict(params=0, linear=0, scale_bits=0, float_bits=0)
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys = set(st.keys())
            for k in keys:
                t = st.get_tensor(k)
                if k.endswith("weight_scale"):
                    out["scale_bits"] += t.numel() * t.element_size() * 8
                elif k.endswith("weight_shape"):
                    w, h = st.get_tensor(k).tolist()
                    out["params"] += w * h
                    out["linear"] += w * h
                    out["scale_bits"] += t.numel() * t.element_size() * 8
                elif k.endswith("weight_packed") or (k.endswith(".weight") and k + "_scale" in keys):
                    if k.endswith(".weight"):  # int-quantized: one int8 per value
                        out["params"] += t.numel()
                        out["linear"] += t.numel()
                else:
                    out["params"] += t.numel()
                    out["float_bits"] += t.numel() * t.element_size() * 8
    return out


@pytest.mark.parametrize(
    "preset,scheme,method,g",
    [("w4a8", "channelwise", "mse", None), ("w4a8", "groupwise", "minmax", 32), ("w4a16", "groupwise", "minmax", 128)],
)
def test_bits_per_weight_counts_every_parameter_once(preset, scheme, method, g, tiny_llama, tmp_path):
    """Every format keeps the model's parameter count (the BF16 model's, to the element), and the bits
    are 4 per quantized value + the scales + 16 per other (bf16) parameter."""
    base_params, base_bits = tradeoff.weight_bits(tiny_llama)
    assert base_bits == 16 * base_params == 16 * _count(tiny_llama)["params"]  # the tiny model is all bf16
    out = quantize(
        QuantizeOptions(
            model=str(tiny_llama), output=str(tmp_path / "q"), scheme=scheme, method=method, groupsize=g, preset=preset
        )
    ).output
    params, bits = tradeoff.weight_bits(out)
    c = _count(out)
    assert params == base_params == c["params"]
    assert bits == 4 * c["linear"] + c["scale_bits"] + c["float_bits"]
    assert c["linear"] > 0.5 * params  # most of the model is quantized: bits/weight well under 16
    assert 4 < bits / params < 16


def test_pareto_front_keeps_what_nothing_beats():
    # (size, perplexity): b is dominated by a (as small, less accurate); d by c (larger, as accurate)
    points = [(100, 10.0), (100, 11.0), (60, 14.0), (70, 14.0), (200, 9.0)]
    assert tradeoff.pareto_front(points) == [True, False, True, False, True]
    assert tradeoff.pareto_front([(1, 1.0), (1, 1.0)]) == [True, True]  # ties dominate nothing


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--plot", "out.txt"], "--plot out.txt: name a .png file"),
        (
            ["--plot", "/nonexistent-dir/p.png"],
            "--plot /nonexistent-dir/p.png: directory /nonexistent-dir does not exist",
        ),
        (["--bench", "absent.json"], "--bench absent.json: not a bench JSON file"),
        (["--bench", "{tmp}/list.json"], "not a list of bench records"),
        (["--plot", "{tmp}/taken.png"], "exists: remove it or name another file"),
    ],
)
def test_bad_plot_and_bench_are_one_line_before_any_engine(argv, needle, tiny_llama, tmp_path):
    (tmp_path / "list.json").write_text(json.dumps({"not": "a list"}))
    (tmp_path / "taken.png").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = run_cli("eval", tiny_llama, *argv, cwd=tmp_path)
    assert r.returncode != 0 and r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle.replace("{tmp}", str(tmp_path)) in lines[0], r.stderr
