"""This machine's memory bandwidth: a STREAM-like triad, measured once and cached per machine.

bench puts achieved GB/s next to decode tok/s and divides by this figure. The triad is
`a[:] = b + s * c` over three float32 arrays much larger than any last-level cache (256 MiB each),
done by torch in one fused pass (torch.add(b, c, alpha=s, out=a)), so it moves what STREAM counts:
read b, read c, write a = 3 x 256 MiB per pass (write-allocate traffic not counted, as in STREAM).
It runs with one thread and with all usable CPUs, one untimed pass each; the figure is the best
pass of either (decode reads weights with however many threads the plan gives it).

The result is cached as JSON in {cache_home}/bandwidth-{machine key}.json; the key names the CPU,
logical CPUs, memory size and host, so a different machine (or a resized VM) measures again.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import time
from typing import Callable, Optional

from .hardware import Machine
from .models import cache_home

__all__ = ["ARRAY_MIB", "PASSES", "machine_key", "measure_triad", "machine_bandwidth", "cache_path"]

ARRAY_MIB = 256  # per array; 3 arrays = 768 MiB resident while measuring
PASSES = 10


def machine_key(machine: Machine) -> str:
    """`x86_64-amd-epyc-2cpu-1a2b3c4d`: readable prefix + hash of what changes the bandwidth."""
    name = re.sub(r"[^a-z0-9]+", "-", (machine.cpu_name or "unknown").lower()).strip("-")[:40]
    facts = [
        platform.node(),
        machine.arch,
        machine.cpu_name,
        machine.logical_cpus,
        machine.mem_total_bytes,
        machine.numa_nodes,
    ]
    digest = hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:8]
    return f"{machine.arch}-{name}-{machine.logical_cpus}cpu-{digest}"


def cache_path(machine: Machine) -> str:
    return os.path.join(cache_home(), f"bandwidth-{machine_key(machine)}.json")


def measure_triad(array_mib: int = ARRAY_MIB, passes: int = PASSES, threads: Optional[int] = None) -> dict:
    """Run the triad now with 1 thread and with `threads` (default: torch's count), keep the best:
    the most this machine moves. (One thread can beat all of them on a shared or throttled VM.)
    GB/s = 1e9 bytes per second."""
    import torch

    before = torch.get_num_threads()
    n = array_mib * 2**20 // 4  # float32 elements per array
    a = torch.empty(n, dtype=torch.float32)
    b = torch.full((n,), 1.0, dtype=torch.float32)
    c = torch.full((n,), 2.0, dtype=torch.float32)
    moved = 3 * n * 4  # bytes per pass: read b, read c, write a
    samples = {}
    try:
        for t in sorted({1, threads or before}):
            torch.set_num_threads(t)
            torch.add(b, c, alpha=3.0, out=a)  # untimed: faults the pages of `a` in, wakes the threads
            seconds = []
            for _ in range(passes):
                t0 = time.perf_counter()
                torch.add(b, c, alpha=3.0, out=a)
                seconds.append(time.perf_counter() - t0)
            samples[t] = [moved / s / 1e9 for s in seconds]
    finally:
        torch.set_num_threads(before)
    if float(a[n // 2]) != 7.0:  # 1 + 3 * 2: the passes really ran
        raise RuntimeError("triad produced a wrong value")
    best = max(samples, key=lambda t: max(samples[t]))
    return {
        "triad_gbs": max(samples[best]),
        "threads": best,
        "samples_gbs": {str(t): s for t, s in samples.items()},
        "array_mib": array_mib,
        "passes": passes,
        "dtype": "float32",
        "torch_version": torch.__version__,
    }


def machine_bandwidth(
    machine: Machine, *, refresh: bool = False, progress: Optional[Callable[[str], None]] = None
) -> dict:
    """The cached triad result for this machine, measuring it first when absent (or `refresh`).

    Returns the JSON dict: triad_gbs (best pass), samples_gbs, key, measured_at, path, ..."""
    path = cache_path(machine)
    if not refresh:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data.get("triad_gbs"), (int, float)) and data["triad_gbs"] > 0:
                return {**data, "path": path, "cached": True}
        except (OSError, ValueError):
            pass
    if progress:
        progress(
            f"measuring memory bandwidth once for this machine (triad, 3 x {ARRAY_MIB} MiB, best of {PASSES} "
            "passes at 1 thread and at all usable CPUs)"
        )
    data = {
        "key": machine_key(machine),
        "cpu": machine.cpu_name,
        **measure_triad(threads=machine.usable_cpus()),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    if progress:
        progress(f"memory bandwidth: {data['triad_gbs']:.1f} GB/s (cached in {path})")
    return {**data, "path": path, "cached": False}
