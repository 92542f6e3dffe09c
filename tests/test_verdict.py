"""arm_int4.verdict: the bench history `arm-int4 info` reads, and its W4A8-or-W4A16 line, on
recorded machines (an AVX2-only x86, an AVX-512 x86, a Graviton3) and on this one."""

import dataclasses
import json

import pytest
from conftest import run_cli
from test_launch import machine
from test_report import rec

from arm_int4 import hardware, kernels, verdict, x86_w4a8


def _record(m, quantization, decode, *, model="m", time="2026-12-02T10:00:00+00:00", **kw):
    """test_report's record, measured on machine `m` at `time` (decode None: no decode figure)."""
    where = dict(cpu=m.cpu_name, arch=m.arch, usable_cpus=m.usable_cpus(), time=time)
    return rec(model, quantization, test="pp128 tg64 b1", decode=decode or 1.0, decode_tok_s=decode, **where, **kw)


@pytest.fixture
def machines():
    avx512 = machine("x86-amd-epyc-this-box", 64, node_memory=None)
    avx512 = dataclasses.replace(avx512, vllm_version="0.32.0")
    avx2 = dataclasses.replace(avx512, features=tuple(f for f in avx512.features if not f.startswith("avx512")))
    grav = dataclasses.replace(machine("graviton3", 64), vllm_version="0.32.0")
    return avx2, avx512, grav


def test_history_keeps_this_machines_successful_offline_records(machines, tmp_path):
    _, avx512, grav = machines
    path = tmp_path / "h.jsonl"
    verdict.append_history(
        [
            _record(grav, "w4a8 minmax-groupwise-g32", 20.0),
            _record(grav, "w4a16 minmax-groupwise-g128", 12.0),
            _record(grav, "w4a16 minmax-groupwise-g128", None, error="engine died"),  # failed: not kept
            _record(grav, "w4a8 minmax-groupwise-g32", 99.0, mode="server"),  # server: not kept
            _record(avx512, "w4a8 minmax-groupwise-g32", 5.0),  # another machine
        ],
        path,
    )
    mine = verdict.load_history(grav, path)
    assert [(d["quantization"][:5], d["decode_tok_s"]) for d in mine] == [("w4a8 ", 20.0), ("w4a16", 12.0)]
    assert [d["decode_tok_s"] for d in verdict.load_history(avx512, path)] == [5.0]
    path.write_text(path.read_text() + "not json\n")
    assert len(verdict.load_history(grav, path)) == 2  # a torn line is skipped


def test_verdict_is_measured_when_a_pair_exists_else_expected(machines, tmp_path):
    avx2, avx512, grav = machines
    assert verdict.int4_verdict(avx2, []).startswith("W4A8: the only INT4 path")
    assert "none: " in verdict.w4a16_kernel(avx2) and "cpu_gemm_wna16" in verdict.w4a16_kernel(avx2)
    assert verdict.w4a16_kernel(grav).startswith("none: ") and verdict.int4_verdict(grav, []).startswith(
        "W4A8: the only"
    )
    assert verdict.w4a16_kernel(avx512) == "CPUWNA16LinearKernel (vec ISA)"
    fallback = dataclasses.replace(avx512, int4_kernel=kernels.Kernel.W4A8_X86_FALLBACK.display)
    assert verdict.int4_verdict(fallback, []).startswith("W4A16 expected faster (not measured here)")
    # arm_int4's x86 W4A8 kernel: no expectation either way until both are measured
    ours = dataclasses.replace(avx512, int4_kernel=kernels.Kernel.W4A8_X86.display)
    assert verdict.int4_verdict(ours, []).startswith("not measured here: W4A8 runs arm_int4's X86W4A8LinearKernel")
    hist = [
        # one bench run (records share its start time), checkpoints named as quantize names them
        _record(avx512, "w4a8 minmax-groupwise-g32", 20.0, model="m-w4a8dyn-minmax-groupwise-g32"),
        _record(avx512, "w4a16 minmax-groupwise-g128", 25.0, model="m-w4a16"),
        # another run, with no W4A8 in it: not a pair with the first run's W4A8
        _record(avx512, "w4a16 minmax-groupwise-g128", 30.0, model="other", time="2026-12-02T11:00:00+00:00"),
    ]
    rows = [json.loads(json.dumps(dataclasses.asdict(r))) for r in hist]
    line = verdict.int4_verdict(avx512, rows)
    assert line.startswith("W4A16 faster here: decode 25.0 vs 20.0 tok/s (W4A8)") and "2026-12-02" in line
    assert "m-w4a8dyn-minmax-groupwise-g32 vs m-w4a16" in line
    rows.append(json.loads(json.dumps(dataclasses.asdict(_record(avx512, "w4a8 mse-channelwise", 40.0)))))
    assert verdict.int4_verdict(avx512, rows).startswith("W4A8 faster here: decode 40.0 vs 25.0")


@pytest.mark.requires_vllm
def test_info_names_both_int4_paths_for_this_cpu(tmp_path):
    r = run_cli("info", "--json", env={"ARM_INT4_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    m = hardware.detect(probe_runtime=False)
    runs = kernels.w4a16_runs(m)
    assert info["int4_kernel_w4a16"].startswith(kernels.W4A16_KERNEL if runs else "none: ")
    ours = x86_w4a8.plugin_active(m.arch)  # this environment has arm_int4's entry point: W4A8 is not the fallback
    expected = ("not measured here" if ours else "W4A16 expected") if runs else "W4A8: the only"
    assert info["int4_verdict"].startswith(expected)
    table = run_cli("info", env={"ARM_INT4_HOME": str(tmp_path)}).stdout
    assert "INT4 kernel (W4A16)" in table and "W4A8 or W4A16" in table
