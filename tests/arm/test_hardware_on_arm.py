"""(2) arm_int4.hardware running on (emulated) aarch64 Python: the same decoding of every recorded
machine as on the x86 host, and the live emulated machine seen as an Arm Neoverse with the
features that pick KleidiAI's INT4 kernels.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_hardware_on_arm.py -m requires_aarch64
"""

import sys

import pytest

from .arm_lane import ARM_DIR, describe, run_json

pytestmark = pytest.mark.requires_aarch64
PROBE = ARM_DIR / "hardware_probe.py"
# Facts of a machine that depend on where the decoder runs, not on the recording.
HOST_DEPENDENT = {
    "affinity",
    "usable_cpus",
    "tcmalloc_path",
    "torch_version",
    "torch_kleidiai",
    "vllm_version",
    "int4_kernel",
    "sources",
    "cgroup_version",
    "cgroup_cpu_quota",
    "cgroup_cpuset",
}


def test_fixtures_decode_the_same_on_arm_as_on_x86(arm_python):
    arm_proc, arm = run_json([arm_python, PROBE])
    assert arm is not None, describe(arm_proc)
    host_proc, host = run_json([sys.executable, PROBE])
    assert host is not None, describe(host_proc)
    assert sorted(arm["fixtures"]) == sorted(host["fixtures"])
    for name, a in arm["fixtures"].items():
        h = host["fixtures"][name]
        for key in sorted(set(a) | set(h)):
            if key not in HOST_DEPENDENT:
                assert a.get(key) == h.get(key), f"{name}: {key} is {a.get(key)!r} on Arm, {h.get(key)!r} on x86"


def test_live_emulated_machine_is_an_arm_neoverse(arm_python):
    """The lane's rootfs shows qemu a recorded Neoverse /proc/cpuinfo (scripts/arm_emulation.sh)."""
    proc, data = run_json([arm_python, PROBE])
    assert data is not None, describe(proc)
    live = data["live"]
    assert live["arch"] == "aarch64"
    assert live["cpu_name"].startswith("Neoverse"), live["cpu_name"]
    assert {"asimd", "asimddp"} <= set(live["features"]), live["features"]
