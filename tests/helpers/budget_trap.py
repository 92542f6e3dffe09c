"""A model on which `quantize --budget` cannot succeed, for the test of its miss: every INT4 layer
is free on the calibration text and costly on the search text (evaluate.SEARCH_TEXT, the part of
Opticks the budget's vLLM check decides on).

From a trained tiny Llama: two residual dimensions h, h2 are zero for every token of the packaged
calibration set and carry +e / −e for the tokens that occur only in the search text. Every
Linear that reads them holds a pair of columns — one below half of any candidate's INT4 step
(rounded away by every scheme), its partner R times larger (kept) — fed x and −x/R: they cancel
exactly in BF16 (R and every gain are powers of two), and INT4 leaves the partner alone, so any
quantized layer adds a term proportional to x at those tokens. o_proj and down_proj get the same
pair behind v rows and MLP units that read only h and h2; each norm's gain on h makes x about X
whatever the residual's size there. On the calibration text every trap term is exactly zero, so
the sensitivity pass sees the trained model; through vLLM on the search text each layer alone
costs more than the test's budget (printed per layer by `measure`, see test_budget.py).
"""

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

R = 16.0  # the kept column is R × the rounded-away one; its input is −1/R ×: exact cancellation in BF16
X = 1e5  # the trap input's size at each norm's output, at the evaluation-only tokens


def split_tokens(model: Path, eval_tokens: int) -> tuple[list[int], list[int]]:
    """(the first `eval_tokens` ids of the budget's search text, the ids among them that no calibration row has)."""
    from transformers import AutoTokenizer

    from arm_int4 import evaluate
    from arm_int4.quantize.llmc import packaged_calibration
    from arm_int4.quantize.sensitivity import calibration_rows

    tok = AutoTokenizer.from_pretrained(str(model))
    seen = {
        t for row in calibration_rows(tok, packaged_calibration()) for t in row
    }  # every row, as the pass reads them
    text = evaluate.load_text(evaluate.SEARCH_TEXT).text  # the part the budget's vLLM check decides on
    ids = tok(text[: 40 * eval_tokens], add_special_tokens=False)["input_ids"][:eval_tokens]
    return ids, sorted(set(ids) - seen)


def _save(sd: dict, out: Path) -> None:
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def build(src: Path, out: Path, eval_tokens: int = 1024, h: int = 5, h2: int = 6) -> Path:
    eval_ids, only = split_tokens(src, eval_tokens)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    sd = {k: v.float() for k, v in load_file(src / "model.safetensors").items()}
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_kv = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    emb = sd["model.embed_tokens.weight"]
    e = float(emb.abs().mean() * 4)
    emb[:, [h, h2]] = 0
    emb[only, h], emb[only, h2] = e, -e
    sd["model.norm.weight"][[h, h2]] = 0  # the logits never see them

    def pair(w, c1, c2):
        rest = w.clone()
        rest[:, [c1, c2]] = 0

        def group(c):
            return rest[:, c // 32 * 32 : c // 32 * 32 + 32].abs().amax(1)

        sign = 1.0 - 2.0 * (torch.arange(w.shape[0]) % 2)  # half the rows pushed up, half down
        # below half of the finest step any candidate has (|max| / 7.5 over a group of 32)
        s = (0.4 * torch.minimum(group(c1), group(c2)) / 8 * sign).to(torch.bfloat16).float()
        w[:, c1], w[:, c2] = s, R * s

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            pair(sd[p + n + ".weight"], h, h2)
        for n in ("input_layernorm", "post_attention_layernorm"):  # gains set below; 1 : 1/R cancels already
            sd[p + n + ".weight"][h], sd[p + n + ".weight"][h2] = 1.0, 1.0 / R
        v = sd[p + "self_attn.v_proj.weight"]
        j1, j2 = 3, 4  # v rows reading only h / h2: attention outputs o_j2 = −o_j1 / R (rows scale alike in INT4)
        a = float(v.abs().max())
        v[[j1, j2]] = 0
        v[j1, h], v[j2, h2] = a, a
        for qh in range(per_kv):  # the query heads that read kv head 0
            pair(sd[p + "self_attn.o_proj.weight"], qh * hd + j1, qh * hd + j2)
        g, u = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]
        m1, m2 = 7, 8  # MLP units with hidden_m2 = −hidden_m1 / R
        ga, ua = float(g.abs().max()), float(u.abs().max())
        g[[m1, m2]] = 0
        u[[m1, m2]] = 0
        g[m1, h] = g[m2, h] = ga
        u[m1, h], u[m2, h2] = ua, ua
        pair(sd[p + "mlp.down_proj.weight"], m1, m2)
        for n in ("self_attn.o_proj", "mlp.down_proj"):  # the residual's h, h2 stay the embedding's
            sd[p + n + ".weight"][[h, h2]] = 0
    _save(sd, out)

    # each norm's gain on h (a power of two; h2's is 1/R of it): x_h ≈ X at the evaluation-only tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    at = [i for i, t in enumerate(eval_ids) if t in set(only)]
    size: dict[str, float] = {}

    def hook(name):
        def record(module, args):
            x = args[0][0, at]
            size[name] = float((x[:, h] / x.pow(2).mean(-1).sqrt()).abs().median())

        return record

    for name, mod in model.named_modules():
        if name.endswith("layernorm"):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(torch.tensor([eval_ids]))
    for name, n_h in size.items():
        gain = 2.0 ** round(math.log2(X / n_h))
        sd[name + ".weight"][h], sd[name + ".weight"][h2] = gain, gain / R
    _save(sd, out)
    return out
