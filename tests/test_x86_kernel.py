"""arm_int4.x86_w4a8: the x86 W4A8 kernel is chosen only where intended and computes Arm's math.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_x86_kernel.py -q
The reference is vLLM 0.32's own Dynamic4bitLinearKernel (torch.ops.aten._dyn_quant_matmul_4bit,
its x86 reference loop here; on Arm the same arithmetic in KleidiAI: tests/arm). Layers are compared
one by one on random and on real (SmolLM2-135M) weights; whole models through real vLLM engines
with VLLM_DISABLED_KERNELS=X86W4A8LinearKernel as the reference run (vLLM's own switch).
"""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers.vllm_generate import MARK

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from arm_int4 import x86_w4a8  # noqa: E402
from arm_int4.options import QuantizeOptions  # noqa: E402
from arm_int4.quantize import quantize  # noqa: E402

X86 = platform.machine() == "x86_64"
needs_x86 = pytest.mark.skipif(not X86, reason="the kernel registers on x86_64 only")


def _config(k, n, group, dtype):
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    return MPLinearLayerConfig((k, n), (k, n), scalar_types.int4, dtype, group, False)


def _layer(w, scale, bias):
    """A module shaped as vLLM's CompressedTensorsW4A8Int.create_weights leaves it."""
    m = torch.nn.Module()
    p = torch.nn.Parameter(w.clone(), requires_grad=False)
    m.register_parameter("weight", p)
    m.register_parameter("weight_packed", p)
    m.register_parameter("weight_scale", torch.nn.Parameter(scale.clone(), requires_grad=False))
    m.register_parameter("bias", None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False))
    return m


def _apply(cls, w, scale, bias, x, group):
    """y = x @ dequant(w)ᵀ (+ bias) through kernel class `cls`; w int8 [N, K] holding -8..7."""
    n, k = w.shape
    layer = _layer(w, scale, bias)
    kernel = cls(_config(k, n, group, x.dtype), "weight_packed", "weight_scale")
    kernel.process_weights_after_loading(layer)
    return kernel.apply_weights(layer, x, layer.bias)


def _reference():
    from vllm.model_executor.kernels.linear.mixed_precision.dynamic_4bit import Dynamic4bitLinearKernel

    return Dynamic4bitLinearKernel


def _compare(w, scale, bias, x, group):
    """-> (ours, reference) in fp32."""
    ours = _apply(x86_w4a8.kernel_class(), w, scale, bias, x, group).float()
    return ours, _apply(_reference(), w, scale, bias, x, group).float()


@needs_x86
@pytest.mark.requires_vllm
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_random_layers_match_the_reference(dtype, with_bias):
    """Channelwise and groupwise (g32, g64, g128): bit-identical to vLLM's reference path, decode and
    prefill row counts, with rows of different magnitudes, one all-positive, one all-zero."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    for k, n in ((256, 384), (576, 1536), (1536, 576)):
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
        bias = (torch.randn(n, generator=gen)).to(dt) if with_bias else None
        for group in (g for g in (k, 32, 64, 128) if k % g == 0):
            scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).to(dt)
            for m in (1, 5, 16, 64):
                # scale 1 and zero point -128 for the zero row (the reference's rmin == rmax case)
                x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
                x[0] = x[0].abs()
                if m > 1:
                    x[1] = 0
                ours, ref = _compare(w, scale, bias, x.to(dt), group)
                assert torch.equal(ours, ref), (k, n, group, m)


def test_groupwise_gemm_paths_give_the_same_bits(tmp_path, monkeypatch):
    """The groupwise GEMM's three paths — the C kernel's AVX2 loop, its plain C loop, the torch steps (no
    compiler) — give the same bits, on sums large enough that one fused multiply-add would show; the
    packed layout round-trips."""
    from arm_int4 import x86_w4a8_gemm as gemm

    lib, how = gemm.library()
    if lib is None:
        pytest.skip(f"the C kernel did not build here: {how}")
    gen = torch.Generator().manual_seed(3)
    for k, n, g in ((256, 64, 32), (1024, 48, 256), (512, 32, 512)):
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
        w[: n // 2] = torch.randint(5, 8, (n // 2, k), dtype=torch.int8, generator=gen)  # large same-sign sums
        scale = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).bfloat16()
        wp, wsum, sc = gemm.pack(w, scale)
        assert torch.equal(gemm.unpack(wp, n, k), w)
        for m in (1, 3, 9):
            x = torch.rand(m, k, generator=gen) + 0.5 * (torch.arange(m) % 2).view(m, 1)
            q, zp, recip = x86_w4a8.quantize_rows(x)
            simd = gemm.gemm_c(q, zp, recip, wp, wsum, sc)
            assert torch.equal(simd, gemm.gemm_c(q, zp, recip, wp, wsum, sc, simd=False)), (k, g, m)
            assert torch.equal(simd, gemm.gemm_torch(q, zp, recip, wp, wsum, sc)), (k, g, m)
    # no compiler: the torch steps, said once in the log
    monkeypatch.setattr(gemm, "_lib", [])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert gemm.library() == (None, f"torch steps (no C compiler: {tmp_path / 'no-such-cc'} not found)")


@needs_x86
@pytest.mark.requires_vllm
@pytest.mark.slow  # inductor compiles two graphs: 2 min on the shared 2-core box
def test_compiled_graphs_keep_the_exact_math():
    """vLLM compiles the model with shape guards off (one graph for every batch size): a graph traced at
    one row count runs every other, and inductor, fusing the quantization and epilogue into it, does not
    rewrite the reference's exact rounding steps. Compiled == eager, bit for bit."""
    kernel = x86_w4a8.kernel_class()
    gen = torch.Generator().manual_seed(2)
    k, n = 256, 384
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    for group in (k, 32):
        scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).bfloat16()
        layer = _layer(w, scale, None)
        lin = kernel(_config(k, n, group, torch.bfloat16), "weight_packed", "weight_scale")
        lin.process_weights_after_loading(layer)
        compiled = torch.compile(lambda x, lin=lin, layer=layer: lin.apply_weights(layer, x * 2.0), dynamic=True)
        for m in (64, 1, 3):  # traced at 64 rows, then decode-sized batches
            x = torch.randn(m, k, generator=gen).bfloat16()
            assert torch.equal(compiled(x), lin.apply_weights(layer, x * 2.0)), (group, m)


def test_activation_quantization_rounds_like_the_reference():
    """The reference rounds values with std::round (half away from zero), the zero point with lrintf
    (half to even), and divides 255 / range in fp32; torch's `scalar / tensor` multiplies by a
    reciprocal instead (one rounding more) and torch.round is half to even: each case below would
    catch one of those."""
    import numpy as np

    # all ≥ 0, max 255: scale 1, zero point -128; .5 ties round away from zero (half-even: 0, 2, 2)
    q, zp, recip = x86_w4a8.quantize_rows(torch.tensor([[0.5, 1.5, 2.5, 255.0]]))
    assert (zp.item(), recip.item()) == (-128, 1.0) and q.tolist() == [[-127, -126, -125, 127]]
    # range [-1.5, 253.5]: scale 1, zero point -128 + 1.5 = -126.5 → lrintf → -126 (away: -127)
    q, zp, _ = x86_w4a8.quantize_rows(torch.tensor([[-1.5, 0.5, 253.5]]))
    assert zp.item() == -126 and q.tolist() == [[-2 - 126, 1 - 126, 127]]
    # range 14.875: 255 / 14.875 in fp32 is 17.142857; 255 · (1 / 14.875) is 17.142859
    _, _, recip = x86_w4a8.quantize_rows(torch.tensor([[-7.0, 7.875]]))
    assert recip.item() == np.float32(1) / (np.float32(255) / np.float32(14.875))
    # a zero row: scale 1 (the reference's rmin == rmax case), everything at the zero point
    q, zp, recip = x86_w4a8.quantize_rows(torch.zeros(1, 8))
    assert recip.item() == 1.0 and q.unique().tolist() == [zp.item()]


@needs_x86
@pytest.mark.requires_vllm
def test_selected_only_on_x86_and_for_layouts_it_computes(monkeypatch):
    """register() puts the kernel first in vLLM's CPU list on x86_64 (once) and nowhere else; it
    refuses what it cannot compute so vLLM's next kernel (the reference path) takes that layer."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS, choose_mp_linear_kernel
    from vllm.platforms import PlatformEnum

    cpu = _POSSIBLE_KERNELS[PlatformEnum.CPU]
    saved = list(cpu)
    # the list as vLLM ships it: a vLLM start earlier in this process (pytest runs many) has loaded the
    # general plugins, ours included, into this same list
    cpu[:] = [k for k in cpu if k.__name__ != x86_w4a8.KERNEL_NAME]
    before = list(cpu)
    try:
        monkeypatch.setattr(x86_w4a8.platform, "machine", lambda: "aarch64")
        x86_w4a8.register()
        assert cpu == before  # Arm: Dynamic4bitLinearKernel (KleidiAI) stays first
        monkeypatch.undo()
        x86_w4a8.register()
        x86_w4a8.register()
        assert [k.__name__ for k in cpu] == [x86_w4a8.KERNEL_NAME] + [k.__name__ for k in before]
        pick = lambda k, n, g, dt=torch.bfloat16: choose_mp_linear_kernel(_config(k, n, g, dt)).__name__
        assert pick(576, 1536, 576) == pick(576, 1536, 32) == pick(1536, 576, 128) == x86_w4a8.KERNEL_NAME
        assert pick(576, 1536, 32, torch.float32) == x86_w4a8.KERNEL_NAME
        # groupwise layouts the C kernel does not take: the reference path
        assert pick(96, 1536, 48) == "Dynamic4bitLinearKernel"  # group not a multiple of 32
        assert pick(576, 1544, 32) == "Dynamic4bitLinearKernel"  # out_features not a multiple of 16
        assert pick(16384, 32, 8192) == "Dynamic4bitLinearKernel"  # group > 4096: int16 group sums
        assert pick(96, 1536, 32) == x86_w4a8.KERNEL_NAME
        assert pick(96, 1544, 96) == x86_w4a8.KERNEL_NAME  # channelwise: any shape
        monkeypatch.setattr(x86_w4a8.platform, "machine", lambda: "aarch64")
        assert pick(576, 1536, 576) == "Dynamic4bitLinearKernel"  # can_implement re-checks the machine
    finally:
        cpu[:] = saved


def _real_layers(model: Path, limit: int = 12):
    """(name, weight int8 [N, K], scale [N, K/g]) of the first `limit` quantized Linears of a checkpoint."""
    from safetensors import safe_open

    out = []
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names = sorted(k[: -len(".weight_scale")] for k in st.keys() if k.endswith(".weight_scale"))
            for name in names[:limit]:
                out.append((name, st.get_tensor(name + ".weight"), st.get_tensor(name + ".weight_scale")))
    return out[:limit]


@pytest.fixture(scope="module")
def smollm2_w4a8(smollm2, tmp_path_factory) -> dict:
    """SmolLM2-135M quantized channelwise and g32 (minmax: seconds)."""
    root = tmp_path_factory.mktemp("x86-kernel-smol")
    return {
        g: quantize(
            QuantizeOptions(
                model=str(smollm2), output=str(root / f"g{g}"), scheme=scheme, method="minmax", groupsize=g or 32
            )
        ).output
        for scheme, g in (("channelwise", None), ("groupwise", 32))
    }


@needs_x86
@pytest.mark.requires_vllm
def test_real_checkpoint_layers_match_the_reference(smollm2_w4a8):
    """Layer by layer on SmolLM2-135M's own INT4 weights (q/k/v/o, gate/up/down of the first layers),
    activations with the outliers real models have (a few channels 20× the rest)."""
    gen = torch.Generator().manual_seed(1)
    for g, model in smollm2_w4a8.items():
        for name, w, scale in _real_layers(model):
            k = w.shape[1]
            x = torch.randn(7, k, generator=gen)
            x[:, torch.randint(0, k, (4,), generator=gen)] *= 20
            for m in (1, 7):
                ours, ref = _compare(w, scale, None, x[:m].bfloat16(), k if g is None else g)
                assert torch.equal(ours, ref), (g, name)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _generate(runs: list[dict], tmp_path: Path, env: dict) -> dict:
    """tests/helpers/vllm_generate.py in one process (plans as test_quantize.vllm_generate makes them)."""
    from arm_int4 import hardware, launch, runner

    machine, can_bind = hardware.detect(probe_runtime=False), runner.can_set_affinity()
    jobs = []
    for r in runs:
        request = launch.EngineRequest(profile=launch.Profile(enforce_eager=True, max_num_seqs=8), max_model_len=512)
        plan = launch.plan(machine, launch.read_checkpoint(Path(r["model"])), request, can_bind=can_bind)
        jobs.append({**r, "model": str(r["model"]), "env": plan.env, "engine_kwargs": plan.to_llm_kwargs()})
    job, res = tmp_path / "job.json", tmp_path / "res.json"
    job.write_text(json.dumps({"prompts": PROMPTS, "runs": jobs}))
    p = subprocess.run(
        [sys.executable, REPO / "tests" / "helpers" / "vllm_generate.py", job, res],
        capture_output=True,
        text=True,
        timeout=300 + 240 * len(runs),
        env={**runner.process_env(plan), **env},
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out = json.loads(res.read_text())
    for chunk in p.stdout.split(MARK)[1:]:
        label, _, text = chunk.partition("\n")
        if label in out:  # the last marker is "(end)"
            out[label]["log"] = text
    for label, v in out.items():
        assert "error" not in v, f"{label}: {v['error']}\n" + v.get("log", "")[-3000:]
    out["(whole log)"] = p.stdout + p.stderr
    return out


@needs_x86
@pytest.mark.requires_vllm
@pytest.mark.slow  # two vLLM processes, three checkpoints each: 4 min with the compiled-graph test (loaded box)
def test_greedy_tokens_and_logprobs_equal_the_reference_path_in_vllm(trained_llama, trained_qwen2, tmp_path_factory):
    """Whole models through real vLLM engines, with the new kernel and with vLLM's reference path: a
    trained tiny Llama channelwise and g32, a trained tiny Qwen2 (q/k/v biases) g32. The layers are
    bit-identical (tests above), so the engines must agree exactly: every greedy token, and the top-5
    logprobs at every generated position, equal as floats. Two processes."""
    root = tmp_path_factory.mktemp("x86-kernel-engine")
    models = {
        "llama-cw": (trained_llama, "channelwise", None),
        "llama-g32": (trained_llama, "groupwise", 32),
        "qwen2-g32": (trained_qwen2, "groupwise", 32),
    }
    runs = []
    for label, (src, scheme, g) in models.items():
        out = quantize(
            QuantizeOptions(model=str(src), output=str(root / label), scheme=scheme, method="minmax", groupsize=g or 32)
        ).output
        runs.append({"label": label, "model": out, "max_tokens": 24, "logprobs": 5})
    ours = _generate(runs, root, {})
    ref = _generate(runs, root, {"VLLM_DISABLED_KERNELS": x86_w4a8.KERNEL_NAME})
    assert f"Using {x86_w4a8.KERNEL_NAME} for CompressedTensorsW4A8Int" in ours["(whole log)"]
    assert "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int" not in ours["(whole log)"]
    assert "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int" in ref["(whole log)"]
    assert "groupwise GEMM: C kernel" in ours["(whole log)"]  # x86_w4a8_gemm's one line: which path ran
    for label in models:
        assert ours[label]["linear"]["kernel"] == x86_w4a8.KERNEL_NAME, ours[label]["linear"]
        assert ref[label]["linear"]["kernel"] == "Dynamic4bitLinearKernel", ref[label]["linear"]
        assert ours[label]["token_ids"] == ref[label]["token_ids"], label
        assert ours[label]["logprobs"] == ref[label]["logprobs"], label
