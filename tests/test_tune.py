"""arm_int4.tune: candidates from recorded machines, selection on synthetic Records, the staged
sweep's bookkeeping with a stand-in engine, and one real tiny sweep through `arm-int4 tune`.

Run: .venv/bin/python -m pytest tests/test_tune.py -q
The real sweep is module scoped: three eager engines on the tiny random Llama (placements all +
reserve1 at batch 1, then the winner with batch 1 and 2), prompt 16, generate 8, 2 repetitions.
"""

import dataclasses
import importlib.util
import json
import os
import shlex

import pytest
from test_launch import machine as _machine
from test_launch import write_checkpoint

from arm_int4 import bench, cli, hardware, launch, tune
from arm_int4.errors import UsageError
from arm_int4.report import Record


def machine(name, mem_gib=None, **changes):
    """A recorded machine with system-wide memory only (placement is what these tests are about)."""
    return _machine(name, mem_gib, **{"node_memory": None, **changes})


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    return launch.read_checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / "llama8b"))


# ------------------------------------------------------------------------------- candidates (pure)
def test_two_numa_nodes_add_a_per_node_ranks_candidate(llama8b):
    m = machine("ampere-altra", mem_gib=400)
    by = {c.label: c for c in tune.placements(m)}
    assert list(by) == ["all-160t", "reserve1-159t", "half-80t", "numa2-ranks", "vllm-auto"]
    plans = {k: launch.plan(m, llama8b, launch.EngineRequest(profile=c.profile)) for k, c in by.items()}
    assert plans["numa2-ranks"].ranks == 2 and "--tensor-parallel-size" in plans["numa2-ranks"].to_server_argv()
    assert [len(hardware.parse_cpulist(b)) for b in plans["numa2-ranks"].bind_lists] == [79, 79]
    assert (plans["all-160t"].ranks, plans["all-160t"].threads_per_rank) == (1, 160)
    assert plans["reserve1-159t"].threads_per_rank == 159 and plans["half-80t"].threads_per_rank == 80
    assert plans["vllm-auto"].env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


@pytest.mark.parametrize("name", ["graviton4", "grace", "github-arm64-runner", "x86-amd-epyc-this-box"])
def test_one_node_machines_get_no_numa_candidate_and_sane_thread_counts(name, llama8b):
    m = machine(name, mem_gib=64)
    cpus = m.usable_cpus()
    labels = [c.label for c in tune.placements(m)]
    assert not any(lbl.startswith("numa") for lbl in labels)
    assert labels[:2] == [f"all-{cpus}t", f"reserve1-{cpus - 1}t"] and labels[-1] == "vllm-auto"
    assert any(lbl.startswith("half") for lbl in labels) == (cpus >= 16)
    for c in tune.placements(m):
        threads = launch.plan(m, llama8b, launch.EngineRequest(profile=c.profile)).threads_per_rank
        assert (threads is None) == (c.label == "vllm-auto")  # None: vLLM's auto binding decides
        assert threads is None or 1 <= threads <= cpus
        if c.label.endswith("t"):
            assert threads == int(c.label.split("-")[1][:-1])


def test_candidates_cover_both_compilation_modes_and_kinds_filter():
    m = machine("graviton4")
    grid = tune.candidates(m)
    assert len(grid) == 2 * len(tune.placements(m))
    assert {c.profile.enforce_eager for c in grid} == {True, False}
    assert [c.label for c in tune.placements(m, ["reserve1", "numa"])] == ["reserve1-63t"]
    with pytest.raises(UsageError, match="--placements bogus"):
        tune.placements(m, ["bogus"])


# ------------------------------------------------------------------------------- selection (pure)
def _rec(config, batch, decode=None, tpot=None, output=None, error=None, load_s=10.0):
    r = Record(
        model="/m",
        model_name="m",
        quantization="bfloat16",
        quantized=False,
        test=f"pp16 tg8 b{batch}",
        prompt_tokens=16,
        gen_tokens=8,
        batch=batch,
        config=config,
        load_s=load_s,
    )
    r.decode_tok_s, r.tpot_ms_p50, r.output_tok_s, r.error = decode, tpot, output, error
    return r


def test_decode_objective_ranks_by_batch1_decode_and_failed_last():
    by = {
        "a": [_rec("a", 1, decode=20.0), _rec("a", 4, decode=70.0)],
        "b": [_rec("b", 1, decode=25.0)],
        "c": [_rec("c", 1, error="engine died")],
    }
    assert tune.select(by, "decode") == [("b", 25.0, 1), ("a", 20.0, 1), ("c", None, None)]


def test_throughput_objective_respects_the_tpot_limit():
    by = {
        "a": [
            _rec("a", 1, tpot=40, output=25.0),
            _rec("a", 4, tpot=90, output=44.0),
            _rec("a", 16, tpot=160, output=100.0),
        ],  # b16 is fastest but too slow per token
        "b": [_rec("b", 1, tpot=120, output=8.0)],
    }
    assert tune.select(by, "throughput", 100) == [("a", 44.0, 4), ("b", None, None)]
    assert tune.select(by, "throughput", 200)[0] == ("a", 100.0, 16)
    assert tune.select(by, "throughput", 10)[0][1] is None
    with pytest.raises(UsageError, match="--objective speed"):
        tune.score(by["a"], "speed")


def test_profile_meta_and_atomic_write(tmp_path):
    by = {
        "x eager": [_rec("x eager", 1, tpot=40, output=25.0), _rec("x eager", 4, tpot=90, output=44.0)],
        "y eager": [_rec("y eager", 1, error="boom")],
    }
    ranking = tune.select(by, "throughput", 100)
    winner = tune.Candidate("x eager", launch.Profile(ranks=1, reserve=1, enforce_eager=True), "why")
    m = machine("graviton4")
    prof = tune.profile_for(
        winner,
        ranking,
        by,
        objective="throughput",
        tpot_limit_ms=100,
        machine=m,
        model_dir="/m",
        workload=bench.Workload((16,), (8,), (1, 4), 2),
    )
    assert (prof.ranks, prof.reserve, prof.enforce_eager, prof.max_num_seqs) == (1, 1, True, 4)
    assert prof.meta["winner"] == {"config": "x eager", "score": 44.0, "batch": 4, "load_s": 10.0}
    assert prof.meta["runners_up"][0]["error"] == "boom" and prof.meta["mode"] == "eager"
    assert prof.meta["machine"]["usable_cpus"] == 64 and prof.meta["objective"] == "throughput"
    path = str(tmp_path / "p.json")
    tune.write_profile(path, prof)
    assert launch.Profile.load(path) == prof and os.listdir(tmp_path) == ["p.json"]  # no temp file left
    with pytest.raises(UsageError, match="exists: pass --overwrite"):
        tune.write_profile(path, prof)
    tune.write_profile(path, dataclasses.replace(prof, reserve=0), overwrite=True)
    assert launch.Profile.load(path).reserve == 0


# ------------------------------------------------------------------------------- sweep with a stand-in engine
def _fake_run_plan(speeds, calls):
    """bench.run_plan stand-in: decode tok/s by label; a label mapped to None fails."""

    def run_plan(plan, facts, workload, *, label="", **kw):
        calls.append((label, workload.batches, dict(plan.env), plan.to_server_argv()))
        if speeds[label.split(" b")[0]] is None:
            return [_rec(label, t.batch, error="engine exited with code 1") for t in workload.tests()]
        s = speeds[label.split(" b")[0]]
        return [
            _rec(label, t.batch, decode=s * t.batch, tpot=1000 / s, output=s * t.batch * 0.9) for t in workload.tests()
        ]

    return run_plan


def test_sweep_is_staged_records_failures_and_exits_1(tmp_path, monkeypatch, capsys):
    d = write_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1024)
    box = machine("x86-amd-epyc-this-box", mem_gib=16)
    monkeypatch.setattr(tune.hardware, "detect", lambda *a, **k: box)
    monkeypatch.setattr(tune.bandwidth, "machine_bandwidth", lambda *a, **k: {"triad_gbs": 20.0})
    calls = []
    speeds = {
        "all-2t eager": None,
        "reserve1-1t eager": 30.0,
        "tp2-1t eager": 15.0,
        "vllm-auto eager": 20.0,
        "reserve1-1t compiled": 36.0,
    }
    monkeypatch.setattr(tune.bench, "run_plan", _fake_run_plan(speeds, calls))
    out = tmp_path / "p.json"
    rc = cli.main(["tune", str(d), "--objective", "throughput", "-b", "1", "2", "--output", str(out)])
    text = capsys.readouterr()
    assert rc == 1  # a candidate failed; the profile is still written from the others
    assert [(c[0], c[1]) for c in calls] == [
        ("all-2t eager", (1,)),
        ("reserve1-1t eager", (1,)),
        ("tp2-1t eager", (1,)),
        ("vllm-auto eager", (1,)),
        ("reserve1-1t compiled", (1, 2)),
    ]
    assert calls[2][2]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1" and "--tensor-parallel-size" in calls[2][3]
    assert calls[0][2]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and calls[1][2]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert "--enforce-eager" in calls[1][3] and "--enforce-eager" not in calls[4][3]
    prof = launch.Profile.load(str(out))
    assert (prof.reserve, prof.enforce_eager, prof.max_num_seqs) == (1, False, 2)
    assert prof.meta["winner"]["config"] == "reserve1-1t compiled"
    assert "| 5 | all-2t eager | 1 | 10 | - | - | failed |" in text.out and "profile written" in text.err

    # eager wins stage 2 -> stage 3 runs the eager winner with every batch size
    calls.clear()
    speeds.update({"all-2t eager": 10.0, "reserve1-1t compiled": 25.0})
    assert (
        cli.main(
            [
                "tune",
                str(d),
                "--objective",
                "throughput",
                "-b",
                "1",
                "4",
                "--output",
                str(out),
                "--overwrite",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert calls[-1][:2] == ("reserve1-1t eager b1-4", (1, 4))
    assert launch.Profile.load(str(out)).meta["winner"]["config"] == "reserve1-1t eager b1-4"
    assert {r["config"] for r in json.loads((tmp_path / "r.json").read_text())} == {c[0] for c in calls}

    # nothing works: exit 1, one line, no profile
    calls.clear()
    speeds.update(dict.fromkeys(speeds))
    rc = cli.main(["tune", str(d), "--output", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "none.json").exists()
    assert err.strip().splitlines()[-1] == "arm-int4 tune: error: no profile written: every candidate failed"


def test_bad_input_is_one_line_before_any_engine(tmp_path, capsys, monkeypatch):
    d = write_checkpoint(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1024)
    monkeypatch.setattr(tune.bench, "run_plan", lambda *a, **k: pytest.fail("no engine should start"))
    (tmp_path / "p.json").write_text("{}")
    assert cli.main(["tune", str(d), "--output", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.main(["tune", str(d), "--output", str(tmp_path / "nodir" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["tune", str(d), "--tpot-limit-ms", "0", "--output", str(tmp_path / "q.json")]) == 2
    assert "--tpot-limit-ms 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", str(d), "--modes", "jit"])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def real_sweep(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    argv = [
        "tune",
        str(tiny_llama),
        "--objective",
        "throughput",
        "--modes",
        "eager",
        "--placements",
        "all",
        "reserve1",
        "-p",
        "16",
        "-n",
        "8",
        "-b",
        "1",
        "2",
        "-r",
        "2",
        "--output",
        str(out / "p.json"),
        "--json",
        str(out / "r.json"),
    ]
    rc = cli.main(argv)
    return rc, out


@pytest.mark.requires_vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_real_sweep_writes_a_profile_that_serve_and_bench_apply(real_sweep, tiny_llama, capsys):
    rc, out = real_sweep
    records = json.loads((out / "r.json").read_text())
    assert rc == 0, [r["error"] for r in records if r["error"]]
    configs = [r["config"] for r in records]
    assert configs[:2] == ["all-2t eager", "reserve1-1t eager"] and len(configs) == 4  # + winner at b1, b2
    assert all(r["decode_tok_s"] > 0 and r["engine_args"]["enforce_eager"] is True for r in records)
    prof = launch.Profile.load(str(out / "p.json"))
    winner = prof.meta["winner"]
    assert winner["config"] == configs[-1] and prof.max_num_seqs == winner["batch"] in (1, 2)
    assert prof.enforce_eager is True and prof.meta["mode"] == "eager"
    best = max(
        (r for r in records if r["config"] == winner["config"] and r["tpot_ms_p50"] <= 100),
        key=lambda r: r["output_tok_s"],
    )
    assert winner["score"] == pytest.approx(best["output_tok_s"])

    capsys.readouterr()
    assert cli.main(["serve", "--dry-run", "--profile", str(out / "p.json"), str(tiny_llama)]) == 0
    snippet = capsys.readouterr().out
    cmd = shlex.split(
        " ".join(line.rstrip("\\") for line in snippet.splitlines() if not line.startswith(("#", "export")))
    )
    assert cmd[cmd.index("--max-num-seqs") + 1] == str(prof.max_num_seqs) and "--enforce-eager" in cmd
    bind = "0-1" if prof.reserve == 0 else "0"
    assert f"export VLLM_CPU_OMP_THREADS_BIND={bind}" in snippet
    live = hardware.detect(probe_runtime=False)
    request = launch.EngineRequest(profile=prof)
    _, plan = bench.engine_for(live, str(tiny_llama), request, bench.Workload((16,), (8,), (1,), 1))
    kw = plan.to_llm_kwargs()
    assert kw["max_num_seqs"] == prof.max_num_seqs and kw["enforce_eager"] is True
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == bind
