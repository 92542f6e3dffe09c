"""Reading a machine's files: /proc/meminfo, /sys/devices/system/{cpu,node}, cgroup v1/v2, the loader
cache — each under an injectable `root`, so recorded machines (tests/fixtures/machines) read like the
live one. Used by arm_int4.hardware; returns plain values (None = the file did not say).
"""

import glob
import itertools
import os
import re
import subprocess

from .errors import UsageError

__all__ = [
    "parse_cpulist",
    "format_cpulist",
    "read_text",
    "to_int",
    "meminfo",
    "node_memory",
    "cgroup_memory",
    "numa_nodes",
    "topology",
    "cgroup_cpu",
    "tcmalloc",
]


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for chunk in text.strip().split(","):
        if not chunk:
            continue
        lo, _, hi = chunk.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UsageError(f"bad CPU list {text.strip()!r}: expected ranges like '0-3,8'")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpulist(cpus) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (canonical, so '0,1' from lscpu equals '0-1' from sysfs)."""
    runs = [list(g) for _, g in itertools.groupby(enumerate(sorted(set(cpus))), lambda ic: ic[1] - ic[0])]
    return ",".join(f"{r[0][1]}-{r[-1][1]}" if len(r) > 1 else str(r[0][1]) for r in runs)


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def to_int(text) -> int | None:
    return int(text) if text is not None and str(text).strip().isdigit() else None


def meminfo(text: str) -> tuple[int | None, int | None]:
    kb = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))  # /proc/meminfo counts KiB
    total, avail = to_int(kb.get("MemTotal")), to_int(kb.get("MemAvailable"))
    return (total * 1024 if total else None), (avail * 1024 if avail else None)


def node_memory(node_dir: str) -> tuple[tuple[int, int, int], ...] | None:
    """(node, total, available) from nodeN/meminfo, available computed as vLLM computes it."""
    out = []
    for path in glob.glob(os.path.join(node_dir, "node[0-9]*", "meminfo")):
        kb = {k: int(v) * 1024 for k, v in re.findall(r"^Node \d+ ([\w()]+):\s+(\d+) kB", read_text(path) or "", re.M)}
        if kb.get("MemTotal"):
            avail = sum(kb.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
            out.append((int(os.path.basename(os.path.dirname(path))[4:]), kb["MemTotal"], avail))
    return tuple(sorted(out)) or None


def cgroup_memory(root: str) -> tuple[int | None, int | None]:
    """(limit, usage) in bytes from the files vLLM 0.32 reads (cpu_resource_utils.py); None = none."""
    cg = os.path.join(root, "sys/fs/cgroup")
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        limit = to_int((read_text(os.path.join(cg, limit_file)) or "").strip())
        if limit is not None:
            if limit >= 1 << 62:  # v1's "unlimited" sentinel
                return None, None
            return limit, to_int((read_text(os.path.join(cg, usage_file)) or "").strip())
    return None, None


def numa_nodes(node_dir: str) -> list[tuple[int, str]]:
    nodes = []
    for path in glob.glob(os.path.join(node_dir, "node[0-9]*", "cpulist")):
        text = (read_text(path) or "").strip()
        if text:  # memory-only nodes (CXL, HBM) have an empty cpulist
            nodes.append((int(os.path.basename(os.path.dirname(path))[4:]), format_cpulist(parse_cpulist(text))))
    return sorted(nodes)


def topology(cpu_dir: str) -> tuple[int | None, int | None]:
    """(physical cores, sockets) from sysfs: one core per distinct thread-sibling set."""
    cores, packages = set(), set()
    for topo in glob.glob(os.path.join(cpu_dir, "cpu[0-9]*", "topology")):
        sib = read_text(os.path.join(topo, "thread_siblings_list")) or read_text(os.path.join(topo, "core_cpus_list"))
        pkg = (read_text(os.path.join(topo, "physical_package_id")) or "").strip()
        if sib:
            cores.add((pkg, sib.strip()))
            packages.add(pkg)
    return (len(cores) or None), (len(packages) or None)


def _own_cgroups(root: str) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; the v2 entry is keyed ''."""
    out = {}
    for line in (read_text(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(",") if parts[1] else [""]:
                out[ctrl] = parts[2]
    return out


def _up(base: str, rel: str):
    """base/rel, then each parent up to base: a limit set on a parent cgroup applies too."""
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts), -1, -1):
        yield os.path.join(base, *parts[:i])


def cgroup_cpu(root: str) -> tuple[str | None, float | None, str | None]:
    cg, own = os.path.join(root, "sys/fs/cgroup"), _own_cgroups(root)
    quotas, cpuset = [], None
    if os.path.exists(os.path.join(cg, "cgroup.controllers")):  # unified hierarchy (v2)
        for d in _up(cg, own.get("", "/")):
            fields = (read_text(os.path.join(d, "cpu.max")) or "").split()
            if len(fields) == 2 and fields[0] != "max":  # "<quota_us> <period_us>"
                quotas.append(int(fields[0]) / int(fields[1]))
            cpuset = cpuset or (read_text(os.path.join(d, "cpuset.cpus.effective")) or "").strip() or None
        version = "v2"
    else:
        cpu_dir = next((d for d in ("cpu", "cpu,cpuacct") if os.path.isdir(os.path.join(cg, d))), None)
        if cpu_dir is None and not os.path.isdir(os.path.join(cg, "cpuset")):
            return None, None, None
        for d in _up(os.path.join(cg, cpu_dir or "cpu"), own.get("cpu", "/")):
            q = (read_text(os.path.join(d, "cpu.cfs_quota_us")) or "").strip()
            p = (read_text(os.path.join(d, "cpu.cfs_period_us")) or "").strip()
            if q.lstrip("-").isdigit() and int(q) > 0 and p.isdigit():  # -1 = unlimited
                quotas.append(int(q) / int(p))
        for d in _up(os.path.join(cg, "cpuset"), own.get("cpuset", "/")):
            text = read_text(os.path.join(d, "cpuset.effective_cpus")) or read_text(os.path.join(d, "cpuset.cpus"))
            if text and text.strip():
                cpuset = text.strip()
                break
        version = "v1"
    cpuset = format_cpulist(parse_cpulist(cpuset)) if cpuset else None
    return version, (min(quotas) if quotas else None), cpuset


def tcmalloc(root: str) -> str | None:
    names = ("libtcmalloc_minimal.so", "libtcmalloc.so")  # vLLM's CPU docs preload the minimal one
    out = ""
    if root == "/":  # the loader cache knows non-standard prefixes; a recorded root has none
        try:
            out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    hits = [
        line.split("=>", 1)[1].strip()
        for name in names
        for line in out.splitlines()
        if line.strip().startswith(name) and "=>" in line
    ]
    hits += [
        h
        for name in names
        for d in ("usr/lib/*-linux-gnu", "usr/lib64", "usr/lib", "usr/local/lib", "lib/*-linux-gnu")
        for h in sorted(glob.glob(os.path.join(root, d, name + "*")))
    ]
    return hits[0] if hits else None
