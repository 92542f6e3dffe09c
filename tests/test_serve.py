"""`arm-int4 serve` end to end: real vLLM OpenAI servers on 127.0.0.1.

Run: .venv/bin/python -m pytest tests/test_serve.py -q
- A tiny random Llama served with two tensor-parallel ranks on this one-NUMA-node box (`--ranks 2`:
  each rank bound to its own CPU; vLLM's own "auto" binding refuses this). One server per module
  (engine start is ~25-45 s on 2 shared cores); the SIGINT test stops it and runs last. Eager mode,
  512-token context and a 1 GiB KV cache keep the start short.
- `arm-int4 serve default` with no flags at all, as a new user types it: the plan alone must size
  the KV cache so vLLM starts (it checks the NUMA node's memory), and a completion comes back.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from arm_int4 import runner

pytestmark = [
    pytest.mark.requires_vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "arm_int4", *map(str, args)], capture_output=True, text=True, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """`arm-int4 serve` in a subprocess (as a user runs it), its output in a log file."""
    port = _free_port()
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
                "--ranks",
                "2",
                "--max-model-len",
                "512",
                str(tiny_llama),
                "--",
                "--enforce-eager",
                "--max-num-seqs",
                "4",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 300:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            if "arm-int4 serve: ready in" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"not ready after 300 s:\n{log.read_text()[-3000:]}")
        print(f"\nserver ready after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield proc, port, log
    finally:
        if proc.poll() is None:  # a test failed before the SIGINT test: clean up anyway
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_plan_is_printed_before_vllm_starts(server):
    _, port, log = server
    text = log.read_text(errors="replace")
    assert "export VLLM_CPU_KVCACHE_SPACE=1" in text and "export VLLM_TARGET_DEVICE=cpu" in text
    assert f"--port {port}" in text and "export VLLM_CPU_OMP_THREADS_BIND='0|1'" in text
    assert "--tensor-parallel-size 2" in text
    assert "OpenMP thread binding info" in text  # vLLM read our bind lists
    assert "tensor_parallel_size=2" in text  # vLLM's engine config: two ranks really ran


def test_completion_over_http_returns_text(server):
    _, port, _ = server
    assert runner.http_get("127.0.0.1", port, "/health")[0] == 200
    status, body = runner.http_get("127.0.0.1", port, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny-llama"
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny-llama", "prompt": "def main(", "max_tokens": 8, "temperature": 0}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    assert data["choices"][0]["text"] and data["usage"]["completion_tokens"] == 8


def test_port_in_use_is_one_line_and_non_zero(server, tiny_llama):
    _, port, _ = server
    r = _cli("serve", "--port", port, tiny_llama)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert r.stderr.strip() == (
        f"arm-int4 serve: error: port {port} on 127.0.0.1 is already in use: stop the server holding it "
        "or pass --port N"
    )
    assert "Traceback" not in r.stderr


def test_missing_model_dir_is_one_line(tmp_path):
    r = _cli("serve", tmp_path / "absent")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("arm-int4 serve: error: model directory")


def test_bench_server_counts_every_token_of_a_real_stream(server, tiny_llama, tmp_path, monkeypatch):
    """`bench --server` against the real server: /tokenize and return_token_ids are vLLM extensions
    that the fake server in test_bench.py only imitates (it also covers chunks merging tokens).
    Every round must receive exactly B x N tokens (max_tokens + ignore_eos honoured, every
    token counted once), and the record must describe the served checkpoint."""
    from arm_int4 import bench_server
    from arm_int4.workload import Workload

    monkeypatch.setenv("ARM_INT4_HOME", str(tmp_path))  # the bandwidth cache it writes
    _, port, _ = server
    w = Workload(prompts=(32,), gens=(24,), batches=(1, 3), repetitions=2, warmup=1)
    records = bench_server.run_server(f"http://127.0.0.1:{port}/v1", w, progress=lambda m: None)
    assert [r.error for r in records] == [None, None]
    for r in records:
        assert r.mode == "server" and r.model_name == "tiny-llama" and r.quantization == "bfloat16"
        assert r.model_bytes == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
        assert len(r.ttft_ms_requests) == 2 * r.batch and all(t > 0 for t in r.ttft_ms_requests)
        # output = gen / wall and total = (B*P + gen) / wall, so gen = B*P*output / (total - output):
        # the tokens a round received, recovered from the record (exact up to float rounding).
        pairs = zip(r.output_tok_s_samples, r.total_tok_s_samples, strict=True)
        gen = [r.batch * r.prompt_tokens * o / (t - o) for o, t in pairs]
        assert [round(g) for g in gen] == [r.batch * r.gen_tokens] * 2


def test_sigint_stops_vllm_with_no_orphans(server):
    proc, port, log = server
    tree = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(p.name() for p in tree)
    assert len(tree) >= 3, names  # vLLM API server, engine core, worker (+ resource tracker)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to `arm-int4 serve`
    rc = proc.wait(90)
    print(f"\nstopped in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert rc == 130
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # orphans left as zombies are reaped by init shortly
        alive = [p.pid for p in tree if _alive(p)]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"left running: {alive}"
    assert not runner.group_pids(proc.pid)
    assert "stopping vLLM" in log.read_text(errors="replace")
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_every_planned_env_var_and_flag_exists_in_this_vllm(tmp_path):
    """Guards against vLLM renaming things: the plan's env vars are in vllm.envs, and its argv
    (a 2-rank Ampere Altra plan with every optional flag) parses with vLLM's own server parser."""
    import dataclasses

    import vllm.envs
    from test_launch import machine, plan, write_checkpoint
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from arm_int4.launch import SERVER_MODULE, Profile, read_checkpoint

    facts = read_checkpoint(write_checkpoint(tmp_path / "m", scheme="channelwise", layers=1))
    m = dataclasses.replace(machine("ampere-altra", 256), tcmalloc_path="/usr/lib/libtcmalloc_minimal.so.4")
    p = plan(m, facts, Profile(enforce_eager=True), max_model_len=4096, reserve=4)
    plans = [p, plan(m, facts, Profile(bind="auto"), reserve=4), plan(m, facts, can_bind=False)]
    names = {k for q in plans for k in q.env} - {"OMP_NUM_THREADS", "LD_PRELOAD"}
    assert names == {
        "VLLM_TARGET_DEVICE",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_CPU_NUM_OF_RESERVED_CPU",
    }
    assert names <= set(vllm.envs.environment_variables)
    argv = p.to_server_argv()
    assert argv[1:3] == ("-m", SERVER_MODULE) and importlib.util.find_spec(SERVER_MODULE)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(list(argv[3:]))
    assert (args.model, args.host, args.port, args.dtype) == (str(tmp_path / "m"), "127.0.0.1", 8000, "float32")
    assert (args.tensor_parallel_size, args.max_model_len, args.block_size) == (2, 4096, 128)
    assert args.max_num_seqs == p.engine.max_num_seqs and args.enforce_eager


def _post_completion(port, model, prompt, timeout=120):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_serve_default_with_no_flags_answers(smollm2, tmp_path):
    """`arm-int4 serve default` exactly as typed by a new user: port 8000, compiled, KV from the plan."""
    log = tmp_path / "serve-default.log"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.fail("port 8000 is taken on this machine: `arm-int4 serve default` listens there")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arm_int4", "serve", "default"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        while "arm-int4 serve: ready in" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 900, f"not ready after 900 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        text = log.read_text(errors="replace")
        kv = int(text.split("export VLLM_CPU_KVCACHE_SPACE=")[1].split()[0])
        assert f"Explicitly set ({kv:.1f}/" in text  # vLLM took the plan's size and allocated it
        status, data = _post_completion(8000, "SmolLM2-135M-Instruct", "The capital of France is")
        assert status == 200, data
        # greedy, the real (dequantized Q4_1) SmolLM2: seen here " Paris.\n\nThe answer is:"
        assert "Paris" in data["choices"][0]["text"] and data["usage"]["completion_tokens"] == 8
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
