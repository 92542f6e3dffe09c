"""Mixture-of-experts checkpoints: both engines write llmcompressor's tensors and names for the
Mixtral, Qwen3-MoE, Qwen2-MoE and DeepSeek-V2 layouts; pre-flight covers the experts; a W4A8 MoE
is refused in one line off Arm by serve, bench and info; the expert kernel path (vLLM's packing +
its C++ op, transcribed) matches a float reference on this x86 host (Arm: tests/arm/test_moe.py)."""

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import REPO, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from arm_int4.errors import PreflightError
from arm_int4.options import QuantizeOptions
from arm_int4.quantize import quantize
from arm_int4.quantize.llmc import llmc_job, run_llmcompressor_jobs
from arm_int4.quantize.moe import MOE_IGNORE
from arm_int4.quantize.verify import verify_dir
from arm_int4.schemes import Scheme
from arm_int4.synthetic import MOE_FAMILIES, build_random_moe

# family → (scheme, method, group) quantized by both engines; (MoE block name in the checkpoint)
CONFIGS = {
    "mixtral": ("channelwise", "mse", None),
    "qwen3_moe": ("groupwise", "minmax", 32),
    "qwen2_moe": ("groupwise", "mse", 32),
    "deepseek_v2": ("channelwise", "minmax", None),
}
BLOCK = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "qwen2_moe": "mlp", "deepseek_v2": "mlp"}
# Linear layers quantized: attention + experts (4 × 3 per MoE layer) + shared experts / dense MLP
LAYERS = {
    "mixtral": 2 * (4 + 12),
    "qwen3_moe": 2 * (4 + 12),
    "qwen2_moe": 2 * (4 + 12 + 3),
    "deepseek_v2": 2 * 4 + 3 + (12 + 3),
}


def _tensors(d):
    with safe_open(str(d / "model.safetensors"), "pt") as st:
        return {k: st.get_tensor(k) for k in st.keys()}


def _qconfig(d):
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    qc.pop("version")  # compressed-tensors 0.17 (serving env) vs 0.19 (quantization env)
    return qc


def _opts(model, out, family, **kw):
    scheme, method, g = CONFIGS[family]
    return QuantizeOptions(model=str(model), output=str(out), scheme=scheme, method=method, groupsize=g or 32, **kw)


@pytest.fixture(scope="module")
def moe_models(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: build_random_moe(root / f, f, tokenizer_from=tiny_llama) for f in MOE_FAMILIES}


@pytest.fixture(scope="module")
def stream_moe(moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-stream")
    # observer precision "weight": llmc_moe runs llmcompressor on the bf16 model (no fp32 cast)
    return {f: quantize(_opts(m, root / f, f, observer_precision="weight")).output for f, m in moe_models.items()}


@pytest.fixture(scope="module")
def llmc_moe(moe_models, tmp_path_factory):
    """All four families in one llmcompressor process (its import is most of the ~30 s), with the
    ignore list `quantize --engine llmcompressor` passes for a MoE."""
    root = tmp_path_factory.mktemp("moe-llmc")
    jobs = [
        llmc_job(m, root / f, Scheme.from_options("w4a8", *CONFIGS[f]), ["lm_head"] + MOE_IGNORE)
        for f, m in moe_models.items()
    ]
    run_llmcompressor_jobs(jobs)
    return {f: root / f for f in moe_models}


def test_checkpoints_on_disk_are_per_expert(moe_models):
    """transformers 5 fuses experts in memory but save_pretrained writes them per expert."""
    mix = _tensors(moe_models["mixtral"])
    assert mix["model.layers.0.block_sparse_moe.experts.3.w1.weight"].shape == (512, 256)  # hub names w1/w2/w3
    assert not any(t.dim() == 3 for t in mix.values())
    q3 = _tensors(moe_models["qwen3_moe"])
    assert q3["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (256, 256)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_stream_writes_llmcompressors_names_and_keeps_routers_float(family, stream_moe):
    d, block = stream_moe[family], BLOCK[family]
    t, qc = _tensors(d), _qconfig(d)
    assert verify_dir(d).layers == LAYERS[family]
    layer = 1  # DeepSeek-V2's layer 0 is dense (first_k_dense_replace=1)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.{layer}.{block}.experts.3.{proj}.weight"
        assert t[name].dtype == torch.int8 and int(t[name].abs().max()) <= 8, name
        assert t[name + "_scale"].dtype == torch.bfloat16, name
    assert not any(k.split(".")[-2] in ("w1", "w2", "w3") for k in t), "Mixtral's hub names must become gate/up/down"
    router = f"model.layers.{layer}.{block}.gate"
    assert t[router + ".weight"].dtype == torch.bfloat16 and router + ".weight_scale" not in t
    assert router in qc["ignore"] and qc["ignore"][-1] == "lm_head"
    if family == "qwen2_moe":  # the shared expert is quantized, its gate (Linear H→1) is not
        assert t["model.layers.1.mlp.shared_expert.down_proj.weight"].dtype == torch.int8
        assert t["model.layers.1.mlp.shared_expert_gate.weight"].dtype == torch.bfloat16
        assert "model.layers.1.mlp.shared_expert_gate" in qc["ignore"]


@pytest.mark.requires_quant_env
@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_stream_equals_llmcompressor_on_moe(family, stream_moe, llmc_moe):
    ours, theirs = _tensors(stream_moe[family]), _tensors(llmc_moe[family])
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), f"{k} differs"
    assert _qconfig(stream_moe[family]) == _qconfig(llmc_moe[family])
    assert verify_dir(llmc_moe[family]).layers == LAYERS[family]  # our verifier reads llmcompressor's MoE


def _refusal(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert any(all(n in line for n in needles) for line in lines), r.stderr
    return lines


def test_group_size_must_divide_the_experts_too(tiny_llama, tmp_path):
    """Expert intermediate 160: 32 divides it, 64 does not (attention and hidden are 256)."""
    m = build_random_moe(tmp_path / "m", "qwen3_moe", tokenizer_from=tiny_llama, moe_intermediate_size=160)
    r = run_cli("quantize", m, "--scheme", "groupwise", "--groupsize", "64", "--output", tmp_path / "o")
    lines = _refusal(r, "--groupsize 64", "160", "experts.0.down_proj", "--groupsize 32")
    assert len(lines) == 1 and not (tmp_path / "o").exists()


def test_expert_shapes_and_fused_storage_are_checked(moe_models, tmp_path):
    bad = shutil.copytree(moe_models["qwen3_moe"], tmp_path / "bad-shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moe_intermediate_size"] = 384
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PreflightError, match=r"experts\.0\.gate_proj.*\[256, 256\].*\[384, 256\]"):
        quantize(QuantizeOptions(model=str(bad), output=str(tmp_path / "o1")))
    fused = shutil.copytree(moe_models["qwen3_moe"], tmp_path / "fused")
    t = _tensors(fused)
    for layer in (0, 1):  # rewrite the experts as transformers 5 holds them in memory: 3-D
        p = f"model.layers.{layer}.mlp.experts"
        w = {
            n: torch.stack([t.pop(f"{p}.{e}.{n}.weight") for e in range(4)])
            for n in ("gate_proj", "up_proj", "down_proj")
        }
        t[f"{p}.gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)
        t[f"{p}.down_proj"] = w["down_proj"]
    save_file(t, str(fused / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PreflightError, match=r"stored fused.*--engine llmcompressor"):
        quantize(QuantizeOptions(model=str(fused), output=str(tmp_path / "o2")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-shape", "fused"]  # nothing written


# ---------------------------------------------------------------- W4A8 MoE off Arm: one line
MOE_RULE = ("CPUExpertsInt4", "Arm CPUs only", "x86_64")


def test_serve_refuses_w4a8_moe_on_x86_in_one_line(stream_moe):
    lines = _refusal(run_cli("serve", stream_moe["qwen3_moe"], "--dry-run"), *MOE_RULE)
    assert len(lines) == 1


def test_bench_records_the_refusal_and_fails(stream_moe, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", stream_moe["mixtral"], "-p", "8", "-n", "4", "-b", "1", "-r", "1", "--json", out)
    _refusal(r, *MOE_RULE)
    records = json.loads(out.read_text())
    records = records.get("records", records) if isinstance(records, dict) else records
    assert records and all(any(n in rec["error"] for n in MOE_RULE) for rec in records)


def test_info_names_the_moe_kernel_this_cpu_lacks():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("INT4 MoE kernel"))
    assert all(n in row for n in MOE_RULE), row


# ---------------------------------------------------------------- the expert kernel path on x86
def test_expert_kernel_path_matches_float_reference_on_host(stream_moe, tmp_path):
    """vLLM's expert packing + its dynamic_4bit_int_moe transcribed, on PyTorch's x86 reference
    ops: same floor as the Arm lane (tests/arm/test_moe.py explains the 30 dB)."""
    spec = importlib.util.spec_from_file_location("moe_kernel", REPO / "tests" / "arm" / "moe_kernel.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    torch.set_num_threads(1)
    for family, renorm in (("qwen3_moe", False), ("mixtral", True)):
        layer = mk.export_layer(stream_moe[family], f"model.layers.1.{BLOCK[family]}", family, 2, renorm)
        res = mk.run_layer(layer, None)
        assert len(res["experts_used"]) > 1 and res["sqnr_db"] >= 30.0, (family, res["sqnr_db"])
        # the floor catches a kernel computing SiLU(u) * g: pack [up; gate], compare with the reference
        weights, ids = mk.route(layer["x"], layer["router"], 2, renorm)
        half = layer["w13"].shape[1] // 2
        p13, p2 = mk.pack_experts(
            layer["w13"].roll(half, 1),
            layer["w13_scale"].roll(half, 1),
            layer["w2"],
            layer["w2_scale"],
            layer["group_size"],
        )
        wrong = mk.moe_transcribed(layer["x"], ids, weights, p13, p2, 256, half, layer["group_size"])
        ref = mk.moe_reference(
            layer["x"], ids, weights, layer["w13"], layer["w13_scale"], layer["w2"], layer["w2_scale"]
        )
        assert mk.sqnr_db(ref, wrong) < 10.0
