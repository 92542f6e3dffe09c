"""How one vLLM engine's workers are laid out: tensor x pipeline x data parallel, on one node or several
(a step of launch.plan; pure).

Read once from the request (the words after `--` as vLLM spells them, `--ranks` for tensor parallel),
checked against what vLLM 0.32's CPU platform runs, in one line when it does not:
- Ray is refused: platforms/cpu.py leaves `ray_device_key` empty and v1/executor/ray_utils.py raises
  "current platform cpu does not support ray". Across hosts vLLM CPU uses its mp executor:
  `--nnodes N --node-rank R --master-addr ADDR [--master-port P]` (engine/arg_utils.py), torch.distributed
  over TCP to ADDR:P (distributed/parallel_state.py) and ZeroMQ message queues on ports each node opens.
- A node of rank > 0 runs no API server: vLLM's `serve --headless` (entrypoints/cli/serve.py run_headless
  starts a MultiprocExecutor for that node's workers only).
- `--data-parallel-size N` on one host: one API server, N engine cores with internal load balancing; CPU
  lists in VLLM_CPU_OMP_THREADS_BIND are read in [DP, PP, TP] order (utils/ompmultiprocessing.py).
"""

import ipaddress
from dataclasses import dataclass
from typing import Optional

from .errors import PreflightError, RayUnsupported
from .request import Decision, EngineRequest

__all__ = ["Layout", "layout", "DEFAULT_MASTER_PORT"]

DEFAULT_MASTER_PORT = 29501  # vllm/config/parallel.py ParallelConfig.master_port
_WHOLE = ("pipeline_parallel_size", "data_parallel_size", "nnodes", "node_rank", "master_port")


@dataclass(frozen=True)
class Layout:
    """tp None: the plan decides (one rank per NUMA node); the rest as vLLM reads them (1, 0, None = its default)."""

    tp: Optional[int]
    tp_source: str
    pp: int = 1
    dp: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def distributed(self) -> bool:
        """More than tensor parallel on one node: the plan then counts ranks as DP x PP x TP / nodes."""
        return self.pp > 1 or self.dp > 1 or self.nnodes > 1

    @property
    def headless(self) -> bool:
        """This node runs only workers (vLLM `serve --headless`): every node but rank 0."""
        return self.nnodes > 1 and self.node_rank > 0

    def local_ranks(self) -> int:
        """Worker processes on this node: the world (DP x PP x TP) split evenly over the nodes."""
        return self.dp * self.pp * (self.tp or 1) // self.nnodes

    def decisions(self) -> tuple:
        if not self.distributed:
            return ()
        what = [f"{n} {k}" for n, k in ((self.dp, "data-parallel"), (self.pp, "pipeline"), (self.tp or 1, "tensor"))]
        said = f"{' x '.join(what)} ranks = {self.dp * self.pp * (self.tp or 1)} workers"
        if self.nnodes > 1:
            role = "workers only (vLLM --headless)" if self.headless else "the API server and its workers"
            said += (
                f" over {self.nnodes} nodes, {self.local_ranks()} here; node {self.node_rank} runs {role}; "
                f"torch.distributed meets at {self.master_addr}:{self.master_port} (open it and the message-queue "
                "ports vLLM picks between the nodes)"
            )
        else:
            said += " on this host, each bound to its own CPUs and its NUMA node's memory"
        return (Decision("layout", self.local_ranks(), "vllm args", said),)

    def host_ip(self) -> Optional[str]:
        """VLLM_HOST_IP for a multi-node engine: the address the other nodes reach this one at. vLLM otherwise
        takes the interface of its default route (utils/network_utils.py get_ip), wrong on a loopback run."""
        if self.nnodes == 1 or not self.master_addr:
            return None
        try:
            loopback = ipaddress.ip_address(self.master_addr).is_loopback
        except ValueError:
            loopback = self.master_addr == "localhost"
        if loopback:
            return "127.0.0.1"
        return self.master_addr if self.node_rank == 0 else None


def layout(request: EngineRequest) -> Layout:
    """The request's parallel layout; RayUnsupported / PreflightError in one line for what vLLM CPU refuses."""
    kw = request.vllm_kwargs
    for key in ("distributed_executor_backend", "data_parallel_backend"):
        if kw.get(key) == "ray":
            flag = "--" + key.replace("_", "-")
            raise RayUnsupported(
                f'{flag} ray: vLLM 0.32 on CPU refuses Ray ("current platform cpu does not support ray"): drop it; '
                "across hosts use --nnodes/--node-rank/--master-addr (vLLM's mp executor) or serve --replicas/"
                "--upstream behind the router (docs/serve.md)"
            )
    for key in _WHOLE:
        v = kw.get(key)
        if v is not None and (type(v) is not int or v < 0 or (v < 1 and key != "node_rank")):
            raise PreflightError(f"--{key.replace('_', '-')} {v!r} is not a whole number of the right range")
    tp, p = kw.get("tensor_parallel_size"), request.profile
    tp, source = next(
        ((v, s) for v, s in ((tp, "vllm args"), (request.ranks, "request"), (p.ranks, "profile")) if v is not None),
        (None, "rule"),
    )
    out = Layout(
        tp=tp,
        tp_source=source,
        pp=kw.get("pipeline_parallel_size") or 1,
        dp=kw.get("data_parallel_size") or 1,
        nnodes=kw.get("nnodes") or 1,
        node_rank=kw.get("node_rank") or 0,
        master_addr=kw.get("master_addr"),
        master_port=kw.get("master_port") or DEFAULT_MASTER_PORT,
    )
    if out.distributed and out.tp is None:
        out = Layout(1, "rule", out.pp, out.dp, out.nnodes, out.node_rank, out.master_addr, out.master_port)
    if out.nnodes > 1:
        world = out.dp * out.pp * (out.tp or 1)
        if out.dp > 1:
            raise PreflightError(
                f"--nnodes {out.nnodes} with --data-parallel-size {out.dp}: multi-node data parallel is not planned "
                "here; run one engine per host and put them behind the router (serve --replicas N --upstream URL)"
            )
        if world % out.nnodes:
            raise PreflightError(
                f"--nnodes {out.nnodes} does not divide the {world} workers (PP {out.pp} x TP {out.tp}): "
                "use a pipeline or tensor size that is a multiple of the node count"
            )
        if out.node_rank >= out.nnodes:
            raise PreflightError(f"--node-rank {out.node_rank} is not below --nnodes {out.nnodes}: number nodes 0..N-1")
        if not out.master_addr:
            raise PreflightError(
                f"--nnodes {out.nnodes} needs --master-addr ADDR: the address of node 0, where torch.distributed meets"
            )
    elif out.node_rank or kw.get("headless"):
        raise PreflightError("--node-rank / --headless without --nnodes N (N > 1): give the node count")
    return out
