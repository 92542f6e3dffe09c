"""Where each vLLM CPU rank runs: CPU lists per tensor-parallel rank from a Machine's NUMA nodes,
affinity, cgroup cpuset and quota (a step of launch.plan; pure, no process is started).

vLLM 0.32 reads the lists from VLLM_CPU_OMP_THREADS_BIND ("0-30|32-62", one per local rank;
utils/ompmultiprocessing.py) and sets OMP_NUM_THREADS per worker from each list's length; its own
"auto" binding gives one rank per NUMA node and refuses more ("Not enough allowed NUMA nodes").
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .checkpoint import CheckpointFacts
from .errors import HeadsDoNotSplit, PreflightError
from .hardware import Machine, format_cpulist, parse_cpulist
from .request import Decision

__all__ = ["cpu_sets", "heads_split", "rank_lists", "place", "restrict", "Placement"]


@dataclass(frozen=True)
class Placement:
    """Where the ranks run: their count, CPU list per rank ("" lists when vLLM or nobody binds), threads
    per rank, the env vars that say so to vLLM, and the decisions behind them."""

    ranks: int
    bind_lists: tuple
    threads_per_rank: Optional[int]
    env: dict
    decisions: tuple


def cpu_sets(machine: Machine) -> list:
    """Usable CPU ids per NUMA node (affinity ∩ cgroup cpuset; empty nodes dropped); [] if unknown."""
    nodes = [set(parse_cpulist(c)) for _, c in machine.numa_nodes]
    if not nodes and machine.logical_cpus:
        nodes = [set(range(machine.logical_cpus))]
    for limit in (machine.affinity, machine.cgroup_cpuset):
        if limit:
            allowed = set(parse_cpulist(limit))
            nodes = [n & allowed for n in nodes] if nodes else [allowed]
    return [sorted(n) for n in nodes if n]


def restrict(machine: Machine, cpus: str, share: int = 1) -> Machine:
    """The machine as one engine of several sees it: only `cpus` (a cpulist, within the usable ones), and
    1/`share` of the memory of the NUMA node(s) those CPUs are on and of the CPU quota, so that engines
    sharing a node each size their KV cache from their own part (serve --replicas, --cpus).
    PreflightError when none of `cpus` is usable here."""
    usable = {c for n in cpu_sets(machine) for c in n}
    want = set(parse_cpulist(cpus))
    mine = sorted(want & usable) if usable else sorted(want)
    if not mine:
        raise PreflightError(
            f"--cpus {cpus}: none of them is usable here (usable: {format_cpulist(sorted(usable)) or 'unknown'})"
        )
    node_of = {cpu: node for node, cs in machine.numa_nodes for cpu in parse_cpulist(cs)}
    nodes = {node_of[c] for c in mine if c in node_of}
    node_memory = machine.node_memory
    if node_memory and share > 1:
        node_memory = tuple((n, t, a // share if n in nodes else a) for n, t, a in node_memory)
    return dataclasses.replace(
        machine,
        affinity=format_cpulist(mine),
        mem_available_bytes=machine.mem_available_bytes // share if machine.mem_available_bytes else None,
        node_memory=node_memory,
        cgroup_cpu_quota=machine.cgroup_cpu_quota / share if machine.cgroup_cpu_quota else None,
        cgroup_mem_limit=machine.cgroup_mem_limit // share if machine.cgroup_mem_limit else None,
        cgroup_mem_usage=machine.cgroup_mem_usage // share if machine.cgroup_mem_usage else None,
    )


def heads_split(facts: CheckpointFacts, ranks: int) -> bool:
    """vLLM's tensor-parallel rule: heads divide by TP; KV heads divide by TP or TP by them."""
    h, kv = facts.num_heads, facts.num_kv_heads or facts.num_heads
    if not h or not kv:
        return True
    return h % ranks == 0 and (kv % ranks == 0 if kv >= ranks else ranks % kv == 0)


def _split(cpus: list, parts: int) -> list:
    """`parts` equal contiguous slices of one node's CPUs (a remainder is left unbound: tensor-parallel
    ranks wait for the slowest, so unequal thread counts only waste the extra CPUs)."""
    size = len(cpus) // parts
    return [cpus[k * size : (k + 1) * size] for k in range(parts)]


def rank_lists(per_node: list, ranks: int) -> list:
    """CPU lists for `ranks` ranks: one rank = every CPU; otherwise ranks spread evenly over the
    nodes (node k gets ranks // nodes, the first ranks % nodes one more) and each node's CPUs split
    between its ranks. [] when some node would give a rank no CPU."""
    if ranks == 1:
        return [sorted(set().union(*map(set, per_node)))]
    nodes = per_node[:ranks]
    counts = [ranks // len(nodes) + (1 if k < ranks % len(nodes) else 0) for k in range(len(nodes))]
    lists = [chunk for n, c in zip(nodes, counts, strict=False) for chunk in _split(list(n), c)]
    return lists if all(lists) else []


def place(
    machine: Machine,
    facts: CheckpointFacts,
    *,
    ranks: Optional[int],
    reserve: Optional[int],
    bind: Optional[str],
    can_bind: bool,
    source: str = "rule",
    tp: Optional[int] = None,
) -> Placement:
    """The placement for `ranks` (None: one per NUMA node) with `reserve` CPUs kept out (None: vLLM's
    one per rank), `bind` "auto"/"nobind" (the profile's) or None (the plan binds). `source` says
    where the rank count came from, for the decisions. tp: the tensor-parallel size when `ranks` counts
    data/pipeline-parallel workers too (the heads must split over tp only); None: ranks are all TP."""
    env: dict = {}
    why: list = []
    ranks_wanted, bind_mode = ranks, bind

    def said(value: str) -> tuple:  # the one decision of the nobind/auto branches
        return (Decision("VLLM_CPU_OMP_THREADS_BIND", value, "profile" if bind_mode == value else "rule", why[-1]),)

    per_node = cpu_sets(machine)
    usable = machine.usable_cpus()
    if not can_bind or bind_mode == "nobind":
        if ranks_wanted and ranks_wanted > 1:
            raise PreflightError(
                f"{ranks_wanted} tensor-parallel ranks need their own CPUs, but "
                + (
                    "this process may not set CPU affinity (container policy)"
                    if not can_bind
                    else "the profile says bind: nobind"
                )
                + ": use one rank"
            )
        reserve = 1 if reserve is None else reserve
        threads = (usable - reserve if usable > reserve else usable) if usable else None
        kept = usable - threads if usable and threads else 0
        why.append(
            "VLLM_CPU_OMP_THREADS_BIND=nobind: "
            + (
                "sched_setaffinity is not permitted here (container seccomp/cgroup policy)"
                if not can_bind
                else "from the profile"
            )
            + f"; one rank, OMP_NUM_THREADS={threads} "
            f"({usable} usable CPUs, {kept} reserved)"
        )
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        return Placement(1, (), threads, env, said("nobind"))
    smt = (machine.threads_per_core or 1) > 1 and machine.arch == "x86_64"
    more_ranks_than_nodes = bool(ranks_wanted and per_node and ranks_wanted > len(per_node))
    if bind_mode == "auto" or not per_node or (smt and not more_ranks_than_nodes):
        if ranks_wanted and ranks_wanted > max(len(per_node), 1) and bind_mode == "auto":
            raise PreflightError(
                f"{ranks_wanted} ranks with VLLM_CPU_OMP_THREADS_BIND=auto: vLLM binds one rank per "
                f"NUMA node and this machine has {len(per_node) or 'an unknown number of'} node(s) "
                '("Not enough allowed NUMA nodes"): drop bind: auto so the plan gives each rank its CPUs'
            )
        reason = (
            "from the profile"
            if bind_mode == "auto"
            else "x86 SMT: vLLM's auto binding keeps one logical CPU per physical core"
            if smt
            else "CPU ids unknown in this machine record"
        )
        env["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
        if reserve is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserve)
        why.append(
            f"VLLM_CPU_OMP_THREADS_BIND=auto ({reason}): vLLM binds rank N to the N-th allowed "
            "NUMA node and reserves VLLM_CPU_NUM_OF_RESERVED_CPU (default 1 per rank) for its scheduler"
        )
        return Placement(ranks_wanted or 1, (), None, env, said("auto"))
    ranks = len(per_node) if ranks_wanted is None else ranks_wanted
    split = tp or ranks
    if split > 1 and not heads_split(facts, split):
        if ranks_wanted:
            raise HeadsDoNotSplit(facts.name, facts.num_heads, facts.num_kv_heads, split)
        why.append(f"{facts.num_heads} attention heads do not split over {ranks} ranks: one rank spans all nodes")
        ranks = 1
    lists = rank_lists(per_node, ranks)
    if not lists:
        raise PreflightError(
            f"{ranks} ranks do not fit {sum(map(len, per_node))} usable CPUs on {len(per_node)} NUMA "
            "node(s): each rank needs at least one CPU of its own; use fewer ranks"
        )
    if usable and sum(map(len, lists)) > usable:  # a CPU quota below the cpuset: trim evenly
        lists = [c[: max(1, usable // ranks)] for c in lists]
        why.append(f"cgroup CPU quota {machine.cgroup_cpu_quota:g}: {usable} threads in all")
    total = sum(map(len, lists))
    reserve = ranks if reserve is None else reserve
    if reserve and total - reserve < ranks:
        why.append(f"no CPU reserved: {total} usable CPU(s) for {ranks} rank(s) cannot spare {reserve}")
        reserve = 0
    per_rank = [reserve // ranks] * ranks  # vLLM's split: the remainder goes to the last ranks
    for i in range(ranks - 1, ranks - 1 - reserve % ranks, -1):
        per_rank[i] += 1
    if any(len(c) - k < 1 for c, k in zip(lists, per_rank, strict=False)):
        why.append(f"no CPU reserved: a rank would be left without CPUs after reserving {reserve}")
        reserve, per_rank = 0, [0] * ranks
    lists = [c[: len(c) - k] if k else c for c, k in zip(lists, per_rank, strict=False)]
    bind_lists = tuple(format_cpulist(c) for c in lists)
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(bind_lists)
    if tp is not None and tp != ranks:
        scope = f"{ranks} worker(s) here of a data/pipeline x {tp}-way tensor-parallel engine, each with its own CPUs"
    elif ranks > len(per_node):
        # vLLM's own "auto" binding refuses this ("Not enough allowed NUMA nodes to bind threads of N
        # local CPUWorkers"); explicit per-rank lists work (tensor parallel on one socket).
        scope = f"{ranks} tensor-parallel ranks on {len(per_node)} NUMA node(s), each with its own CPUs"
    elif ranks > 1:
        scope = f"one rank per NUMA node ({ranks} nodes), --tensor-parallel-size {ranks}"
    else:
        scope = "one rank"
    limits = " ∩ ".join(x for x, v in (("affinity", machine.affinity), ("cgroup cpuset", machine.cgroup_cpuset)) if v)
    why.append(
        f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}: {scope}"
        + (f", only CPUs in {limits}" if limits else "")
        + (
            f"; {reserve} CPU(s) left out for vLLM's scheduler/API process (reserve)"
            if reserve
            else "; no CPU reserved"
        )
    )
    why.append(
        "vLLM sets OMP_NUM_THREADS per worker from its bind list (VLLM_CPU_NUM_OF_RESERVED_CPU "
        "only applies to 'auto', so the plan leaves reserved CPUs out of the lists itself)"
    )
    notes = tuple(Decision("ranks", ranks, "rule", w) for w in why[:-2])  # heads, quota, reserve adjustments
    bound = Decision("VLLM_CPU_OMP_THREADS_BIND", env["VLLM_CPU_OMP_THREADS_BIND"], source, why[-2])
    per_list = min(map(len, lists))
    omp = Decision("OMP_NUM_THREADS", per_list, "rule", why[-1])
    return Placement(ranks, bind_lists, per_list, env, (*notes, bound, omp))
