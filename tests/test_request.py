"""One request surface for every command that starts vLLM, and one rendering of its plan.

Run: .venv/bin/python -m pytest tests/test_request.py -q   (~1 s, no vLLM started)

- The same options given to serve, bench, tune, eval (and the fixed requests of quantize
  --budget/--eval and the demo) plan the same env and the same engine arguments, through the very
  functions each command's handler calls (cli.command_options -> options.engine_request -> the
  command's planning step).
- Nothing in arm_int4 parses a vLLM argv back into values: the user's words are read once at the
  command's edge, and a spec's server argv is only handed to the process that runs it.
"""

import ast
import json
import pathlib

import pytest
from test_launch import machine, write_checkpoint

from arm_int4 import bench, cli, evaluate, launch, options
from arm_int4.errors import HeadsDoNotSplit, KernelMissing, MoeNeedsArm
from arm_int4.kernels import Kernel

PKG = pathlib.Path(__file__).resolve().parents[1] / "arm_int4"
ARM = machine("graviton4", 64)
VLLM_WORDS = ["--", "--enable-prefix-caching", "--seed", "7"]
# a tuned profile (what `arm-int4 tune` writes, plus a length and a step every command can share)
PROFILE = dict(ranks=1, reserve=2, enforce_eager=True, max_num_seqs=4, max_model_len=257, max_num_batched_tokens=257)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("ck") / "m", hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024
    )


def _specs(ck, words, commands):
    """{command: EngineSpec} for `words` given to each command, planned as its handler plans it."""
    facts, out = launch.read_checkpoint(ck), {}
    for name in commands:
        opts = cli.command_options([name, str(ck), *([] if name == "tune" else words), *VLLM_WORDS])
        request = options.engine_request(opts, offline=name != "serve")
        if name == "serve":
            out[name] = launch.plan(ARM, facts, request)
        elif name == "bench":
            out[name] = bench.engine_for(ARM, str(ck), request, bench.Workload((200,), (57,), (1,), 1))[1]
        elif name == "tune":  # tune has no --profile: each candidate's profile goes into its request
            profile = launch.Profile.load(words[words.index("--profile") + 1])
            out[name] = bench.engine_for(ARM, str(ck), request.replace(profile=profile), bench.Workload())[1]
        else:
            out[name] = evaluate.scoring_spec(ck, max_model_len=257, request=request, machine=ARM)[1]
    return out


def test_every_command_plans_the_same_engine_from_the_same_options(ck, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROFILE))
    for words, commands in (
        (["--profile", str(path)], ("serve", "bench", "tune", "eval")),
        (["--profile", str(path), "--ranks", "1", "--reserve", "1", "--kv-cache-gib", "1"], ("serve", "bench", "eval")),
    ):
        specs = _specs(ck, words, commands)
        serve = specs["serve"]
        assert serve.to_llm_kwargs()["enable_prefix_caching"] is True and serve.to_llm_kwargs()["seed"] == 7
        for name, spec in specs.items():
            assert (name, spec.env) == (name, serve.env)
            assert (name, spec.to_llm_kwargs()) == (name, serve.to_llm_kwargs())
    assert specs["eval"].env["VLLM_CPU_OMP_THREADS_BIND"] == "0-62"  # --reserve 1 over the profile's 2


def test_quantize_and_the_demo_score_with_evals_default_engine(ck):
    """quantize --budget/--eval call evaluate.perplexity without a request (the defaults); the demo
    passes EngineRequest(enforce_eager=True). Both are what `eval MODEL` with no options plans."""
    eval_request = options.engine_request(cli.command_options(["eval", str(ck)]))
    assert eval_request == launch.EngineRequest()
    want = evaluate.scoring_spec(ck, max_model_len=257, request=eval_request, machine=ARM)[1]
    for request in (None, launch.EngineRequest(enforce_eager=True)):
        got = evaluate.scoring_spec(ck, max_model_len=257, request=request, machine=ARM)[1]
        assert (got.env, got.to_llm_kwargs()) == (want.env, want.to_llm_kwargs())


def _calls(name: str) -> set:
    """Modules of arm_int4 that call a function or method named `name`."""
    found = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                    found.add(str(path.relative_to(PKG)))
    return found


def test_no_function_parses_a_vllm_argv_back():
    # the user's words are parsed once, where a command builds its request
    assert _calls("parse_vllm_args") == {"request.py"}  # in EngineRequest.build
    assert _calls("build") == {"options.py"}  # options.engine_request, the command's edge
    # a server argv goes to the process that runs it (and to `serve --dry-run`'s snippet), nowhere else
    # replicas: the router's own; manifests: the container's command (the spec with the container's paths)
    assert _calls("to_server_argv") == {"runner.py", "launch.py", "replicas.py", "manifests.py"}
    source = "\n".join(p.read_text(encoding="utf-8") for p in PKG.rglob("*.py"))
    for gone in ("def engine_kwargs", "def _extra_flags", "engine_plan(", "plan_for("):
        assert gone not in source
    plain = source.replace("sys.argv", "")  # the CLI's own command line is the one argv read
    assert ".argv.index(" not in plain and ".argv[" not in plain  # nobody reads a vLLM argv by position


def test_refusals_are_types_and_kernels_a_small_enum(tmp_path):
    x86 = machine("x86-amd-epyc-this-box", 20)
    moe = launch.read_checkpoint(write_checkpoint(tmp_path / "moe", layers=1, scheme="channelwise", experts=4))
    with pytest.raises(MoeNeedsArm, match="serve it on an Arm server"):
        launch.plan(x86, moe)
    w16 = launch.read_checkpoint(write_checkpoint(tmp_path / "w16", layers=1, scheme="channelwise", preset="w4a16"))
    with pytest.raises(KernelMissing, match="no vLLM W4A16 GEMM"):
        launch.plan(machine("graviton4", 64), w16)
    llama = launch.read_checkpoint(write_checkpoint(tmp_path / "l", layers=1))
    with pytest.raises(HeadsDoNotSplit) as e:
        launch.plan(machine("graviton4", 256), llama, launch.EngineRequest(ranks=3))
    assert e.value.ranks == 3 and "do not split over 3" in str(e.value)
    assert Kernel.of("Dynamic4bitLinearKernel (KleidiAI)") is Kernel.W4A8_KLEIDIAI
    assert Kernel.of(Kernel.W4A8_X86_FALLBACK.display).is_x86_fallback and Kernel.of("dense (bfloat16)") is None
    assert {k.class_name for k in Kernel} == {
        "Dynamic4bitLinearKernel",
        "X86W4A8LinearKernel",
        "CPUWNA16LinearKernel",
        None,
    }
