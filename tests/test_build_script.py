"""scripts/build_vllm_cpu.sh: its decisions (build/lib.sh functions called through bash), its
helpers (build/*.py), its dry-run plan for every recorded Arm machine, and shellcheck.

Fast: nothing here downloads or compiles (a local HTTP server on 127.0.0.1 stands in for the
package index). The real build is recorded in docs/build.md, not run here.
"""

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build_vllm_cpu.sh"
LIB = REPO / "build" / "lib.sh"
MACHINES = REPO / "tests" / "fixtures" / "machines"
sys.path.insert(0, str(REPO / "build"))

import check_pins  # noqa: E402
import fetch_sdist  # noqa: E402
import machine_facts  # noqa: E402


def lib(code: str, env=None) -> subprocess.CompletedProcess:
    """Run bash code with build/lib.sh sourced."""
    return subprocess.run(
        ["bash", "-c", f'set -eu; source "{LIB}"; {code}'],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def out(code: str, env=None) -> str:
    r = lib(code, env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def run_script(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def fake_tool(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    p = bindir / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(0o755)


def fake_gcc(bindir: Path, version: str, numa: bool = True, brand: str = "gcc (Debian 12.2.0-14) "):
    """gcc/g++ that report VERSION and find numa.h (or not) when asked to preprocess."""
    for name in ("gcc", "g++"):
        fake_tool(
            bindir,
            name,
            f"""
case " $* " in
  *" --version "*) echo "{brand}{version}" ;;
  *" -dumpfullversion "*|*" -dumpversion "*) echo "{version}" ;;
  *" -E "*) cat >/dev/null; exit {0 if numa else 1} ;;
esac
""",
        )


# ------------------------------------------------------------------ shellcheck


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    files = [
        SCRIPT,
        LIB,
        REPO / "build" / "shims" / "ninja",
        REPO / "build" / "vllm-0.32.0.conf",
        REPO / "scripts" / "setup.sh",
        REPO / "scripts" / "arm_emulation.sh",
        REPO / "scripts" / "fresh_box.sh",
        REPO / ".ci" / "run",
    ]
    r = subprocess.run(["shellcheck", "-x", *map(str, files)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ version -> tag, versions


@pytest.mark.parametrize(
    "version, tag",
    [
        ("0.32.0", "v0.32.0"),
        ("v0.32.0", "v0.32.0"),
        ("0.8.5.post1", "v0.8.5.post1"),
        ("0.33.0rc1", "v0.33.0rc1"),
    ],
)
def test_vllm_tag_for(version, tag):
    assert out(f"vllm_tag_for {version}") == tag


@pytest.mark.parametrize("bad", ["latest", "0.32", "0.32.0; rm -rf /", "main", ""])
def test_vllm_tag_for_refuses_non_versions(bad):
    assert lib(f"vllm_tag_for '{bad}'").returncode != 0


@pytest.mark.parametrize(
    "a, b, ge",
    [
        ("12.2.0", "12", True),
        ("12.2.0", "12.3", False),
        ("12.3.0", "12.3", True),
        ("13.1.0", "12.3", True),
        ("11.4.0", "12", False),
        ("3.11", "3.11", True),
    ],
)
def test_version_ge(a, b, ge):
    assert (lib(f"version_ge {a} {b}").returncode == 0) is ge


# ------------------------------------------------------------------ MAX_JOBS


@pytest.mark.parametrize(
    "cpus, avail, limit, jobs, why",
    [
        (64, "", "", 32, "assumed 2 GiB per CPU"),  # dump without memory: 2 GiB/CPU, 4 GiB/job
        (160, "", "", 80, "assumed 2 GiB per CPU"),
        (2, 17000, "", 2, "one per CPU"),  # this box: CPU-bound
        (64, 126976, "", 31, "memory-bound: 124 GiB available"),  # a c6g.16xlarge with 124 GiB free
        (64, 126976, 16384, 4, "cgroup memory limit 16 GiB"),  # a container capped at 16 GiB
        (8, 3000, "", 1, "memory-bound"),  # never below one job
    ],
)
def test_plan_jobs(cpus, avail, limit, jobs, why):
    res = out(f'plan_jobs {cpus} "{avail}" "{limit}"; echo "$PLAN_JOBS|$PLAN_JOBS_WHY|$PLAN_JOBS_WARN"')
    got_jobs, got_why, warn = res.split("|")
    assert int(got_jobs) == jobs
    assert why in got_why
    assert warn == ""


def test_plan_jobs_keeps_requested_but_warns_when_memory_is_short():
    jobs, why, warn = out('plan_jobs 64 16384 "" 32; echo "$PLAN_JOBS|$PLAN_JOBS_WHY|$PLAN_JOBS_WARN"').split("|")
    assert (jobs, why) == ("32", "--jobs 32")
    assert "exceeds what memory allows (4" in warn
    assert out('plan_jobs 64 16384 "" 2; echo "$PLAN_JOBS_WARN"') == ""


# ------------------------------------------------------------------ Arm ISA flags

ISA = (
    'plan_isa {arch} "{features}"; '
    'echo "$PLAN_BF16|$PLAN_I8MM|$PLAN_MARCH|$PLAN_ISA_SET|$PLAN_ISA_UNSET|$PLAN_ISA_BLOCKER"'
)


def isa(arch, features):
    return out(ISA.format(arch=arch, features=features)).split("|")


def test_isa_graviton2_altra_no_bf16():
    bf16, i8mm, march, set_, unset, blocker = isa("aarch64", "asimd asimddp")
    assert (bf16, i8mm, set_, blocker) == ("0", "0", "", "")
    assert march == "armv8.2-a+dotprod+fp16"
    # a VLLM_CPU_ARM_BF16=1 left in the environment must not reach CMake
    assert set(unset.split()) == {"VLLM_CPU_X86", "VLLM_CPU_ARM_BF16", "VLLM_CPU_ARM_I8MM"}


def test_isa_graviton4_grace_bf16_and_i8mm():
    bf16, i8mm, march, set_, unset, _ = isa("aarch64", "asimd asimddp i8mm bf16 sve sve2")
    assert (bf16, i8mm) == ("1", "1")
    assert march == "armv8.2-a+bf16+dotprod+fp16+i8mm"  # as cmake/cpu_extension.cmake composes it
    assert set_.split() == ["VLLM_CPU_ARM_BF16=1", "VLLM_CPU_ARM_I8MM=1"]
    assert unset.split() == ["VLLM_CPU_X86"]


def test_isa_old_kernel_hiding_bf16_follows_the_kernel():
    # graviton3-cpuinfo-block: Neoverse V1 whose kernel does not report bf16/i8mm
    bf16, i8mm, march, *_ = isa("aarch64", "asimd asimddp sve")
    assert (bf16, i8mm, march) == ("0", "0", "armv8.2-a+dotprod+fp16")


def test_isa_without_dotprod_is_refused():
    *_, blocker = isa("aarch64", "asimd")
    assert "asimddp" in blocker and "Cortex-A72" in blocker


def test_isa_x86_sets_nothing_arm():
    bf16, i8mm, _, set_, unset, blocker = isa("x86_64", "avx2 avx512f avx512_bf16")
    assert (bf16, i8mm, set_, blocker) == ("0", "0", "", "")
    assert "VLLM_CPU_ARM_BF16" in unset


# ------------------------------------------------------------------ tool checks


def check(tmp_path, arch, version, numa=True, brand="gcc (Debian 12.2.0-14) ", need_git=0):
    fake_gcc(tmp_path / "bin", version, numa=numa, brand=brand)
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "CC": "gcc",
        "CXX": "g++",
        "OS_RELEASE": str(tmp_path / "os-release"),
    }
    (tmp_path / "os-release").write_text("ID=ubuntu\nID_LIKE=debian\n")
    r = out(
        f'PLAN_VERSION=0.32.0; check_tools {arch} {need_git}; printf "OK %s\\n" "${{CHECK_OK[@]}}"; '
        f'printf "FAIL %s\\n" "${{CHECK_FAIL[@]}}"; printf "NOTE %s\\n" "${{CHECK_NOTE[@]}}"',
        env,
    )
    return [ln[5:] for ln in r.splitlines() if ln.startswith("FAIL ") and ln[5:]], r


@pytest.mark.parametrize(
    "arch, version, ok",
    [
        ("aarch64", "12.2.0", True),
        ("aarch64", "11.4.0", False),
        ("aarch64", "13.3.0", True),
        ("x86_64", "12.2.0", False),
        ("x86_64", "12.3.0", True),
    ],
)
def test_check_tools_gcc_floor(tmp_path, arch, version, ok):
    fails, _ = check(tmp_path, arch, version)
    gcc_fails = [f for f in fails if f.startswith(("gcc:", "g++:"))]
    assert (gcc_fails == []) is ok, fails
    if not ok:
        assert "fix: apt-get install" in gcc_fails[0]


def test_check_tools_refuses_clang(tmp_path):
    fails, _ = check(tmp_path, "aarch64", "17.0.6", brand="Ubuntu clang version ")
    assert any("not GCC" in f for f in fails)


def test_check_tools_missing_numa_says_how_to_install(tmp_path):
    fails, _ = check(tmp_path, "aarch64", "12.2.0", numa=False)
    assert any(f.startswith("libnuma:") and "apt-get install libnuma-dev" in f for f in fails)


def test_check_tools_rhel_hints(tmp_path):
    fake_gcc(tmp_path / "bin", "11.4.1", numa=False)
    (tmp_path / "os-release").write_text('ID="amzn"\nID_LIKE="fedora"\n')
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "OS_RELEASE": str(tmp_path / "os-release")}
    r = out('PLAN_VERSION=0.32.0; check_tools aarch64 0; printf "%s\\n" "${CHECK_FAIL[@]}"', env)
    assert "dnf install numactl-devel" in r and "gcc-toolset-13" in r


def test_check_tools_python_out_of_range(tmp_path):
    fake_tool(tmp_path / "bin", "oldpy", "echo 3.9\n")
    fake_gcc(tmp_path / "bin", "12.2.0")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PYTHON": "oldpy"}
    r = out('PLAN_VERSION=0.32.0; check_tools aarch64 0; printf "%s\\n" "${CHECK_FAIL[@]}"', env)
    assert "Python 3.9" in r and "3.11-3.14" in r


# ------------------------------------------------------------------ FetchContent pins and offline deps

# Verbatim lines of vLLM 0.32.0 cmake/cpu_extension.cmake (the FetchContent calls, trimmed between).
CPU_EXTENSION_EXCERPT = """
            FetchContent_Populate(arm_compute
                SUBBUILD_DIR "${FETCHCONTENT_BASE_DIR}/arm_compute-subbuild"
                SOURCE_DIR   "${FETCHCONTENT_BASE_DIR}/arm_compute-src"
                GIT_REPOSITORY https://github.com/ARM-software/ComputeLibrary.git
                GIT_TAG        v52.6.0
                GIT_SHALLOW    TRUE
                GIT_PROGRESS   TRUE
            )
    set(FETCHCONTENT_SOURCE_DIR_ONEDNN "$ENV{FETCHCONTENT_SOURCE_DIR_ONEDNN}" CACHE PATH "Path to a local oneDNN source directory.")
        if(ASIMD_FOUND AND NOT APPLE_SILICON_FOUND)
            FetchContent_Declare(
                oneDNN
                GIT_REPOSITORY https://github.com/oneapi-src/oneDNN.git
                GIT_TAG        9c5be1cc59e368aebf0909e6cf20f981ea61462a
                GIT_PROGRESS   TRUE
                GIT_SHALLOW    FALSE
            )
        else()
            FetchContent_Declare(
                oneDNN
                GIT_REPOSITORY https://github.com/oneapi-src/oneDNN.git
                GIT_TAG        v3.13
                GIT_PROGRESS   TRUE
                GIT_SHALLOW    TRUE
            )
        endif()
"""


def test_read_fetch_pins(tmp_path):
    f = tmp_path / "cpu_extension.cmake"
    f.write_text(CPU_EXTENSION_EXCERPT)
    assert (
        out(f'read_fetch_pins {f}; echo "$PIN_ONEDNN_AARCH64 $PIN_ONEDNN_X86 $PIN_ACL"')
        == "9c5be1cc59e368aebf0909e6cf20f981ea61462a v3.13 v52.6.0"
    )


def test_conf_pins_match_the_excerpt(tmp_path):
    f = tmp_path / "cpu_extension.cmake"
    f.write_text(CPU_EXTENSION_EXCERPT)
    conf = out('load_version_conf 0.32.0; echo "$ONEDNN_REF_AARCH64 $ONEDNN_REF_X86 $ACL_REF"')
    pins = out(f'read_fetch_pins {f}; echo "$PIN_ONEDNN_AARCH64 $PIN_ONEDNN_X86 $PIN_ACL"')
    assert conf == pins


@pytest.mark.parametrize(
    "arch, must, must_not",
    [
        ("aarch64", ["DIR/oneDNN", "9c5be1cc", "DIR/ComputeLibrary", "v52.6.0"], []),
        ("x86_64", ["DIR/oneDNN", "v3.13"], ["ComputeLibrary"]),
    ],
)
def test_offline_deps_line_is_one_line_naming_the_option(arch, must, must_not):
    line = out(
        f"load_version_conf 0.32.0; PIN_ONEDNN_AARCH64=$ONEDNN_REF_AARCH64 PIN_ONEDNN_X86=$ONEDNN_REF_X86 "
        f"PIN_ACL=$ACL_REF; offline_deps_line {arch}"
    )
    assert "\n" not in line and "--offline-deps DIR" in line
    for m in must:
        assert m in line
    for m in must_not:
        assert m not in line


# ------------------------------------------------------------------ build log diagnosis

LOGS = {
    "fetch": (
        "-- Downloading oneDNN from GitHub\n[1/9] Performing download step (git clone) for 'onednn-populate'\n"
        "Cloning into 'onednn-src'...\nfatal: unable to access 'https://github.com/oneapi-src/oneDNN.git/': "
        "Could not resolve host: github.com\nCMake Error at onednn-subbuild/onednn-populate-prefix/tmp/"
        "onednn-populate-gitclone.cmake:31 (message):\n  Failed to clone repository: "
        "'https://github.com/oneapi-src/oneDNN.git'\n",
        "--offline-deps DIR",
    ),
    "gcc": (
        "-- The CXX compiler identification is GNU 12.2.0\nCMake Error at cmake/cpu_extension.cmake:129 "
        "(message):\n  X86 backend requires gcc/g++ >= 12.3\n",
        "X86 backend requires gcc/g++ >= 12.3 (found 12.2.0)",
    ),
    "oom": (
        "[311/420] Building CXX object ...\ng++: fatal error: Killed signal terminated program cc1plus\n",
        "re-run with --jobs 8 (this run used 16)",
    ),
    "other": (
        "blah\nCMake Error at CMakeLists.txt:10 (find_package):\n  Could not find Torch\n",
        "first error: CMake Error at CMakeLists.txt:10",
    ),
}


@pytest.mark.parametrize("kind", sorted(LOGS))
def test_diagnose_log(tmp_path, kind):
    text, expected = LOGS[kind]
    log = tmp_path / "wheel.log"
    log.write_text("".join(f"1700000000 {ln}\n" for ln in text.splitlines()))
    line = out(
        f"load_version_conf 0.32.0; PIN_ONEDNN_AARCH64=$ONEDNN_REF_AARCH64 PIN_ONEDNN_X86=$ONEDNN_REF_X86 "
        f"PIN_ACL=$ACL_REF; diagnose_log {log} x86_64 16"
    )
    assert expected in line and "\n" not in line


# ------------------------------------------------------------------ ninja job cap


@pytest.mark.parametrize(
    "args, capped",
    [
        ("--build build -- -j160", "--build build -- -j8"),
        ("-j 4 all", "-j 4 all"),
        ("-j=64", "-j8"),
        ("-j0", "-j8"),  # ninja -j0 = unlimited
        ("-C build install", "-C build install"),
    ],
)
def test_cap_jobs_args(args, capped):
    assert out(f"cap_jobs_args 8 {args}").split("\n") == capped.split()


def test_ninja_shim_caps_jobs_and_finds_the_real_ninja(tmp_path):
    fake_tool(tmp_path / "real", "ninja", 'echo "real ninja: $*"\n')
    env = {
        "PATH": f"{REPO / 'build' / 'shims'}:{tmp_path / 'real'}:{os.environ['PATH']}",
        "ARM_INT4_NINJA_MAX_JOBS": "4",
    }
    r = subprocess.run(["ninja", "-C", "build", "-j160"], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "real ninja: -C build -j4"
    env.pop("ARM_INT4_NINJA_MAX_JOBS")
    r = subprocess.run(["ninja", "-j160"], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "real ninja: -j160"


# ------------------------------------------------------------------ pins vs the source's requirements

# Verbatim: vLLM 0.32.0 requirements/build/cpu.txt and the torch lines of requirements/cpu.txt.
BUILD_CPU_TXT = """cmake>=3.26.1
ninja
packaging>=24.2
setuptools==78.1.1 # this version can reuse CMake build dir; >=78.1.1 for GHSA-5rjg-fvgr-3xxf
setuptools-scm>=8
setuptools-rust>=1.9.0
torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x" or platform_machine == "aarch64"
torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le"  or platform_machine == "riscv64"
wheel
jinja2>=3.1.6
regex
"""
CPU_TXT = """# Dependencies for CPUs
torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x" or platform_machine == "aarch64"
torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le" or platform_machine == "riscv64"
"""
PINS = REPO / "build" / "requirements-vllm-0.32.0.txt"


def fake_source(tmp_path, build_txt=BUILD_CPU_TXT, cpu_txt=CPU_TXT, old_layout=False):
    src = tmp_path / "vllm"
    (src / "requirements" / "build").mkdir(parents=True)
    (src / "requirements" / ("cpu-build.txt" if old_layout else "build/cpu.txt")).write_text(build_txt)
    (src / "requirements" / "cpu.txt").write_text(cpu_txt)
    return src


@pytest.mark.parametrize("arch", ["aarch64", "x86_64"])
def test_our_pins_satisfy_vllm_0_32(tmp_path, arch):
    assert check_pins.check(str(PINS), str(fake_source(tmp_path)), arch) == []


def test_pins_catch_a_build_torch_older_than_the_runtime_one(tmp_path):
    # the tracker's complaint: cpu-build.txt pinned an older torch than cpu.txt runs with
    src = fake_source(tmp_path, build_txt="torch==2.6.0+cpu\ncmake>=3.26.1\n", old_layout=True)
    problems = check_pins.check(str(PINS), str(src), "aarch64")
    assert any("cpu-build.txt asks for torch==2.6.0+cpu" in p for p in problems)


def test_pins_catch_a_new_requirement(tmp_path):
    src = fake_source(tmp_path, build_txt=BUILD_CPU_TXT + "nanobind>=2\n")
    assert any("no pin for nanobind" in p for p in check_pins.check(str(PINS), str(src), "aarch64"))


def test_pins_file_is_all_exact_pins(tmp_path):
    assert str(check_pins.read_pins(str(PINS))["torch"]) == "2.13.0+cpu"  # raises on a non-== line
    loose = tmp_path / "loose.txt"
    loose.write_text("cmake>=3.26\n")
    with pytest.raises(ValueError, match="not a name==version pin"):
        check_pins.read_pins(str(loose))


# ------------------------------------------------------------------ sdist fetch from an index


@pytest.fixture()
def local_index(tmp_path):
    data = b"not really a tarball"
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "simple" / "vllm").mkdir(parents=True)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "vllm-0.32.0.tar.gz").write_bytes(data)
    (tmp_path / "simple" / "vllm" / "index.html").write_text(
        f'<html><body><a href="../../files/vllm-0.32.0.tar.gz#sha256={digest}">vllm-0.32.0.tar.gz</a>'
        f'<a href="../../files/vllm-0.31.0.tar.gz">vllm-0.31.0.tar.gz</a></body></html>'
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", digest
    server.shutdown()


def test_fetch_sdist_from_html_index(tmp_path, local_index):
    index, digest = local_index
    path = fetch_sdist.fetch("vllm", "0.32.0", str(tmp_path / "dl"), sha256=digest, index=index)
    assert Path(path).read_bytes() == b"not really a tarball"


def test_fetch_sdist_refuses_a_hash_mismatch(tmp_path, local_index):
    index, _ = local_index
    with pytest.raises(ValueError, match="our pin says"):
        fetch_sdist.fetch("vllm", "0.32.0", str(tmp_path / "dl"), sha256="0" * 64, index=index)
    with pytest.raises(LookupError, match=r"no sdist for vllm 0\.99\.0"):
        fetch_sdist.fetch("vllm", "0.99.0", str(tmp_path / "dl"), index=index)


# ------------------------------------------------------------------ machine facts and the dry-run plan

ARM_FIXTURES = sorted(
    d.name for d in MACHINES.iterdir() if json.loads((d / "expected.json").read_text())["arch"] == "aarch64"
)


def test_machine_facts_read_memory_from_a_root_dump():
    f = machine_facts.facts(str(MACHINES / "x86-amd-epyc-this-box"))
    assert f["FACT_ARCH"] == "x86_64" and f["FACT_CPUS"] == "2"
    assert int(f["FACT_MEM_TOTAL_MIB"]) > 20000 and f["FACT_MEM_AVAIL_MIB"]


def plan_of(fixture, *extra, env=None):
    r = run_script("--dry-run", "--machine-dump", MACHINES / fixture, *extra, env=env)
    assert r.returncode in (0, 1), r.stderr  # 1 = a tool on *this* host fails a check; the plan is complete
    assert r.stdout.rstrip().splitlines()[-1].startswith("result:"), r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("fixture", ARM_FIXTURES)
def test_dry_run_plan_follows_each_arm_fixture(fixture):
    expected = json.loads((MACHINES / fixture / "expected.json").read_text())
    plan = plan_of(fixture)
    has_bf16 = "bf16" in expected["features_present"]
    has_i8mm = "i8mm" in expected["features_present"]
    assert f"bf16={int(has_bf16)} i8mm={int(has_i8mm)}" in plan
    march = re.search(r"-march=(\S+)", plan).group(1)
    assert ("+bf16" in march) is has_bf16 and ("+i8mm" in march) is has_i8mm
    assert ("VLLM_CPU_ARM_BF16=1" in plan) is has_bf16
    # no fixture records memory: 2 GiB per CPU assumed, 4 GiB per job -> half the CPUs
    cpus = expected.get("logical_cpus", 1)  # cpuinfo-block fixtures hold one processor block
    jobs = max(1, cpus // 2)
    assert f"MAX_JOBS={jobs}  (" in plan and "memory not in the source: assumed 2 GiB per CPU" in plan
    assert f"ARM_INT4_NINJA_MAX_JOBS={jobs}" in plan
    assert "ComputeLibrary" in plan and "9c5be1cc59e368aebf0909e6cf20f981ea61462a" in plan
    for stage in ("1 check", "2 source", "3 venv", "4 wheel", "5 test"):
        assert stage in plan


def test_dry_run_on_this_machine_prints_the_full_plan():
    r = run_script("--dry-run")
    assert r.returncode in (0, 1), r.stderr
    for part in (
        "machine:     this host",
        "MAX_JOBS=",
        "tools (this host):",
        "4 wheel",
        "VLLM_TARGET_DEVICE=cpu",
        "result:",
    ):
        assert part in r.stdout


def test_dry_run_unsets_a_leaked_bf16_switch_on_graviton2():
    plan = plan_of("graviton2", env={"VLLM_CPU_ARM_BF16": "1"})
    assert "ignoring VLLM_CPU_ARM_BF16=1 from the environment" in plan
    assert "VLLM_CPU_ARM_BF16=1" not in plan.split("4 wheel")[1].split("\n")[0]


def test_dry_run_jobs_override_and_offline_deps(tmp_path):
    (tmp_path / "oneDNN" / "include").mkdir(parents=True)
    plan = plan_of("graviton4", "--jobs", "48", "--offline-deps", tmp_path)
    assert "MAX_JOBS=48  (--jobs 48)" in plan and "exceeds what memory allows" in plan
    assert (
        f"FETCHCONTENT_SOURCE_DIR_ONEDNN={tmp_path}/oneDNN" in plan
        and f"ACL_ROOT_DIR={tmp_path}/ComputeLibrary" in plan
    )
    assert f"FAIL  offline deps: {tmp_path}/ComputeLibrary is not an Arm Compute Library source tree" in plan


@pytest.mark.parametrize(
    "args, message",
    [
        (["--machine-dump", MACHINES / "graviton2"], "only plans (--dry-run)"),
        (["--jobs", "0", "--dry-run"], "--jobs must be a positive integer"),
        (["--vllm-version", "latest", "--dry-run"], "not a vLLM release number"),
        (["--vllm-version", "0.32.0", "--source", "/tmp", "--dry-run"], "exclude each other"),
        (["--from", "svn", "--dry-run"], "--from must be sdist or git"),
        (["--frobnicate"], "unknown argument"),
        (["--test-wheel", "/nonexistent.whl"], "is not a file"),
        (["--test-wheel", __file__, "--no-test"], "exclude each other"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    r = run_script(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_help_has_examples():
    r = run_script("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--offline-deps DIR" in r.stdout


def test_failed_check_stops_with_one_line_and_a_record(tmp_path):
    fake_gcc(tmp_path / "bin", "11.4.0")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CC": "gcc", "CXX": "g++"}
    r = run_script("--out", tmp_path / "dist", "--workdir", tmp_path / "work", env=env)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "GCC 11.4.0 is older than" in errors[0]
    record = json.loads((tmp_path / "dist" / "vllm-0.32.0-build-record.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "check"
    assert record["durations_s"][0]["stage"] == "check"
    assert "MAX_JOBS=" in " ".join(record["flags"]["env"])
    assert not (tmp_path / "work" / "src").exists()  # stopped before downloading anything


def test_a_failing_command_inside_a_stage_stops_it(tmp_path):
    # stage functions run with `set -e` in force: pip refusing the wheel must fail stage 5 at once
    bogus = tmp_path / "bogus.whl"
    bogus.write_text("not a wheel")
    r = run_script("--test-wheel", bogus, "--out", tmp_path / "dist", "--workdir", tmp_path / "work")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "the smoke test failed" not in errors[0], r.stderr
    record = json.loads((tmp_path / "dist" / "bogus-test-record.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "test"
    assert "smoke" not in (tmp_path / "work" / "logs" / "test.log").read_text().lower()
