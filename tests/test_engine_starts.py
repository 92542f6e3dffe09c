"""Every vLLM engine starts through launch.plan and arm_int4.runner, and nothing else.

Run: .venv/bin/python -m pytest tests/test_engine_starts.py -q
Structural checks read the package's source (ast), so a new module that spawns a process or imports
vLLM fails here; the plan-level checks run each command that starts vLLM on a checkpoint the plan
must refuse on this x86 box (a W4A8 mixture-of-experts: vLLM's only W4A8 MoE kernel is Arm-only),
so each command proves it consulted the plan before any engine started.
"""

import ast
import pathlib

import pytest
from test_launch import machine, write_checkpoint

from arm_int4 import evaluate, launch, runner, workers
from arm_int4.errors import DtypeRefused

PKG = pathlib.Path(runner.__file__).parent
SOURCES = sorted(p for p in PKG.rglob("*.py") if "workers" not in p.parts)
# subprocess.run of tools that are not vLLM, each with its reason
TOOL_RUNS = {
    "sysfs.py": "ldconfig -p (where tcmalloc is)",
    "workload.py": "git rev-parse / status (the commit in bench records)",
    "cli.py": "bash scripts/build_vllm_cpu.sh (arm-int4 build)",
    "llamacpp.py": "llama.cpp's convert_hf_to_gguf.py (GGUF conversion, no vLLM)",
    "syspkgs.py": "ldconfig -p and `python -c` import probes (set-up's system package check, before any venv)",
    "doctor.py": "`python -c` probes that import llguidance/xgrammar or a worker's imports and print "
    "/proc/self/maps (doctor's structured-output and OpenMP checks; no engine is started)",
    "x86_w4a8_gemm.py": "the system C compiler (`cc --version`, then the groupwise GEMM's one-time build)",
}

# modules vLLM itself imports inside its own processes (a vllm.general_plugins entry point): they
# import vLLM's kernel interface to plug into it and start nothing
VLLM_PLUGINS = {
    "x86_w4a8.py": "X86W4A8LinearKernel subclasses vLLM's MPLinearKernel; register() runs in vLLM's processes",
}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield f"{f.value.id}.{f.attr}", node


def test_only_the_runner_starts_processes():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for name, node in _calls(tree):
            spawn = name in (
                "subprocess.Popen",
                "subprocess.call",
                "subprocess.check_call",
                "subprocess.check_output",
                "os.system",
                "os.popen",
            ) or name.startswith(("os.exec", "os.spawn", "os.posix_spawn"))
            if spawn and path.name != "runner.py":
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} {name}")
            if name == "subprocess.run" and path.name not in TOOL_RUNS:
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} subprocess.run (not a listed tool)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                banned = ("multiprocessing",) if path.name in VLLM_PLUGINS else ("multiprocessing", "vllm")
                if any(m.split(".")[0] in banned for m in mods):
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno} imports {mods}")
    assert not offenders, "start processes/vLLM only through arm_int4.runner: " + "; ".join(offenders)


def test_every_worker_that_imports_vllm_needs_a_plan():
    uses_vllm = set()
    for path in workers.DIR.glob("*_worker.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m.split(".")[0] in ("vllm", "lm_eval") for m in mods):
                uses_vllm.add(path.name.removesuffix("_worker.py"))
    assert uses_vllm == set(runner.ENGINE_WORKERS)
    for name in sorted(uses_vllm):
        with pytest.raises(TypeError, match=r"runs only from a launch\.EngineSpec"):
            runner.run_worker(name, {})


def test_the_server_and_engine_jobs_take_their_arguments_from_the_plan(tmp_path):
    ck = launch.read_checkpoint(
        write_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1024)
    )
    p = launch.plan(machine("graviton4", 64), ck, launch.EngineRequest(max_model_len=512))
    kw = p.to_llm_kwargs()
    assert kw["dtype"] == p.dtype and kw["max_model_len"] == 512 and kw["block_size"] == 128
    with pytest.raises(TypeError, match="comes from the plan"):
        runner.run_worker("perplexity", {"engine_kwargs": {}}, plan=p)


# ---------------------------------------------------------------- the plan's guards hold in every command
@pytest.fixture(scope="module")
def x86_moe(tmp_path_factory):
    """A W4A8 MoE checkpoint (config + headers): the plan refuses it on x86 before any engine starts."""
    d = write_checkpoint(
        tmp_path_factory.mktemp("moe") / "moe",
        hidden=256,
        layers=1,
        heads=4,
        kv_heads=2,
        inter=512,
        vocab=1024,
        scheme="channelwise",
        experts=4,
    )
    (d / "tokenizer_config.json").write_text("{}")
    return d


MOE_LINE = "CPUExpertsInt4"


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "{m}", "--dry-run"],
        ["bench", "{m}", "-p", "8", "-n", "2", "-b", "1", "-r", "1"],
        ["tune", "{m}", "-p", "8", "-n", "2", "--output", "{tmp}/p.json"],
        ["eval", "{m}", "--num-tokens", "16", "--max-len", "16", "--stride", "8"],
        ["eval", "{m}", "--tasks", "opticks_cloze", "--limit", "2"],
    ],
    ids=["serve", "bench", "tune", "eval-perplexity", "eval-lm-eval"],
)
def test_each_command_refuses_the_x86_moe_through_the_plan(argv, x86_moe, tmp_path):
    from conftest import run_cli

    r = run_cli(*[a.format(m=x86_moe, tmp=tmp_path) for a in argv], timeout=300)
    assert r.returncode != 0
    assert MOE_LINE in r.stderr + r.stdout, (r.stdout[-1500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr


def test_eval_plans_like_serve_on_arm(tmp_path):
    """The groupwise + bias guard, binding and KV sizing reach eval and lm-eval (scoring_spec is theirs)."""
    ck = write_checkpoint(
        tmp_path / "gb", hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024, scheme="groupwise", bias=True
    )
    arm = machine("graviton4", 64)
    _, p = evaluate.scoring_spec(ck, max_model_len=257, machine=arm)
    assert p.dtype == "float32" and p.to_llm_kwargs()["dtype"] == "float32"
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-62" and p.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(DtypeRefused, match=r"--dtype bfloat16 .* wrong outputs"):
        evaluate.scoring_spec(ck, max_model_len=257, request=launch.EngineRequest(dtype="bfloat16"), machine=arm)
    served = launch.plan(arm, launch.read_checkpoint(ck), launch.EngineRequest(max_model_len=257))
    assert p.env == served.env


def test_short_scoring_windows_keep_vllms_scheduler_rule(tmp_path):
    """vLLM refuses max_num_batched_tokens < max_num_seqs (seen under emulation: eval with 32-token
    windows planned 33 batched tokens beside the default 128 sequences)."""
    ck = write_checkpoint(tmp_path / "m", hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024)
    for n in (33, 257, 513):
        _, p = evaluate.scoring_spec(ck, max_model_len=n)
        kw = p.to_llm_kwargs()
        assert kw["max_num_batched_tokens"] == n and kw["max_num_seqs"] <= n
