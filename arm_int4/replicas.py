"""N independent vLLM engines behind vllm-router: `plan_replicas(machine, facts, request, n) -> ReplicaSet`.

Each replica is a whole `launch.plan` of its own slice of the machine (placement.restrict): the usable CPUs
are cut into N slices the way tensor-parallel ranks are (placement.rank_lists: spread evenly over the NUMA
nodes, each node's CPUs split between the replicas on it), and each replica sizes its KV cache from its
share of its NUMA node's memory. Replicas listen on 127.0.0.1 (ports after the router's); only the router
listens on the request's host and port. Remote engines (`upstreams`, e.g. `arm-int4 serve` on other hosts)
join the same router. Pure: runner.serve_replicas starts what this plans.

vllm-router 0.1.17 (Rust, on the package index for x86_64 and aarch64) takes `--worker-urls` and waits for
each worker's /health before it listens; it checks /health again every `--health-check-interval-secs` and
stops routing to a worker after `--health-failure-threshold` failures, and retries a failed request on
another worker. `/readiness` answers 200 once a worker is healthy; `/workers` lists them with is_healthy.
"""

import shlex
import sys
from dataclasses import dataclass

from .checkpoint import CheckpointFacts
from .errors import PreflightError, UsageError
from .hardware import Machine, format_cpulist, parse_cpulist
from .launch import plan
from .placement import cpu_sets, rank_lists, restrict
from .request import EngineRequest

__all__ = ["ROUTER_MODULE", "RouterSpec", "ReplicaSet", "plan_replicas", "POLICY", "HEALTH_INTERVAL_S"]

ROUTER_MODULE = "vllm_router.launch_router"  # the `vllm-router` console script's module
# round_robin, not the router's default cache_aware: replicas of one model, short prompts; cache_aware
# sends requests sharing a prefix to one replica, which a benchmark's identical prompts all do.
POLICY = "round_robin"
HEALTH_INTERVAL_S = 5  # the router's default is 60 s: a dead replica would take minutes to leave the pool


@dataclass(frozen=True)
class RouterSpec:
    """vllm-router in front of the replicas: its command line, rendered once."""

    python: str
    host: str
    port: int
    worker_urls: tuple
    metrics_port: int  # the router always starts a Prometheus exporter (default 29000: would clash)
    policy: str = POLICY
    env: dict = None  # type: ignore[assignment]  # nothing of its own; {} after __post_init__
    health_path: str = "/readiness"  # 200 once one worker is healthy (/health answers before any is)

    def __post_init__(self):
        object.__setattr__(self, "env", dict(self.env or {}))

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_server_argv(self) -> tuple:
        return (
            self.python,
            "-m",
            ROUTER_MODULE,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--worker-urls",
            *self.worker_urls,
            "--policy",
            self.policy,
            "--worker-startup-check-interval",
            "1",
            "--health-check-interval-secs",
            str(HEALTH_INTERVAL_S),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(self.metrics_port),
        )

    @property
    def ports(self) -> tuple:
        return (self.port, self.metrics_port)

    def format(self) -> str:
        """The command, one option (with its values) per line."""
        argv = self.to_server_argv()
        cmd = [" ".join(map(shlex.quote, argv[:3]))]
        for a in argv[3:]:
            if a.startswith("--"):
                cmd.append(a)
            else:
                cmd[-1] += " " + shlex.quote(a)
        return " \\\n    ".join(cmd)


@dataclass(frozen=True)
class ReplicaSet:
    """The replicas (one EngineSpec each, with the CPUs it was given), the remote engines, and the router."""

    replicas: tuple
    cpus: tuple  # cpulist per replica
    upstreams: tuple
    router: RouterSpec

    @property
    def worker_urls(self) -> tuple:
        return self.router.worker_urls

    def format(self) -> str:
        """Every process's command and environment, as `serve --dry-run` prints them."""
        n, out = len(self.replicas), []
        for k, (spec, cpus) in enumerate(zip(self.replicas, self.cpus, strict=True)):
            out.append(f"# ---- replica {k + 1} of {n}: CPUs {cpus}, {spec.base_url} (its own process group)")
            out.append(spec.format())
        if self.upstreams:
            out.append(f"# ---- remote engines joining the router: {' '.join(self.upstreams)}")
        out.append(
            f"# ---- vllm-router on {self.router.base_url}: {self.router.policy}, /health of each worker every "
            f"{HEALTH_INTERVAL_S} s, metrics on 127.0.0.1:{self.router.metrics_port}"
        )
        out.append(self.router.format())
        return "\n".join(out)


def replica_cpus(machine: Machine, n: int) -> list:
    """The cpulist of each of `n` replicas: placement.rank_lists over the usable CPUs per NUMA node."""
    per_node = cpu_sets(machine)
    if not per_node:
        raise PreflightError(f"--replicas {n}: this machine's CPU ids are unknown, so they cannot be split")
    lists = rank_lists(per_node, n) if n > 1 else [sorted(c for node in per_node for c in node)]
    if not lists:
        total = sum(map(len, per_node))
        raise PreflightError(
            f"--replicas {n} do not fit {total} usable CPUs on {len(per_node)} NUMA node(s): each replica needs a "
            "CPU of its own; use fewer replicas"
        )
    return [format_cpulist(c) for c in lists]


def plan_replicas(
    machine: Machine,
    facts: CheckpointFacts,
    request: EngineRequest,
    replicas: int,
    *,
    upstreams=(),
    can_bind: bool = True,
    python: str = sys.executable,
) -> ReplicaSet:
    """`replicas` local engines (0: only `upstreams`) behind one router on request.host:request.port."""
    if replicas < 0 or (replicas == 0 and not upstreams):
        raise UsageError(f"--replicas {replicas}: give 1 or more, or --upstream URL for remote engines only")
    bad = [u for u in upstreams if not u.startswith(("http://", "https://"))]
    if bad:
        raise UsageError(f"--upstream {bad[0]}: give the engine's base URL, e.g. http://10.0.0.2:8000")
    if not can_bind and replicas > 1:
        raise PreflightError(f"--replicas {replicas} need CPUs of their own, but this process may not set CPU affinity")
    if request.cpus:
        machine = restrict(machine, request.cpus)
        request = request.replace(cpus=None)
    slices = replica_cpus(machine, replicas) if replicas else []
    node_of = {cpu: node for node, cs in machine.numa_nodes for cpu in parse_cpulist(cs)}
    sharing = [node_of.get(parse_cpulist(s)[0]) for s in slices]  # the node whose memory each replica's KV takes
    specs = []
    for k, cpus in enumerate(slices):
        share = max(1, sharing.count(sharing[k])) if sharing[k] is not None else len(slices)
        mine = restrict(machine, cpus, share=share)
        specs.append(plan(mine, facts, request.replace(host="127.0.0.1", port=request.port + 1 + k), python=python))
    urls = tuple(s.base_url for s in specs) + tuple(u.rstrip("/") for u in upstreams)
    metrics = request.port + len(specs) + 1  # the ports after the replicas' (checked free before anything starts)
    router = RouterSpec(python=python, host=request.host, port=request.port, worker_urls=urls, metrics_port=metrics)
    return ReplicaSet(tuple(specs), tuple(slices), tuple(upstreams), router)
