"""quantize/rotate.py: Hadamard matrices, the rotated model's exactness in float, `quantize --rotate`
end to end, and vLLM serving a rotated W4A8 checkpoint of the real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arm_int4.errors import UsageError
from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize
from arm_int4.quantize.rotate import CONFIG_KEY, hadamard, orthogonal, rotate_checkpoint
from arm_int4.quantize.verify import verify_dir


@pytest.mark.parametrize(
    "n, kind",
    [(64, "sylvester"), (12, "paley I"), (36, "paley II"), (576, "36 x 16"), (1536, "12 x 128"), (6, None)],
)
def test_hadamard_orders(n, kind):
    h = hadamard(n)
    if kind is None:  # 6 is no Hadamard order (only 1, 2 and multiples of 4 are)
        assert h is None
        return
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # ±1 entries: exact in float64


@pytest.mark.parametrize("n", [576, 600])  # 600 = 8 × 75: no construction here, QR fallback
def test_orthogonal_is_orthogonal_and_seeded(n):
    q = orthogonal(n, 0)
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(q, orthogonal(n, 0)) and not torch.equal(q, orthogonal(n, 1))
    if hadamard(n) is not None:  # every entry ±1/√n: no channel keeps more than its share of an outlier
        assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)))


def _source(build, root: Path, name: str, tied: bool, **config) -> Path:
    """A tiny fp32 model with what rotation must get right and random init leaves trivial: norm
    weights ≠ 1 (folded), biases ≠ 0 (rotated or kept), and tied embeddings (untied)."""
    src = build(root / name, "tiny", dtype="float32", **config)
    g = torch.Generator().manual_seed(1)
    t = load_file(str(src / "model.safetensors"))
    for k in t:
        if k.endswith("norm.weight"):
            t[k] = torch.rand(t[k].shape, generator=g) * 2 + 0.1
        elif k.endswith("_proj.bias"):
            t[k] = torch.randn(t[k].shape, generator=g)
    if tied:
        del t["lm_head.weight"]
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize(
    "arch, tied, config",
    [
        ("llama", True, {}),
        ("llama", False, {"attention_bias": True, "mlp_bias": True}),  # o_proj/down_proj biases rotate with R1
        ("qwen2", True, {}),  # q/k/v biases: q/k kept, v rotated by R2
    ],
)
def test_rotated_model_computes_the_same_logits(tmp_path, arch, tied, config):
    """fp32 model, rotated in float64 and written in fp32: the same function. Measured max |Δlogit|
    1.1-1.3e-6 on logits of std 0.4; bound 1e-4 (~80×: fp32 rounding through 2 layers). A rotation
    missing on any one tensor (a norm not folded, R2 on v but not o) moves logits by ~0.1-1."""
    from arm_int4.synthetic import build_random_llama, build_random_qwen2

    src = _source(build_random_llama if arch == "llama" else build_random_qwen2, tmp_path, arch, tied, **config)
    rot = rotate_checkpoint(src, tmp_path / "rot", seed=3)
    assert (rot.r1, rot.r2, rot.seed) == ("hadamard 256", "hadamard 64", 3)
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg[CONFIG_KEY]["r1"] == "hadamard 256"
    t = load_file(str(tmp_path / "rot" / "model.safetensors"))
    assert "lm_head.weight" in t and all(bool((v == 1).all()) for k, v in t.items() if k.endswith("norm.weight"))
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    a, b = _logits(src, ids), _logits(tmp_path / "rot", ids)
    assert a.std() > 0.3
    assert (a - b).abs().max() < 1e-4, float((a - b).abs().max())


@pytest.mark.slow  # ~50-120 s here (three 135M models in fp32); the tiny models above cover the math in CI
def test_default_model_rotated_is_exact_in_fp32_and_close_in_bf16(smollm2, tmp_path):
    """The real model (hidden 576 = Paley II 36 × Sylvester 16, head_dim 64), 512 tokens of the
    whole packaged text (opticks). Measured: fp32 rotated max |Δlogit| 2.9e-4 (logit std 7.9), top-1 identical;
    bf16 rotated (what --rotate hands the quantizer: the source's dtype) Δ NLL +0.0011 nats/token
    (perplexity +0.1%), top-1 agreement 0.988. Bounds: 3e-3 (10×) and 0.005 nats (4×; a wrong
    rotation costs nats, not thousandths)."""
    from transformers import AutoTokenizer

    from arm_int4.evaluate import load_text

    assert rotate_checkpoint(smollm2, tmp_path / "fp32", dtype="float32").r1 == "hadamard 576"
    rotate_checkpoint(smollm2, tmp_path / "bf16")
    ids = AutoTokenizer.from_pretrained(str(smollm2))(load_text("opticks").text[:20000], return_tensors="pt")[
        "input_ids"
    ]
    ids = ids[:, :512]
    ref, fp32, bf16 = (_logits(d, ids) for d in (smollm2, tmp_path / "fp32", tmp_path / "bf16"))

    def nll(logits):
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))

    assert (ref - fp32).abs().max() < 3e-3, float((ref - fp32).abs().max())
    assert torch.equal(ref.argmax(-1), fp32.argmax(-1))
    assert abs(nll(bf16) - nll(ref)) < 0.005, (nll(bf16), nll(ref))


def test_refusals_leave_nothing(tmp_path, tiny_llama):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    for name, edit, match in [
        ("moe", {"model_type": "mixtral"}, "model type 'mixtral' is not supported"),
        ("quantized", {"quantization_config": {"format": "int-quantized"}}, "already quantized"),
        ("rotated", {CONFIG_KEY: {"r1": "hadamard 256"}}, "already rotated"),
    ]:
        src = tmp_path / name
        src.mkdir()
        (src / "config.json").write_text(json.dumps({**cfg, **edit}))
        (src / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")
        with pytest.raises(UsageError, match=match):
            rotate_checkpoint(src, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()


def test_unknown_tensor_is_refused_and_output_removed(tmp_path, tiny_llama):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_llama / "config.json").read_text())
    t = load_file(str(tiny_llama / "model.safetensors"))
    t["model.layers.0.self_attn.extra_gate.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"extra_gate\.weight is not one a Llama/Qwen2 decoder has"):
        rotate_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantize_rotate_writes_a_verified_rotated_checkpoint(tmp_path, tiny_llama, monkeypatch):
    """`quantize --rotate`: the output is named -rot, says what was fused, verifies against its
    quantization_config, carries an lm_head (untied), and no temporary directory is left."""
    monkeypatch.chdir(tmp_path)
    res = quantize(QuantizeOptions(model=str(tiny_llama), scheme="channelwise", method="minmax", rotate=True))
    assert res.output.name.endswith("-rot") and res.output.parent == tmp_path
    cfg = json.loads((res.output / "config.json").read_text())
    assert cfg[CONFIG_KEY] == {"r1": "hadamard 256", "r2": "hadamard 64", "seed": 0}
    assert cfg["quantization_config"]["format"] == "int-quantized"
    assert verify_dir(res.output).layers == 14  # 2 layers × 7 Linears; lm_head stays BF16
    assert sorted(p.name for p in tmp_path.iterdir()) == [res.output.name]
    with pytest.raises(Exception, match="exists"):  # an existing output is kept without --overwrite
        quantize(QuantizeOptions(model=str(tiny_llama), scheme="channelwise", method="minmax", rotate=True))
