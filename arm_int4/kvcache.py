"""How much KV cache each vLLM CPU rank gets (VLLM_CPU_KVCACHE_SPACE, whole GiB per rank): from the
memory vLLM will check — system-wide, and the NUMA node each rank's memory is bound to, clamped by
the cgroup (a step of launch.plan; pure). docs/serve.md ("KV cache sizing") has the why and the margin.
"""

import math

from .checkpoint import kv_bytes_per_token, weights_in_memory
from .errors import PreflightError
from .hardware import Machine, parse_cpulist
from .placement import cpu_sets
from .request import Decision

__all__ = [
    "GiB",
    "MIN_KV_CACHE_GIB",
    "HEADROOM_BYTES",
    "HEADROOM_BYTES_PER_RANK",
    "NODE_HEADROOM_BYTES",
    "NODE_HEADROOM_BYTES_PER_RANK",
    "DEFAULT_MAX_SEQS_PER_RANK",
    "rank_nodes",
    "size_kv_cache",
]

GiB = 1024**3
MIN_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE is parsed with int(): whole GiB only
# Memory kept free besides weights and KV. Measured here (tiny model, 1 rank): API server 0.8 GiB
# RSS, engine core 0.8 GiB, worker 0.9 GiB + KV + weights. So 3 GiB for the two front processes,
# activations and the OS, plus 1 GiB per worker rank.
HEADROOM_BYTES = 3 * GiB
HEADROOM_BYTES_PER_RANK = 1 * GiB
# The same, against the memory of the NUMA node a rank is bound to, which is what vLLM checks before
# it allocates the KV cache (after the weights are loaded). NODE_HEADROOM_* are set from a measured
# start: see docs/serve.md ("KV cache sizing").
NODE_HEADROOM_BYTES = 3 * GiB
NODE_HEADROOM_BYTES_PER_RANK = 1 * GiB
DEFAULT_MAX_SEQS_PER_RANK = 128  # vLLM 0.32 CPU default for the OpenAI server (arg_utils.py)


def rank_nodes(machine: Machine, ranks: int, bind: tuple) -> list:
    """The NUMA node whose memory each rank's KV cache is allocated on: vLLM binds a rank's memory to
    the node of the first CPU it may run on (v1/worker/cpu_worker.py); "auto" binds rank N to the
    N-th allowed node. [] when the machine record has no NUMA facts."""
    node_of = {cpu: node for node, cpus in machine.numa_nodes for cpu in parse_cpulist(cpus)}
    if not node_of:
        return []
    if bind:
        return [node_of.get(parse_cpulist(b)[0], 0) for b in bind]
    nodes = [node for node, _ in machine.numa_nodes]
    usable = [c for cs in cpu_sets(machine) for c in cs]
    first = node_of.get(usable[0], nodes[0]) if usable else nodes[0]
    return nodes[:ranks] if ranks > 1 else [first]


def _node_budgets(machine: Machine, rank_nodes: list, weights: int) -> dict:
    # weights: all copies this engine loads (data-parallel engines each load the model)
    """{node: (bytes each of its ranks may give the KV cache, available, ranks there, the same without
    headroom)} from memory
    as vLLM will count it when it allocates: the node's available memory (clamped by the cgroup's
    limit - usage, as vLLM clamps it) minus the weights its ranks load there (tensor-parallel ranks
    hold 1/ranks each), the front processes, and each rank's own overhead (NODE_HEADROOM_*)."""
    avail_of = {n: a for n, _, a in machine.node_memory or ()}
    if machine.cgroup_mem_limit is not None:
        room = machine.cgroup_mem_limit - (machine.cgroup_mem_usage or 0)
        avail_of = {n: min(a, max(room, 0)) for n, a in avail_of.items()}
    out = {}
    for node in dict.fromkeys(rank_nodes):
        if node not in avail_of:
            continue
        here = rank_nodes.count(node)
        free = (
            avail_of[node]
            - weights * here // len(rank_nodes)
            - NODE_HEADROOM_BYTES
            - NODE_HEADROOM_BYTES_PER_RANK * here
        )
        hard = (avail_of[node] - weights * here // len(rank_nodes)) // here  # what vLLM itself would accept
        out[node] = (free // here, avail_of[node], here, hard)
    return out


def size_kv_cache(
    machine, facts, *, dtype: str, ranks: int, bind: tuple, requested, context, source="rule", copies: int = 1
) -> Decision:
    """VLLM_CPU_KVCACHE_SPACE (GiB per rank) as a Decision: `requested` (from `source`) checked against
    what fits, or sized from memory and capped at what `context`-token sequences could use. copies: how many
    times the ranks load the weights between them (data-parallel engines: one copy each, split over its ranks)."""
    avail, weights = machine.mem_available_bytes, weights_in_memory(facts, dtype, machine.arch) * copies
    headroom = HEADROOM_BYTES + HEADROOM_BYTES_PER_RANK * ranks
    g = lambda b: f"{b / GiB:.1f} GiB" if abs(b) >= GiB / 10 else f"{b / 2**20:.0f} MiB"
    if avail is None:
        kv = requested or 4
        return Decision(
            "VLLM_CPU_KVCACHE_SPACE",
            kv,
            source if requested else "rule",
            f"VLLM_CPU_KVCACHE_SPACE={kv}: available memory unknown in this machine record "
            "(vLLM checks it against the node's memory at start)",
        )
    free = avail - weights - headroom
    budget, limit_by = free // ranks, f"{g(avail)} available - weights {g(weights)} - headroom {g(headroom)}"
    hard = (avail - weights) // ranks
    nodes = _node_budgets(machine, rank_nodes(machine, ranks, bind), weights)
    if nodes:
        node, (node_budget, node_avail, here, _node_hard) = min(nodes.items(), key=lambda kv_: kv_[1][0])
        hard = min(hard, min(v[3] for v in nodes.values()))
        if node_budget < budget:
            budget = node_budget
            limit_by = (
                f"NUMA node {node}: {g(node_avail)} available as vLLM counts it"
                + (" (cgroup-limited)" if machine.cgroup_mem_limit is not None else "")
                + f", {here} rank(s) there, minus their weights and {g(NODE_HEADROOM_BYTES)} + "
                f"{g(NODE_HEADROOM_BYTES_PER_RANK)}/rank headroom"
            )
    budget_gib = budget // GiB
    if requested is not None:
        if requested * GiB > hard:
            raise PreflightError(
                f"KV cache {requested} GiB per rank does not fit: {limit_by} leaves {g(max(budget, 0))} per rank "
                f"({g(max(hard, 0))} with no headroom at all), and vLLM refuses a KV cache larger than its node's "
                f"free memory: lower --kv-cache-gib (at most {max(budget_gib, 0)} recommended)"
            )
        return Decision(
            "VLLM_CPU_KVCACHE_SPACE",
            requested,
            source,
            f"VLLM_CPU_KVCACHE_SPACE={requested}: as requested ({limit_by}: {g(max(budget, 0))} per rank)",
        )
    if budget_gib < MIN_KV_CACHE_GIB:
        raise PreflightError(
            f"no room for the minimum {MIN_KV_CACHE_GIB} GiB KV cache per rank: {limit_by} = {g(budget)} per rank; "
            "free memory or use a smaller model"
        )
    kv, capped = budget_gib, ""
    per_tok = kv_bytes_per_token(facts, dtype)
    if per_tok and context:
        # the default max-num-seqs, each at full context, is all the KV cache vLLM could ever use
        need = max(MIN_KV_CACHE_GIB, math.ceil(per_tok * context * DEFAULT_MAX_SEQS_PER_RANK / GiB))
        if need < kv:
            kv, capped = (
                need,
                (
                    f"; capped at {need} GiB, enough for {DEFAULT_MAX_SEQS_PER_RANK} sequences x "
                    f"{context} tokens per rank"
                ),
            )
    return Decision(
        "VLLM_CPU_KVCACHE_SPACE",
        kv,
        "rule",
        f"VLLM_CPU_KVCACHE_SPACE={kv} (GiB per rank): {limit_by}, split over {ranks} rank(s), whole GiB{capped}",
    )
