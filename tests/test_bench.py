"""arm_int4.bench: method pieces without vLLM, a fake OpenAI server for --server, and one shared
real run (tiny random Llama, BF16 + W4A8 channelwise + a bad dir) for the engine assertions.

Run: .venv/bin/python -m pytest tests/test_bench.py -q
The engine run is module scoped: two eager engines (~30-60 s each on 2 shared cores), prompt 32,
generate 16, batch 1 and 4, 2 repetitions.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import platform
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import w4a8_class
from test_launch import machine, write_checkpoint

from arm_int4 import bandwidth, bench, bench_server, hardware, kernels, launch, report, workload
from arm_int4.checkpoint import read_checkpoint, weights_in_memory
from arm_int4.errors import UsageError
from arm_int4.report import Record

requires_vllm = [
    pytest.mark.requires_vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here"),
]
WORKLOAD = bench.Workload(prompts=(32,), gens=(16,), batches=(1, 4), repetitions=2, warmup=1)


@pytest.fixture(scope="module")
def tiny_w4a8(tiny_llama, tmp_path_factory):
    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize

    out = tmp_path_factory.mktemp("w4a8") / "tiny-llama-w4a8dyn-minmax-channelwise"
    quantize(QuantizeOptions(model=str(tiny_llama), output=str(out), scheme="channelwise", method="minmax"))
    return out


@pytest.fixture(scope="module")
def tiny_w4a8_g32(tiny_llama, tmp_path_factory):
    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize

    out = tmp_path_factory.mktemp("w4a8") / "tiny-llama-w4a8dyn-mse-groupwise-g32"
    quantize(QuantizeOptions(model=str(tiny_llama), output=str(out), scheme="groupwise", groupsize=32, method="mse"))
    return out


@pytest.fixture(scope="module")
def isolated_home(tmp_path_factory):
    """Bandwidth cache and default-model cache in a temporary ARM_INT4_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("ARM_INT4_HOME", str(home))
        yield home


# ------------------------------------------------------------------------------- no vLLM
def test_vllm_args_are_read_once_into_engine_keywords(tmp_path):
    """The words after `--` become LLM() keywords where the command starts (EngineRequest.build), and
    an offline engine's keywords are the plan's with the user's on top: nothing reads an argv back."""
    words = [
        "--dtype",
        "float32",
        "--max-model-len",
        "48",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "-tp",
        "1",
        '--compilation-config={"mode": 0}',
        "--served-model-name",
        "m",
    ]
    request = launch.EngineRequest.build(vllm_args=words)
    assert dict(request.vllm_kwargs) == {
        "dtype": "float32",
        "max_model_len": 48,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "tensor_parallel_size": 1,
        "compilation_config": {"mode": 0},
        "served_model_name": "m",
    }
    ck = launch.read_checkpoint(write_checkpoint(tmp_path / "m", layers=1))
    kw = launch.plan(machine("graviton4", 64), ck, request).to_llm_kwargs()
    assert {k: kw[k] for k in ("dtype", "max_model_len", "enforce_eager", "compilation_config")} == {
        "dtype": "float32",
        "max_model_len": 48,
        "enforce_eager": True,
        "compilation_config": {"mode": 0},
    }
    assert "served_model_name" not in kw and kw["block_size"] == 128  # server-only dropped; the plan's kept
    with pytest.raises(UsageError, match="no --flag before it"):
        launch.EngineRequest.build(vllm_args=["stray"])
    assert launch.EngineRequest.build(vllm_args=["stray"], offline=False).vllm_args == ("stray",)  # the server's


def test_workload_tests_and_validation():
    w = bench.Workload(prompts=[128, 512], gens=[128], batches=[1, 8])
    assert [t.name for t in w.tests()] == ["pp128 tg128 b1", "pp128 tg128 b8", "pp512 tg128 b1", "pp512 tg128 b8"]
    assert w.max_model_len == 640 and (w.repetitions, w.warmup) == (bench.REPETITIONS, bench.WARMUP)
    for bad in (dict(prompts=()), dict(batches=(0,)), dict(gens=(1.5,)), dict(repetitions=0), dict(warmup=-1)):
        with pytest.raises(UsageError):
            bench.Workload(**bad)


# The method lives in arm_int4.workload; bench.py may still carry its own copies until it imports
# them from there: test every distinct implementation present.
def _impls(*candidates):
    return list({id(f): f for f in candidates if f is not None}.values())


STATS = [(workload.mean_sd, workload.percentile)]


@pytest.mark.parametrize("mean_sd,pct", STATS)
def test_statistics_helpers(mean_sd, pct):
    assert mean_sd([2.0, 4.0]) == (3.0, pytest.approx(2**0.5))
    assert mean_sd([5.0]) == (5.0, 0.0) and mean_sd([None]) == (None, None)
    assert pct([1, 2, 3, 4], 50) == 2.5 and pct(range(101), 99) == 99


@pytest.mark.parametrize("fill", _impls(getattr(bench, "_fill", None), workload.fill_record))
def test_fill_from_worker_samples(fill):
    r = Record(
        model="m",
        model_name="m",
        quantization="bfloat16",
        quantized=False,
        test="pp10 tg5 b2",
        prompt_tokens=10,
        gen_tokens=5,
        batch=2,
    )
    reps = [
        {"wall_s": 1.0, "ttft_s": [0.1, 0.2], "tpot_s": [0.05, 0.05], "gen_tokens": [5, 5]},
        {"wall_s": 2.0, "ttft_s": [0.2, 0.4], "tpot_s": [0.1, 0.1], "gen_tokens": [5, 5]},
    ]
    fill(r, reps, step_bytes=10**9, bw=100.0)
    assert r.prefill_tok_s_samples == [100.0, 50.0]  # 2 * 10 tokens / slowest TTFT
    assert r.decode_tok_s_samples == [40.0, 20.0]  # 2 streams / TPOT
    assert r.total_tok_s_samples == [30.0, 15.0] and r.output_tok_s_samples == [10.0, 5.0]
    assert r.achieved_gbs_samples == [20.0, 10.0] and r.bandwidth_pct == pytest.approx(15.0)
    assert r.ttft_ms_requests == pytest.approx([100, 200, 200, 400]) and r.ttft_ms_p50 == pytest.approx(200)
    assert r.decode_tok_s == 30.0 and r.decode_tok_s_sd == pytest.approx(200**0.5)
    assert not r.notes
    fill(r, reps, step_bytes=10**11, bw=100.0)  # 2000 GB/s from 100 GB/s memory: flagged
    assert "not physical" in r.notes[0]


def test_bytes_per_step_counts_what_decode_reads(tiny_llama, tiny_w4a8):
    bf16, w4 = read_checkpoint(tiny_llama), read_checkpoint(tiny_w4a8)
    embed = 1024 * 256 * 2  # the untied input embedding: one row per token, left out
    step = bench.bytes_per_step
    assert step(bf16, "bfloat16", "x86_64", 1, 0) == weights_in_memory(bf16, "bfloat16", "x86_64") - embed
    kv = 2 * 2 * 2 * 64 * 2  # K and V x 2 layers x 2 KV heads x head dim 64 x bf16
    assert step(bf16, "bfloat16", "x86_64", 4, 100) - step(bf16, "bfloat16", "x86_64", 1, 0) == 4 * 100 * kv
    # x86's fallback reads an fp32-sized packed weight: more bytes than BF16; Arm's KleidiAI half a byte
    assert step(w4, "bfloat16", "x86_64", 1, 0) > step(bf16, "bfloat16", "x86_64", 1, 0)
    assert step(w4, "bfloat16", "aarch64", 1, 0) < step(bf16, "bfloat16", "x86_64", 1, 0)


def test_w4a16_reads_its_packed_words_on_any_cpu(tiny_llama, tmp_path):
    """CPUWNA16 reads the pack-quantized int32 words as stored: half a byte per weight, on x86 too
    (the fp32-sized x86 figure is W4A8's reference fallback). The step then reads the int4 values at
    0.5 B, the unquantized tensors at 2 B, and the scales (other_bytes) as stored."""
    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize

    out = tmp_path / "w4a16"
    quantize(QuantizeOptions(model=str(tiny_llama), output=str(out), preset="w4a16", scheme="groupwise"))
    w = read_checkpoint(out)
    embed = 1024 * 256 * 2  # the untied input embedding, left out as for BF16
    expected = w.quantized_values // 2 + w.float_values * 2 - embed + w.other_bytes
    for arch in ("x86_64", "aarch64"):
        assert bench.bytes_per_step(w, "bfloat16", arch, 1, 0) == expected


def test_triad_measures_with_one_and_all_threads():
    r = bandwidth.measure_triad(array_mib=16, passes=2, threads=2)
    assert set(r["samples_gbs"]) == {"1", "2"} and all(len(s) == 2 for s in r["samples_gbs"].values())
    assert r["triad_gbs"] == max(max(s) for s in r["samples_gbs"].values()) > 0 and r["threads"] in (1, 2)


def test_bandwidth_is_measured_once_per_machine(isolated_home, monkeypatch):
    calls = []
    monkeypatch.setattr(bandwidth, "measure_triad", lambda **kw: calls.append(kw) or {"triad_gbs": 42.0 + len(calls)})
    machine = hardware.detect(probe_runtime=False)
    first = bandwidth.machine_bandwidth(machine)
    assert first["triad_gbs"] == 43.0 and not first["cached"] and first["path"].startswith(str(isolated_home))
    assert bandwidth.machine_bandwidth(machine)["cached"] and len(calls) == 1
    assert bandwidth.machine_bandwidth(machine, refresh=True)["triad_gbs"] == 44.0
    other = dataclasses.replace(machine, logical_cpus=(machine.logical_cpus or 1) * 2)
    assert bandwidth.machine_key(other) != bandwidth.machine_key(machine)  # another machine measures again


def test_unresolvable_models_are_recorded_without_an_engine(isolated_home, tmp_path):
    logs = []
    records = bench.run([str(tmp_path / "missing"), str(tmp_path)], WORKLOAD, progress=logs.append)
    assert len(records) == 2 * len(WORKLOAD.tests()) and report.exit_code(records) == 1
    assert all(r.error for r in records) and "not found" in records[0].error and "config.json" in records[2].error
    assert records[0].cpu and records[0].arm_int4_version and any("error:" in m for m in logs)


def test_cli_exit_code_and_json_for_a_failed_model(isolated_home, tmp_path):
    from conftest import run_cli

    out = tmp_path / "r.json"
    proc = run_cli("bench", tmp_path / "missing", "-p", "8", "-n", "4", "-b", "1", "--json", out)
    assert proc.returncode == 1, proc.stderr
    assert "failed" in proc.stdout and json.loads(out.read_text())[0]["error"]


# ------------------------------------------------------------------------------- --server, fake server
class FakeOpenAI(BaseHTTPRequestHandler):
    """Just enough of vLLM's OpenAI server: /v1/models, /tokenize, streamed /v1/completions with
    a 30 ms first token then 10 ms per token, two tokens merged into one chunk once."""

    seen: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json({"data": [{"id": "fake", "root": None, "max_model_len": 512}]})

    def do_POST(self):
        import time

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._json({"tokens": list(range(5, 300))})
        self.seen.append(body)
        if body["max_tokens"] == 13:
            return self._json({"error": "boom"}, 500)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(0.03)
        sent = 0
        while sent < body["max_tokens"]:
            k = 2 if sent == 4 else 1
            chunk = {"choices": [{"index": 0, "text": "x" * k, "token_ids": list(range(k))}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
            sent += k
            time.sleep(0.01)
        self.wfile.write(
            b"data: "
            + json.dumps({"choices": [], "usage": {"completion_tokens": sent}}).encode()
            + b"\n\ndata: [DONE]\n\n"
        )


@pytest.fixture(scope="module")
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_server_mode_times_streams(fake_server, isolated_home):
    FakeOpenAI.seen.clear()
    w = bench.Workload(prompts=(8,), gens=(12, 13), batches=(3,), repetitions=2, warmup=1)
    records = bench_server.run_server(fake_server, w, progress=lambda m: None)
    ok, bad = records
    assert ok.mode == "server" and ok.model_name == "fake" and ok.error is None
    assert len(FakeOpenAI.seen) == 3 * (1 + 2) + 3  # warm-up + repetitions, then the failing test's first round
    assert all(len(b["prompt"]) == 8 and all(5 <= t < 300 for t in b["prompt"]) for b in FakeOpenAI.seen)
    assert len(ok.ttft_ms_requests) == 6 and min(ok.ttft_ms_requests) >= 30
    assert 9 <= ok.tpot_ms_p50 <= 40  # 10 ms per chunk; the merged chunk counts its two tokens
    # the fake sleeps 30 ms, then 10 ms after each of its 11 chunks: a round of 3 x 12 tokens cannot
    # beat 36 tokens / 0.14 s = 257 tok/s (a client timing each request, not the round, could)
    assert ok.output_tok_s_samples and all(0 < x <= 36 / 0.14 for x in ok.output_tok_s_samples)
    assert ok.decode_tok_s == pytest.approx(3 / (ok.tpot_ms / 1e3), rel=0.2)
    assert ok.achieved_gbs is None and "HTTP" in ok.excluded  # no checkpoint known: no GB/s
    assert bad.error and "HTTP 500" in bad.error and report.exit_code(records) == 1


def test_server_mode_refuses_non_http():
    with pytest.raises(UsageError, match="http://HOST:PORT"):
        bench_server.run_server("https://example.invalid", WORKLOAD)


# ------------------------------------------------------------------------------- real engines
@pytest.mark.requires_vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_engine_failure_is_recorded_with_its_log(tiny_llama, isolated_home):
    """vLLM refusing an engine argument: every test recorded as failed, the log kept and named."""
    logs = []
    request = launch.EngineRequest.build(vllm_args=("--no-such-engine-arg", "1"))
    records = bench.run([str(tiny_llama)], WORKLOAD, request, progress=logs.append)
    assert len(records) == 2 and report.exit_code(records) == 1
    assert "no_such_engine_arg" in records[0].error and "vLLM log: " in records[0].error
    log = records[0].error.rsplit("vLLM log: ", 1)[1].rstrip(")")
    assert "no_such_engine_arg" in Path(log).read_text()
    assert any("vLLM log kept" in m for m in logs)
    os.unlink(log)  # kept for the user on failure; this one was expected


@pytest.fixture(scope="module")
def run(tiny_llama, tiny_w4a8, tiny_w4a8_g32, isolated_home, tmp_path_factory):
    """One bench over BF16 + two W4A8 variants + a bad dir, printed in every format (the CLI
    handler's steps)."""
    out = tmp_path_factory.mktemp("bench")
    (out / "not-a-model").mkdir()  # a directory without config.json
    err, md = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        records = bench.run(
            [str(tiny_llama), str(out / "not-a-model"), str(tiny_w4a8), str(tiny_w4a8_g32)],
            WORKLOAD,
            launch.EngineRequest(enforce_eager=True),
        )
        paths = {k: str(out / f"bench.{k}") for k in ("json", "csv", "jsonl", "png")}
        report.emit(
            records,
            md=md,
            json_path=paths["json"],
            csv_path=paths["csv"],
            jsonl_path=paths["jsonl"],
            plot_path=paths["png"],
        )
    return dict(
        records=records,
        stderr=err.getvalue(),
        md=md.getvalue(),
        paths=paths,
        ok=[r for r in records if r.error is None],
        rc=report.exit_code(records),
    )


class TestEngineRun:
    """Assertions over the one shared run (the `run` fixture)."""

    pytestmark = requires_vllm

    def test_records_have_every_field(self, run):
        ok = run["ok"]
        assert len(run["records"]) == 4 * 2 and len(ok) == 6, run["stderr"][-3000:]
        for r in ok:
            for name in (
                "prefill_tok_s",
                "decode_tok_s",
                "ttft_ms",
                "tpot_ms",
                "total_tok_s",
                "output_tok_s",
                "achieved_gbs",
                "ttft_ms_p50",
                "ttft_ms_p99",
                "tpot_ms_p50",
                "tpot_ms_p99",
                "bandwidth_gbs",
                "bandwidth_pct",
                "peak_rss_bytes",
                "model_bytes",
                "weights_in_memory_bytes",
                "bytes_per_step",
                "load_s",
                "dtype",
                "cpu",
                "arch",
                "torch_version",
                "vllm_version",
                "python_version",
                "time",
            ):
                assert getattr(r, name) not in (None, ""), name
            assert r.cached_tokens == 0  # fresh random prompts: the prefix cache never helps
            assert r.engine_args["enforce_eager"] is True and r.env["VLLM_TARGET_DEVICE"] == "cpu"
            assert "tokenization" in r.excluded and r.repetitions == 2 and r.warmup == 1
        w4 = [r for r in ok if r.quantized]
        assert {r.quantization for r in w4} == {"w4a8 minmax-channelwise", "w4a8 mse-groupwise-g32"}
        assert all(r.linear_kernels == [w4a8_class()] for r in w4)
        # the label is what vLLM's log says it ran, not a prediction (kernels.describe)
        assert all(
            r.int4_kernel == kernels.describe(r.linear_kernels, hardware.detect(probe_runtime=False), r.dtype)
            for r in w4
        )
        assert all(
            r.quantization == "bfloat16" and r.int4_kernel is None and not r.linear_kernels
            for r in ok
            if not r.quantized
        )

    def test_raw_samples_one_per_repetition(self, run):
        for r in run["ok"]:
            for m in report.METRICS:
                samples = getattr(r, m + "_samples")
                assert len(samples) == WORKLOAD.repetitions, m
                assert getattr(r, m + "_sd") == pytest.approx(statistics.stdev(samples))  # sample sd, n - 1
                assert getattr(r, m) == pytest.approx(sum(samples) / len(samples))
            assert len(r.ttft_ms_requests) == len(r.tpot_ms_requests) == WORKLOAD.repetitions * r.batch
            assert r.ttft_ms_p50 <= r.ttft_ms_p99

    def test_decode_is_physically_possible(self, run):
        """decode tok/s x bytes read per token <= this machine's measured memory bandwidth."""
        for r in run["ok"]:
            per_token = r.bytes_per_step / r.batch
            assert max(r.decode_tok_s_samples) * per_token <= r.bandwidth_gbs * 1e9, r.test
            assert r.achieved_gbs == pytest.approx(r.decode_tok_s * per_token / 1e9)
            assert 0 < r.bandwidth_pct < 100
            assert r.peak_rss_bytes > r.weights_in_memory_bytes  # the engine holds at least its weights

    def test_outputs_written(self, run):
        p = run["paths"]
        assert [d["test"] for d in json.loads(Path(p["json"]).read_text())] == [r.test for r in run["records"]]
        assert len(Path(p["jsonl"]).read_text().splitlines()) == len(run["records"])
        assert len(Path(p["csv"]).read_text().splitlines()) == 1 + len(run["records"])
        assert Path(p["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert run["md"].startswith("## arm-int4 bench") and "± " in run["md"]

    def test_eval_reads_decode_from_this_json(self, run):
        """`arm-int4 eval --bench FILE` takes batch-1 decode per model dir from bench's JSON."""
        from arm_int4 import tradeoff

        got = tradeoff.bench_decode(run["paths"]["json"])
        want = {str(Path(r.model).resolve()): r.decode_tok_s for r in run["ok"] if r.batch == 1}
        assert got == want and len(got) == 3  # BF16 + two W4A8; the failed dir has no figure

    def test_side_by_side_speed_up_columns(self, run):
        md = run["md"]
        assert "decode tok/s, side by side (× = speed-up over tiny-llama)" in md
        head = next(line for line in md.splitlines() if line.startswith("| test | tiny-llama (bfloat16)"))
        assert head.endswith("| tiny-llama-w4a8dyn-minmax-channelwise | × | tiny-llama-w4a8dyn-mse-groupwise-g32 | × |")
        rows = md.split("decode tok/s, side by side")[1].split("###")[0]
        assert rows.count("× |") >= 3 and "pp32 tg16 b4" in rows

    @pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86 warning is for x86")
    def test_x86_figures_warned_on_stderr(self, run):
        # arm_int4's x86 kernel where its entry point is installed, else vLLM's reference fallback:
        # either way the figures are x86 ones and say so
        said = (
            "x86 figure, not an Arm figure" if w4a8_class() != "Dynamic4bitLinearKernel" else "x86 reference fallback"
        )
        for name in ("tiny-llama-w4a8dyn-minmax-channelwise", "tiny-llama-w4a8dyn-mse-groupwise-g32"):
            assert f"warning: {name}: {said}" in run["stderr"]
        assert said in run["md"]
        assert "warning" not in run["md"]  # warnings go to stderr, the table to stdout

    def test_failing_model_recorded_and_the_run_goes_on(self, run):
        bad = [r for r in run["records"] if r.error]
        assert [r.model_name for r in bad] == ["not-a-model", "not-a-model"] and "config.json" in bad[0].error
        assert run["records"][-1].error is None and run["records"][-3].error is None  # models after the bad one ran
        assert run["rc"] == 1 and "### failed" in run["md"]


@pytest.mark.requires_vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_two_tensor_parallel_ranks_on_one_node(tiny_llama, isolated_home):
    """`bench --ranks 2` on this one-node box: each rank bound to its own CPU, vLLM runs TP=2."""
    from conftest import run_cli

    out = isolated_home / "tp2.json"
    r = run_cli(
        "bench",
        tiny_llama,
        "--ranks",
        "2",
        "-p",
        "16",
        "-n",
        "8",
        "-b",
        "1",
        "-r",
        "1",
        "--json",
        out,
        "--",
        "--enforce-eager",
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["error"] is None and rec["engine_args"]["tensor_parallel_size"] == 2
    assert rec["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and rec["threads"] == 1
    assert rec["decode_tok_s"] > 0 and rec["gen_tokens"] == 8
