"""`arm-int4 bench --server` against vLLM's own serving benchmark (`vllm bench serve`), both timing
one real `arm-int4 serve` of the packaged SmolLM2-135M on 127.0.0.1 with the same workload.

Run: .venv/bin/python -m pytest tests/test_bench_server.py -q   (~2 min here: ~40 s engine start)
The comparison itself is benchmarks/bench_server_vs_vllm.py (docs/bench.md has its figures).
SmolLM2, not the tiny random Llama: at ~3 ms per token vLLM's API server sends the tiny model's
tokens in bursts and both clients' TPOT read ~0; SmolLM2 decodes at ~45 ms per token here.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.requires_vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here"),
]
REPO = Path(__file__).resolve().parents[1]


def _load_comparison():
    path = REPO / "benchmarks" / "bench_server_vs_vllm.py"
    spec = importlib.util.spec_from_file_location("bench_server_vs_vllm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smol_server(smollm2, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "arm_int4",
                "serve",
                "--port",
                str(port),
                "--kv-cache-gib",
                "1",
                "--max-model-len",
                "512",
                str(smollm2),
                "--",
                "--enforce-eager",
                "--max-num-seqs",
                "4",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        while "arm-int4 serve: ready in" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 300, f"not ready after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_bench_server_agrees_with_vllm_bench_serve(smol_server, smollm2, tmp_path, monkeypatch):
    """Same server, same workload (B requests of 128 random token ids sent at once, 32 tokens
    each, greedy, ignore_eos), rounds of the two clients interleaved so a neighbour's load falls
    on both. Measured here (2 shared cores, load 7-11 from other jobs), ours / vLLM's:
    TTFT 0.85-0.95, TPOT 0.84-1.03, output tok/s 1.00-1.18 over b1 and b4 (docs/bench.md).
    Bound: within 1.5x either way. A round's figure varies by up to ~16% (sd) on this shared
    box, so the ratio of two 4-round means has an sd of ~11%; with six ratios checked, 1.3x
    (~2.5 sd) failed once in a run beside an emulated vLLM, 1.5x is ~4.5 sd. A client that timed
    the wrong span (TTFT from the response headers, TPOT over every token) misses by 2x+."""
    monkeypatch.setenv("ARM_INT4_HOME", str(tmp_path))  # the bandwidth cache bench writes
    rows = _load_comparison().compare(
        smol_server, str(smollm2), prompts=(128,), gens=(32,), batches=(1, 4), repetitions=4, warmup=1
    )
    assert [r["test"] for r in rows] == ["pp128 tg32 b1", "pp128 tg32 b4"]
    for r in rows:
        for metric, ratio in r["ratio"].items():
            assert 1 / 1.5 < ratio < 1.5, (r["test"], metric, r["ours"][metric], r["vllm"][metric])
        # and both saw a real decode: SmolLM2 takes ~45-55 ms per token here (eager, 1 thread);
        # the ceiling leaves room for a loaded box (x8), the floor rules out burst-timed tokens
        assert 20 < r["ours"]["tpot_ms"] < 400 and 20 < r["vllm"]["tpot_ms"] < 400, r
