"""Checkpoints for the emulated vLLM engine test (test_vllm_engine.py), built on the host by our
quantizer, and their float reference: the same dequantized weights in transformers, fp32.

Random init leaves logits nearly flat (lm_head std 0.02 -> logit std ~0.3) and biases at zero, so
two edits make the comparison discriminating: lm_head x LM_HEAD_GAIN (peaked logits, greedy
tokens with clear margins) and attention biases (|b| up to 4, as real Qwen2 q/k biases reach; what the defect
needs to show: vLLM packs groupwise biases wrong on Arm in bf16, and a bias of ~4 on the
first channels, where the damage lands, moves the logits clearly).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import write_mixed
from safetensors.torch import load_file, save_file

from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize
from arm_int4.synthetic import build_random_llama, build_random_moe

__all__ = ["LM_HEAD_GAIN", "MODELS", "build", "dequantized", "reference_logprobs"]

LM_HEAD_GAIN = 10.0
# label -> (source, quantize options); the bias model is a Llama with attention_bias=True
# (q/k/v/o biases, as Qwen2 has on q/k/v), the MoE a tiny Qwen3-MoE (CPUExpertsInt4).
MODELS = {
    "llama-channelwise": ("llama", dict(scheme="channelwise", method="minmax")),
    "llama-g32": ("llama", dict(scheme="groupwise", method="minmax", groupsize=32)),
    "bias-g32": ("bias", dict(scheme="groupwise", method="minmax", groupsize=32)),
    "qwen3moe-g32": ("moe", dict(scheme="groupwise", method="minmax", groupsize=32)),
    # a scheme per layer as `quantize --budget` writes it (config group per scheme, BF16 layers
    # ignored): every option in turn (conftest.write_mixed)
    "llama-mixed": ("llama", dict(mixed=True)),
    # W4A16 (pack-quantized) through CPUWNA16LinearKernel: the vLLM INT4 page's scheme on Arm
    "llama-w4a16-g128": ("llama", dict(preset="w4a16", scheme="groupwise", method="minmax", groupsize=128)),
}


def _edit(src: Path) -> None:
    path = src / "model.safetensors"
    t = load_file(str(path))
    t["lm_head.weight"] = (t["lm_head.weight"].float() * LM_HEAD_GAIN).to(t["lm_head.weight"].dtype)
    for k in t:
        if k.endswith("_proj.bias"):
            t[k] = torch.linspace(-4, 4, t[k].numel()).to(t[k].dtype)
    save_file(t, str(path), metadata={"format": "pt"})


def build(root: Path, tiny_llama: Path, labels=tuple(MODELS)) -> dict:
    """label -> quantized checkpoint dir (written by arm_int4.quantize, stream engine)."""
    makers = {
        "llama": lambda d: shutil.copytree(tiny_llama, d),
        "bias": lambda d: build_random_llama(d, "tiny", seed=1, attention_bias=True),
        "moe": lambda d: build_random_moe(d, "qwen3_moe", tokenizer_from=tiny_llama),
    }
    out = {}
    for label in labels:
        kind, opts = MODELS[label]
        src = root / f"src-{kind}"
        if not src.exists():
            makers[kind](src)
            _edit(src)
        if opts.get("mixed"):
            write_mixed(src, root / label)
            out[label] = root / label
            continue
        out[label] = quantize(QuantizeOptions(model=str(src), output=str(root / label), **opts)).output
    return out


def dequantized(ckpt: Path, out: Path) -> Path:
    """A float32 copy of a W4A8 or W4A16 checkpoint: weight = int4 value x scale (per channel or per group),
    everything else upcast; config.json without quantization_config. transformers reads it."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    t = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        t.update(load_file(str(f)))
    for k in [k for k in t if k.endswith(".weight_packed")]:  # W4A16: eight values + 8 per int32
        base, packed = k[: -len("_packed")], t.pop(k)
        rows, cols = (int(x) for x in t.pop(f"{base}_shape"))
        nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)
        t[base] = (nibbles.reshape(rows, -1)[:, :cols] - 8).to(torch.int8)
    res = {}
    for k, v in t.items():
        if k.endswith(".weight_scale"):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base and f"{base}.weight_scale" in t:
            scale = t[f"{base}.weight_scale"].float()  # [out, 1] or [out, in // group]
            res[k] = v.float() * scale.repeat_interleave(v.shape[1] // scale.shape[1], dim=1)
        else:
            res[k] = v.float()
    save_file(res, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def reference_logprobs(model_dir: Path, prompt: list, generated: list, k: int) -> dict:
    """fp32 transformers on the host: log-softmax at each generated position, teacher-forced on
    the tokens vLLM chose, plus the reference's own greedy continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        steps = lp[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
        greedy = model.generate(
            torch.tensor([prompt]), max_new_tokens=len(generated), do_sample=False, min_new_tokens=len(generated)
        )[0, len(prompt) :].tolist()
    return {"steps": steps, "greedy": greedy, "topk": steps.topk(k, dim=-1)}
