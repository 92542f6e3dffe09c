"""arm_int4.replicas: N engines behind vllm-router, planned on recorded machines, without vLLM.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_replicas.py -q   (~1 s)
The real run (two replicas answering, one killed) is tests/test_scaleout.py.
"""

import dataclasses
import importlib.util

import pytest
from test_launch import machine, write_checkpoint

from arm_int4 import cli, launch, options, replicas
from arm_int4.errors import PreflightError, UsageError
from arm_int4.launch import GiB, read_checkpoint


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    return read_checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / "Llama-8B", scheme="channelwise"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "small"
    return read_checkpoint(write_checkpoint(d, hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024))


def _request(*words):
    opts = cli.command_options(["serve", "MODEL", *words])
    return options.engine_request(opts, offline=False), opts


def test_each_replica_gets_its_own_cpus_and_its_nodes_memory_share(llama8b):
    """Ampere Altra, 2 NUMA nodes x 80 CPUs, 256 GiB: four replicas, two per node, 40 CPUs each; each sizes
    its KV cache from a quarter of the memory (half of its node's), so four fit where one would take it all."""
    m = machine("ampere-altra", 256)
    m = dataclasses.replace(m, node_memory=((0, 128 * GiB, 128 * GiB), (1, 128 * GiB, 128 * GiB)))
    request, _ = _request("--replicas", "4", "--port", "9000")
    rs = replicas.plan_replicas(m, llama8b, request, 4, python="python3")
    assert rs.cpus == ("0-39", "40-79", "80-119", "120-159")
    assert [s.bind_lists for s in rs.replicas] == [("0-38",), ("40-78",), ("80-118",), ("120-158",)]
    assert [s.port for s in rs.replicas] == [9001, 9002, 9003, 9004] and {s.host for s in rs.replicas} == {"127.0.0.1"}
    one = launch.plan(m, llama8b, request)  # one engine, TP 2 over both nodes
    kv = [next(d.reason for d in s.decisions if d.field == "VLLM_CPU_KVCACHE_SPACE") for s in rs.replicas]
    assert all("NUMA node" in r and "64.0 GiB available" in r for r in kv)  # half of its node's 128 GiB
    # 64 GiB - 10.4 GiB of weights (each replica loads them all) - 4 GiB headroom, whole GiB
    assert [s.kv_cache_gib for s in rs.replicas] == [49] * 4
    assert sum(s.kv_cache_gib for s in rs.replicas) < one.kv_cache_gib * one.ranks  # four copies of the weights
    argv = rs.router.to_server_argv()
    assert argv[:3] == ("python3", "-m", replicas.ROUTER_MODULE) and (rs.router.host, rs.router.port) == (
        "127.0.0.1",
        9000,
    )
    urls = argv[argv.index("--worker-urls") + 1 : argv.index("--policy")]
    assert urls == tuple(f"http://127.0.0.1:{p}" for p in (9001, 9002, 9003, 9004))
    assert argv[argv.index("--prometheus-port") + 1] == "9005"  # after the replicas' ports, not the default 29000


def test_upstreams_join_the_router_and_may_stand_alone(small):
    m = machine("x86-amd-epyc-this-box", 20)
    request, _ = _request("--port", "8000", "--kv-cache-gib", "1")
    rs = replicas.plan_replicas(m, small, request, 2, upstreams=("http://10.0.0.2:8000/",))
    assert rs.worker_urls == ("http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://10.0.0.2:8000")
    alone = replicas.plan_replicas(m, small, request, 0, upstreams=("http://10.0.0.2:8000",))
    assert alone.replicas == () and alone.worker_urls == ("http://10.0.0.2:8000",)
    assert "remote engines joining the router: http://10.0.0.2:8000" in alone.format()
    with pytest.raises(UsageError, match=r"--upstream 10\.0\.0\.2:8000: give the engine's base URL"):
        replicas.plan_replicas(m, small, request, 1, upstreams=("10.0.0.2:8000",))
    with pytest.raises(UsageError, match="--replicas 0: give 1 or more"):
        replicas.plan_replicas(m, small, request, 0)
    with pytest.raises(PreflightError, match="--replicas 3 do not fit 2 usable CPUs"):
        replicas.plan_replicas(m, small, request, 3)


def test_dry_run_prints_every_process(tmp_path):
    """`serve --replicas 2 --dry-run`: each replica's reasons, env and command, then the router's."""
    from conftest import run_cli

    d = write_checkpoint(tmp_path / "m", hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024)
    r = run_cli("serve", d, "--replicas", "2", "--port", "8100", "--dry-run", "--", "--enforce-eager")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("export VLLM_CPU_OMP_THREADS_BIND=") == 2 and out.count("--enforce-eager") == 2
    assert "# ---- replica 1 of 2: CPUs 0, http://127.0.0.1:8101" in out and "--port 8102" in out
    assert "-m vllm_router.launch_router" in out and "--worker-urls http://127.0.0.1:8101 http://127.0.0.1:8102" in out
    alone = run_cli("serve", d, "--upstream", "http://10.0.0.2:8000", "--dry-run")
    assert alone.returncode == 0 and "# ---- replica" not in alone.stdout
    assert "--worker-urls http://10.0.0.2:8000 --policy" in alone.stdout.replace(" \\\n    ", " ")
    bad = run_cli("serve", d, "--replicas", "2", "--upstream", "nohost", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm_router") is None, reason="vllm-router is not installed here")
def test_the_router_command_parses_with_vllm_routers_own_parser(small):
    """Guards against vllm-router renaming its flags: our argv through its launcher's parser."""
    from vllm_router.launch_router import parse_router_args

    request, _ = _request("--port", "8000", "--kv-cache-gib", "1")
    rs = replicas.plan_replicas(machine("x86-amd-epyc-this-box", 20), small, request, 2)
    args = parse_router_args(list(rs.router.to_server_argv()[3:]))
    assert args.worker_urls == list(rs.worker_urls) and args.policy == "round_robin"
    assert (args.host, args.port, args.prometheus_port) == ("127.0.0.1", 8000, 8003)
    assert args.health_check_interval_secs == replicas.HEALTH_INTERVAL_S and args.worker_startup_check_interval == 1
