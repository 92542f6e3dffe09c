"""Machine facts for scripts/build_vllm_cpu.sh, as shell assignments.

Run: python3 build/machine_facts.py [DUMP_DIR]
  no argument: this host (/proc, /sys, cgroup limits, CPU affinity)
  DUMP_DIR:    a recorded machine (tests/fixtures/machines/NAME): DUMP_DIR/root/ (a miniature
               filesystem) if present, else cpuinfo / lscpu.txt / lscpu.json / meminfo files.
Prints FACT_*=value lines, each value quoted for `eval`. The decoding is arm_int4.hardware's (the
one the fixtures test), imported from this checkout: stdlib only, so the build host needs no
arm-int4 installation. Memory is in MiB; an empty value means "the source does not say".
"""

import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from arm_int4 import hardware  # noqa: E402  (path set just above)
from arm_int4.errors import ArmInt4Error  # noqa: E402

__all__ = ["facts", "main"]

_MiB = 1024 * 1024
_UNLIMITED = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_memory_limit(root: str):
    """Bytes the cgroup lets us use (the tightest limit from our cgroup up), or None."""
    own = {}
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(",") if parts[1] else [""]:
                own[ctrl] = parts[2]
    cg = os.path.join(root, "sys/fs/cgroup")
    if os.path.exists(os.path.join(cg, "cgroup.controllers")):  # v2
        base, rel, name = cg, own.get("", "/"), "memory.max"
    else:  # v1
        base, rel, name = os.path.join(cg, "memory"), own.get("memory", "/"), "memory.limit_in_bytes"
    parts = [p for p in rel.split("/") if p]
    limits = []
    for i in range(len(parts), -1, -1):
        text = _read(os.path.join(base, *parts[:i], name))
        if text and text.isdigit() and int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits) if limits else None


def facts(dump: str | None = None) -> dict:
    if dump is None:
        machine, root, source = hardware.detect("/", probe_runtime=False), "/", "this host"
    elif os.path.isdir(os.path.join(dump, "root")):
        root = os.path.join(dump, "root")
        machine, source = hardware.detect(root, probe_runtime=False), f"machine dump {dump}"
    else:
        machine, root, source = hardware.from_dump(dump), None, f"machine dump {dump}"
    limit = cgroup_memory_limit(root) if root else None
    if root:
        cpus_from = "sysfs (CPU affinity and cgroup quota applied)" if dump is None else "sysfs in the dump"
    elif "lscpu.txt" in machine.sources or "lscpu.json" in machine.sources:
        cpus_from = "lscpu CPU(s)"
    else:
        cpus_from = "processor blocks in cpuinfo (a partial dump undercounts)"

    def mib(n):
        return "" if n is None else str(n // _MiB)

    return {
        "FACT_SOURCE": source,
        "FACT_ARCH": machine.arch,
        "FACT_CPU_NAME": machine.cpu_name or "",
        "FACT_PLATFORMS": " / ".join(machine.likely_platforms),
        "FACT_FEATURES": " ".join(machine.features),
        "FACT_CPUS": str(machine.usable_cpus() or ""),
        "FACT_CPUS_FROM": cpus_from,
        "FACT_MEM_TOTAL_MIB": mib(machine.mem_total_bytes),
        "FACT_MEM_AVAIL_MIB": mib(machine.mem_available_bytes),
        "FACT_MEM_LIMIT_MIB": mib(limit),
        "FACT_NOTES": "; ".join(machine.notes),
    }


def main(argv) -> int:
    if len(argv) > 1:
        print("usage: machine_facts.py [DUMP_DIR]", file=sys.stderr)
        return 2
    try:
        result = facts(argv[0] if argv else None)
    except ArmInt4Error as exc:
        print(f"machine_facts.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for key, value in result.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
