"""Random Llama and mixture-of-experts checkpoints built locally: test fixtures and benchmark subjects.

No hub: the tokenizer is a byte-level BPE trained with `tokenizers` on text that ships with
Python itself (stdlib sources), and the weights are seeded random. Good for plumbing, speed and
memory measurements; useless for accuracy claims (use the packaged SmolLM2 for those).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LlamaShape",
    "SHAPES",
    "MOE_FAMILIES",
    "build_random_llama",
    "build_random_qwen2",
    "build_random_moe",
    "train_briefly",
    "train_tokenizer",
]

# Chat template in the ChatML style SmolLM2 uses; enough for apply_chat_template and vLLM chat.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def parameters(self) -> int:
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        attn = h * h * 2 + h * self.kv_heads * hd * 2  # q, o + k, v
        mlp = 3 * h * i
        return self.layers * (attn + mlp + 2 * h) + 2 * self.vocab * h + h


# Every Linear in/out dim is a multiple of 128, so every group size 32/64/128 divides them.
SHAPES = {
    "tiny": LlamaShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=1024),
    # ≥ 200M parameters for the quantizer/serving benchmarks (≈ 222M, as in the notes).
    "200m": LlamaShape(hidden=2048, intermediate=5632, layers=4, heads=16, kv_heads=4, vocab=16384),
    # TinyLlama-1.1B's shape: where the learning path's fp32 cast starts to cost real memory.
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=16, kv_heads=4, vocab=32000),
}


def _corpus_files() -> list[str]:
    import argparse as _a
    import json as _j
    import textwrap as _t
    import typing as _ty

    return [str(m.__file__) for m in (_a, _t, _ty)] + [os.path.join(os.path.dirname(str(_j.__file__)), "decoder.py")]


def train_tokenizer(out_dir: str | Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on stdlib sources, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(_corpus_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_random_llama(
    out_dir: str | Path, shape: str | LlamaShape = "tiny", seed: int = 0, dtype: str = "bfloat16", **config_overrides
) -> Path:
    """Write a random LlamaForCausalLM (safetensors, `dtype`) plus tokenizer into out_dir.

    config_overrides go to LlamaConfig, e.g. attention_bias=True for Qwen2-style q/k/v biases."""
    return _build_dense("llama", out_dir, shape, seed, dtype, config_overrides)


def build_random_qwen2(
    out_dir: str | Path, shape: str | LlamaShape = "tiny", seed: int = 0, dtype: str = "bfloat16", **config_overrides
) -> Path:
    """The same for Qwen2ForCausalLM (q/k/v with biases, a different architecture for vLLM)."""
    return _build_dense("qwen2", out_dir, shape, seed, dtype, config_overrides)


def _build_dense(arch: str, out_dir, shape, seed: int, dtype: str, config_overrides: dict) -> Path:
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    s = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out, s.vocab)
    config = config_cls(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **config_overrides,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = model_cls(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def train_briefly(src: str | Path, out_dir: str | Path, steps: int = 150, seed: int = 0, outlier_scale: float = 30.0):
    """A tiny model that has learnt something, for accuracy-side tests: `src` (a random model from
    this module) trained `steps` AdamW steps (batch 4 × 128 tokens, fp32) on the two texts that
    ship with arm-int4 (the calibration set's prose and the evaluation text), saved in bf16.

    Then, as in real LLMs, a few channels carry outliers: v_proj/up_proj rows are divided by
    `outlier_scale` and the o_proj/down_proj input columns they feed multiplied by it, which
    leaves the function unchanged (attention and the gated MLP are linear in v and in up) but
    makes one scale per output row (channelwise) coarse for those layers, and groups fine: so
    layers differ in how much INT4 costs them, as in real models. ~10-20 s on 2 cores."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out_dir)
    data = Path(__file__).resolve().parent / "data"
    tok = AutoTokenizer.from_pretrained(str(src))
    prose = [json.loads(line)["messages"][0]["content"] for line in (data / "calibration.jsonl").open()]
    ids = tok("\n".join(prose[:64]) + "\n" + (data / "opticks.txt").read_text()[:200_000], return_tensors="pt")
    ids = ids["input_ids"][0]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (4,), generator=g)
        x = torch.stack([ids[i : i + 128] for i in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for feed, fed, cols in (
                (layer.self_attn.v_proj, layer.self_attn.o_proj, [3 + i, 70 + i]),
                (layer.mlp.up_proj, layer.mlp.down_proj, [5 + i, 300 + i]),
            ):
                feed.weight[cols, :] /= outlier_scale
                if getattr(feed, "bias", None) is not None:
                    feed.bias[cols] /= outlier_scale
                fed.weight[:, cols] *= outlier_scale
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    return out


# Tiny MoE of each family llmcompressor and vLLM know: 2 layers, 4 experts, top-2, hidden 256,
# expert intermediate 256 (Mixtral: 512, its experts use intermediate_size). Every dim is a
# multiple of 128. DeepSeek-V2 keeps its real layout: layer 0 dense, MLA attention, 1 shared expert.
_MOE_COMMON = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)
MOE_FAMILIES = {  # family → (transformers config class, model class, config fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=256, head_dim=64)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=256, shared_expert_intermediate_size=512),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            n_routed_experts=4,
            moe_intermediate_size=256,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=64,
            q_lora_rank=None,
            qk_rope_head_dim=32,
            qk_nope_head_dim=32,
            v_head_dim=64,
            n_group=1,
            topk_group=1,
        ),
    ),
}


def build_random_moe(
    out_dir: str | Path,
    family: str = "qwen3_moe",
    seed: int = 0,
    dtype: str = "bfloat16",
    tokenizer_from: str | Path | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random MoE of `family` (MOE_FAMILIES) plus tokenizer into out_dir.

    transformers 5 holds experts fused (3-D gate_up_proj / down_proj) but save_pretrained writes
    them per expert, as the hub checkpoints are (Mixtral: experts.E.w1/w2/w3). tokenizer_from: a
    dir with a 1024-token tokenizer to copy (e.g. a tiny Llama's) instead of training one (~10 s).
    config_overrides replace MOE_FAMILIES' fields (e.g. moe_intermediate_size=160)."""
    import torch
    import transformers

    config_cls, model_cls, fields = MOE_FAMILIES[family]
    assert isinstance(fields, dict)  # MOE_FAMILIES: (config class, model class, config fields)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from:
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_from))
        tok.save_pretrained(str(out))
    else:
        tok = train_tokenizer(out, _MOE_COMMON["vocab_size"])
    settings: dict = {**_MOE_COMMON, **fields, **config_overrides}
    config = getattr(transformers, config_cls)(
        **settings, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    return out
