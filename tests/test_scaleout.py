"""Scaling out for real on this box, loopback only: `arm-int4 serve` as a user runs it, in subprocesses.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_scaleout.py -q   (~3-4 min on 2 shared cores)
- `--replicas 2`: two engines (one CPU each) behind vllm-router answer concurrent requests, both serve
  some; one killed (SIGKILL) is reported in one line and the other keeps serving; SIGINT stops all.
- `-- --data-parallel-size 2`: vLLM's own data parallel (one API server, two engine cores) answers.
- two "nodes" of one pipeline-parallel engine (`-pp 2 --nnodes 2 --node-rank 0|1 --master-addr
  127.0.0.1`, each process on its own CPU): node 0's server answers with the same greedy tokens as a
  single engine. Compiled, not eager: vLLM 0.32 CPU skips the warm-up that gives later pipeline stages
  their buffers in eager mode and fails the first request (the plan refuses that in one line).
Every engine: the session's tiny Llama, 1 OMP thread, 256-token context, 1 GiB KV cache, 8 greedy
tokens; eager except the pipeline. No process of a test survives it (checked on the process tree, then on the ports).
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from arm_int4 import runner

pytestmark = [
    pytest.mark.requires_vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here"),
    pytest.mark.skipif(importlib.util.find_spec("vllm_router") is None, reason="vllm-router is not installed here"),
]

SMALL = ["--kv-cache-gib", "1", "--max-model-len", "256"]
EAGER = ["--enforce-eager", "--max-num-seqs", "4"]
PROMPT = "def main("
READY_S = 300  # one engine starts in 25-60 s here; two at once on 2 loaded cores took up to ~65 s
GREEDY: dict = {}  # one engine's greedy token ids for PROMPT, shared by the tests (same model, same dtype)


def _free_ports(n: int) -> int:
    """A base port with n consecutive free ports after it (the router, then the replicas, then metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve(model, args, log):
    out = open(log, "wb")  # noqa: SIM115 (closed by _stop)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "arm_int4", "serve", *map(str, args[0]), str(model), "--", *map(str, args[1])],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _wait_for(proc, log, text, timeout=READY_S) -> float:
    t0 = time.monotonic()
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() - t0 < timeout, f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return time.monotonic() - t0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop(proc, tree) -> int:
    """SIGINT as Ctrl-C sends it; then nothing of `tree` (taken while it ran) may be left."""
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.log_file.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)  # orphans left as zombies are reaped by init shortly
    assert not [p.pid for p in tree if _alive(p)], "left running after SIGINT"
    return rc


def _tree(proc) -> list:
    return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]


def _kill(procs, trees=()) -> None:
    """After a failed test: SIGKILL every process it started (the engines run in their own sessions)."""
    for p in [q for t in trees for q in t] + [psutil.Process(x.pid) for x in procs if x.poll() is None]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for x in procs:
        if x.poll() is None:
            x.wait()


def _complete(port, prompt=PROMPT, timeout=120) -> tuple:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    choice = data["choices"][0]
    assert data["usage"]["completion_tokens"] == 8
    return tuple(choice["token_ids"]), choice["text"]


def _served(port) -> int:
    """Completions this engine finished (vLLM's Prometheus counter)."""
    _, body = runner.http_get("127.0.0.1", port, "/metrics", timeout=10)
    lines = [x for x in body.decode().splitlines() if x.startswith("vllm:request_success_total")]
    return int(sum(float(x.rsplit(" ", 1)[1]) for x in lines))


def test_two_replicas_behind_the_router_survive_one_dying(tiny_llama, tmp_path):
    base, log = _free_ports(4), tmp_path / "replicas.log"
    t0 = time.monotonic()
    proc = _serve(tiny_llama, (["--replicas", "2", "--port", base, *SMALL], EAGER), log)
    tree: list = []
    try:
        ready = _wait_for(proc, log, "through vllm-router over 2 replica(s)")
        tree = _tree(proc)
        text = log.read_text(errors="replace")
        assert "export VLLM_CPU_OMP_THREADS_BIND=0\n" in text and "export VLLM_CPU_OMP_THREADS_BIND=1\n" in text
        with ThreadPoolExecutor(8) as pool:  # concurrent clients through the router
            answers = list(pool.map(lambda _: _complete(base), range(8)))
        assert len(set(answers)) == 1  # greedy, same model on both: the same tokens whoever served them
        GREEDY.setdefault("tokens", answers[0][0])
        assert _served(base + 1) > 0 and _served(base + 2) > 0  # round robin: both replicas worked
        victim = next(p for p in tree if f"--port {base + 2}" in " ".join(p.cmdline()))
        victim.kill()  # replica 2's API server dies (SIGKILL): its engine core and worker must go too
        _wait_for(proc, log, "exited with code", timeout=30)
        line = next(x for x in log.read_text().splitlines() if "exited with code" in x)
        assert line == (
            f"arm-int4 serve: replica 2 of 2 (http://127.0.0.1:{base + 2}, CPUs 1) exited with code -9: removed "
            "from the router; 1 local replica(s) serve on"
        )
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(lambda _: _complete(base), range(4))) == {answers[0]}
        assert _stop(proc, tree) == 130
    finally:
        _kill([proc], [tree])
    assert all(_port_free(base + i) for i in range(4))
    print(f"\nreplicas: ready in {ready:.0f} s, whole test {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_vllm_data_parallel_2_answers(tiny_llama, tmp_path):
    port, log = _free_ports(1), tmp_path / "dp.log"
    t0 = time.monotonic()
    proc = _serve(tiny_llama, (["--port", port, *SMALL], [*EAGER, "--data-parallel-size", "2"]), log)
    tree: list = []
    try:
        ready = _wait_for(proc, log, "arm-int4 serve: ready in")
        tree = _tree(proc)
        text = log.read_text(errors="replace")
        assert "export VLLM_CPU_OMP_THREADS_BIND='0|1'" in text  # one CPU per DP rank, [DP, PP, TP] order
        assert text.count("local_rank=0, core ids=[0]") + text.count("local_rank=0, core ids=[1]") == 2  # 2 cores
        with ThreadPoolExecutor(4) as pool:
            answers = set(pool.map(lambda _: _complete(port), range(4)))
        assert len(answers) == 1
        if "tokens" in GREEDY:
            assert next(iter(answers))[0] == GREEDY["tokens"]
        assert _stop(proc, tree) == 130
    finally:
        _kill([proc], [tree])
    print(f"\nDP=2: ready in {ready:.0f} s, whole test {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_two_nodes_of_one_engine_over_loopback_match_a_single_engine(tiny_llama, tmp_path):
    """vLLM's mp executor across nodes: node 1 runs `serve --headless` (workers only), node 0 the API
    server; torch.distributed meets at 127.0.0.1:MASTER_PORT. Pipeline parallel 2, one stage per node."""
    t0 = time.monotonic()
    if "tokens" not in GREEDY:  # run alone: one single engine for the reference tokens
        port, log = _free_ports(1), tmp_path / "single.log"
        proc = _serve(tiny_llama, (["--port", port, "--cpus", "0", *SMALL], EAGER), log)
        try:
            _wait_for(proc, log, "arm-int4 serve: ready in")
            tree = _tree(proc)
            GREEDY["tokens"] = _complete(port)[0]
            assert _stop(proc, tree) == 130
        finally:
            _kill([proc])
    port, master = _free_ports(1), _free_ports(1)
    words = ["--max-num-seqs", "4", "-pp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", master]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [
        _serve(tiny_llama, (["--port", port, "--cpus", str(r), *SMALL], [*words, "--node-rank", str(r)]), logs[r])
        for r in (1, 0)
    ][::-1]
    trees: list = []
    try:
        _wait_for(nodes[1], logs[1], "started as a worker node")
        ready = _wait_for(nodes[0], logs[0], "arm-int4 serve: ready in")
        assert "serve_headless.py --model" in logs[1].read_text() and "--headless" in logs[1].read_text()
        assert "export VLLM_HOST_IP=127.0.0.1" in logs[0].read_text()
        tokens, text = _complete(port)
        assert tokens == GREEDY["tokens"], (text, tokens, GREEDY["tokens"])
        trees = [_tree(p) for p in nodes]
        assert [_stop(p, t) for p, t in zip(nodes, trees, strict=True)] == [130, 130]
    finally:
        _kill(nodes, trees)
    assert _port_free(port) and _port_free(master)
    print(f"\n2 nodes: ready in {ready:.0f} s, whole test {time.monotonic() - t0:.0f} s", file=sys.stderr)


def test_node_and_dp_commands_parse_with_vllms_own_parser(tmp_path):
    """Guards against vLLM renaming its flags: a headless node's and a DP engine's argv through vLLM's parser."""
    from test_launch import machine, plan, write_checkpoint
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from arm_int4.launch import read_checkpoint

    facts = read_checkpoint(write_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, inter=512))
    m = machine("graviton4", 64)
    words = ["-pp", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29700"]
    node = plan(m, facts, extra_args=words).to_server_argv()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(list(node[2:]))
    assert args.headless and (args.nnodes, args.node_rank, args.pipeline_parallel_size) == (2, 1, 2)
    assert (args.master_addr, args.master_port) == ("10.0.0.1", 29700)
    dp = plan(m, facts, extra_args=["--data-parallel-size", "2"]).to_server_argv()
    assert make_arg_parser(FlexibleArgumentParser()).parse_args(list(dp[3:])).data_parallel_size == 2
