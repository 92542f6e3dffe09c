"""`arm-int4 tune`: sweep the vLLM CPU knobs that move decode speed here, keep the best as a Profile.

Knobs (vLLM 0.32, CPU backend; each one changes the Plan `serve`/`bench` would use):
- CPU placement and thread count: every usable CPU bound (Arm's learning path), one CPU left
  to vLLM's scheduler (vLLM's FAQ), half the CPUs (16+ CPUs: decode is memory-bound), one
  tensor-parallel rank per NUMA node (2+ nodes), and vLLM's own `VLLM_CPU_OMP_THREADS_BIND=auto`.
  Threads per rank = the CPUs in its bind list (vLLM sets OMP_NUM_THREADS from it).
- Compilation: `--enforce-eager` (starts faster) vs compiled (vLLM's default; on CPU Dynamo
  traces once and inductor compiles, platforms/cpu.py: decodes faster, starts slower). Engine
  start time is in every record (load_s).
- Concurrency (objective `throughput`): max-num-seqs = the batch size with the best output
  tok/s whose per-request TPOT p50 stays within the limit.

Staged, one fresh engine per candidate (30-90 s each on a small box):
1. placement x threads, eager, batch 1;  2. the winner compiled (all batches for throughput);
3. throughput only, if eager won: the winner eager with all batches.
Stages 1-2 rank by batch-1 decode tok/s; the final pick is by the objective over every record.
"""

import dataclasses
import datetime
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

from . import __version__, bandwidth, bench, hardware, hub, launch, placement
from .errors import ArmInt4Error, HeadsDoNotSplit, UsageError
from .workload import failed_records

__all__ = [
    "OBJECTIVES",
    "TPOT_LIMIT_MS",
    "MODES",
    "PLACEMENTS",
    "PROMPTS",
    "GENS",
    "BATCHES",
    "REPETITIONS",
    "Candidate",
    "Outcome",
    "placements",
    "candidates",
    "score",
    "select",
    "profile_for",
    "default_output",
    "check_output",
    "write_profile",
    "sweep",
    "format_summary",
    "bandwidth_for",
]

# Defaults, written once (TuneOptions reads these).
OBJECTIVES = ("decode", "throughput")
TPOT_LIMIT_MS = 100.0  # Arm's benchmarking guide judges throughput under a 100 ms TPOT
MODES = ("eager", "compiled")
PLACEMENTS = ("all", "reserve1", "half", "numa", "tp2", "auto")  # applicable ones only (see placements)
PROMPTS, GENS, BATCHES, REPETITIONS = (128,), (64,), (1, 4, 16), 2


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # noqa: T201 (progress goes to stderr by design)


@dataclass(frozen=True)
class Candidate:
    label: str  # e.g. "all-2t eager": names the configuration in Record.config
    profile: launch.Profile  # the fields this candidate sets (meta empty)
    why: str


def placements(machine: hardware.Machine, kinds=PLACEMENTS) -> list:
    """CPU placement x thread-count candidates for this machine (those of `kinds` that apply), as
    Candidates without a mode. Pure: a recorded machine gives the same list as the live one."""
    bad = [k for k in kinds if k not in PLACEMENTS]
    if bad:
        raise UsageError(f"--placements {' '.join(bad)}: choose from {', '.join(PLACEMENTS)}")
    cpus = machine.usable_cpus() or machine.logical_cpus or 1
    nodes = len(placement.cpu_sets(machine)) or 1
    half = cpus // 2
    table = {
        "all": (
            True,
            Candidate(
                f"all-{cpus}t",
                launch.Profile(ranks=1, reserve=0),
                f"all {cpus} usable CPUs bound, one rank (Arm's learning path binds every core)",
            ),
        ),
        "reserve1": (
            cpus > 1,
            Candidate(
                f"reserve1-{cpus - 1}t",
                launch.Profile(ranks=1, reserve=1),
                "one CPU left to vLLM's scheduler/API process (vLLM's CPU FAQ)",
            ),
        ),
        "half": (
            cpus >= 16,
            Candidate(
                f"half-{half}t",
                launch.Profile(ranks=1, reserve=cpus - half),
                f"{half} threads: decode is memory-bound, fewer threads may reach the same bandwidth",
            ),
        ),
        "numa": (
            nodes > 1,
            Candidate(
                f"numa{nodes}-ranks",
                launch.Profile(ranks=nodes, reserve=nodes),
                f"one tensor-parallel rank per NUMA node ({nodes}), one CPU each reserved",
            ),
        ),
        "tp2": (
            nodes == 1 and cpus >= 2,
            Candidate(
                f"tp2-{cpus // 2 - (1 if cpus >= 4 else 0)}t",
                launch.Profile(ranks=2, reserve=2 if cpus >= 4 else 0),
                "two tensor-parallel ranks on one NUMA node, each with half of "
                "the CPUs" + (", one CPU each reserved" if cpus >= 4 else ""),
            ),
        ),
        "auto": (
            True,
            Candidate(
                "vllm-auto",
                launch.Profile(bind="auto"),
                "vLLM's default: VLLM_CPU_OMP_THREADS_BIND=auto, one reserved CPU per rank",
            ),
        ),
    }
    return [table[k][1] for k in PLACEMENTS if k in kinds and table[k][0]]


def candidates(machine: hardware.Machine, modes=MODES, kinds=PLACEMENTS) -> list:
    """Every placement in every compilation mode (the full grid; `sweep` runs it staged)."""
    return [_with_mode(c, m) for c in placements(machine, kinds) for m in modes]


def _with_mode(c: Candidate, mode: str) -> Candidate:
    if mode not in MODES:
        raise UsageError(f"--modes {mode}: choose from {', '.join(MODES)}")
    return Candidate(
        f"{c.label} {mode}",
        dataclasses.replace(c.profile, enforce_eager=mode == "eager"),
        c.why + ("; --enforce-eager" if mode == "eager" else "; compiled (vLLM's default)"),
    )


# ------------------------------------------------------------------------------- selection
def score(records, objective: str, tpot_limit_ms: float = TPOT_LIMIT_MS) -> Optional[tuple]:
    """One candidate's records -> (value, batch) or None if nothing qualifies.
    decode: batch-1 decode tok/s. throughput: the best output tok/s (generated tokens / wall time)
    among batch sizes whose per-request TPOT p50 is within tpot_limit_ms."""
    ok = [r for r in records if r.error is None]
    if objective == "decode":
        vals = [(r.decode_tok_s, 1) for r in ok if r.batch == 1 and r.decode_tok_s is not None]
    elif objective == "throughput":
        vals = [
            (r.output_tok_s, r.batch)
            for r in ok
            if r.output_tok_s is not None and r.tpot_ms_p50 is not None and r.tpot_ms_p50 <= tpot_limit_ms
        ]
    else:
        raise UsageError(f"--objective {objective}: choose from {', '.join(OBJECTIVES)}")
    return max(vals, default=None)


def select(by_label: dict, objective: str, tpot_limit_ms: float = TPOT_LIMIT_MS) -> list:
    """{label: records} -> ranking [(label, value or None, batch or None)], best first; candidates
    with no qualifying record (failed, or over the TPOT limit) last with value None."""
    rows = [(label, *(score(recs, objective, tpot_limit_ms) or (None, None))) for label, recs in by_label.items()]
    return sorted(rows, key=lambda r: (r[1] is None, -(r[1] or 0)))


# ------------------------------------------------------------------------------- profile file
def default_output(model_dir, objective: str) -> str:
    name = hub.model_name(os.path.normpath(str(model_dir))).rsplit("/", 1)[-1]  # a hub snapshot: its repo's name
    return f"{name or 'model'}-{objective}.profile.json"


def check_output(path: str, overwrite: bool) -> None:
    """Refuse before any engine starts: an existing file without --overwrite, or a missing dir."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--output {path}: directory {parent} does not exist")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--output {path} exists: pass --overwrite to replace it, or choose another --output")


def write_profile(path: str, profile: launch.Profile, overwrite: bool = False) -> str:
    """Write atomically (temp file in the same dir, then rename); the JSON Profile.load reads."""
    check_output(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def profile_for(
    winner: Candidate,
    ranking: list,
    by_label: dict,
    *,
    objective: str,
    tpot_limit_ms: float,
    machine: hardware.Machine,
    model_dir,
    workload: bench.Workload,
) -> launch.Profile:
    """The winner's fields (+ max-num-seqs for throughput) with meta: machine, date, scores."""
    unit = "decode tok/s at batch 1" if objective == "decode" else (f"output tok/s, TPOT p50 <= {tpot_limit_ms:g} ms")

    def entry(label, value, batch):
        recs = by_label[label]
        errs = [r.error for r in recs if r.error]
        return {
            "config": label,
            "score": value,
            "batch": batch,
            "load_s": next((r.load_s for r in recs if r.load_s is not None), None),
            **({"error": errs[0]} if errs else {}),
        }

    best = ranking[0]
    meta = {
        "tool": f"arm-int4 {__version__} tune",
        "vllm_version": machine.vllm_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "key": f"{machine.arch}-{machine.cpu_name or 'unknown'}-{machine.usable_cpus()}cpu",
            "cpu": machine.cpu_name,
            "arch": machine.arch,
            "usable_cpus": machine.usable_cpus(),
            "numa_nodes": len(machine.numa_nodes),
        },
        "model": os.path.abspath(str(model_dir)),
        "objective": objective,
        "unit": unit,
        "tpot_limit_ms": tpot_limit_ms if objective == "throughput" else None,
        "workload": {
            "prompts": list(workload.prompts),
            "gens": list(workload.gens),
            "batches": list(workload.batches),
            "repetitions": workload.repetitions,
        },
        "mode": "eager" if winner.profile.enforce_eager else "compiled",
        "winner": entry(*best),
        "runners_up": [entry(*r) for r in ranking[1:]],
    }
    fields = {"max_num_seqs": best[2]} if objective == "throughput" else {}
    return dataclasses.replace(winner.profile, meta=meta, **fields)


# ------------------------------------------------------------------------------- sweep
@dataclass
class Outcome:
    records: list  # every record of every candidate, in run order (Record.config = label)
    ranking: list  # select(): [(label, value, batch)], best first
    candidates: dict  # label -> Candidate that ran
    stages: dict  # label -> stage number
    profile: Optional[launch.Profile]  # None when no candidate qualified
    path: Optional[str] = None  # where the profile was written


def sweep(
    model_dir,
    request: Optional[launch.EngineRequest] = None,
    *,
    objective: str = OBJECTIVES[0],
    tpot_limit_ms: float = TPOT_LIMIT_MS,
    workload: Optional[bench.Workload] = None,
    modes=MODES,
    kinds=PLACEMENTS,
    machine: Optional[hardware.Machine] = None,
    log_dir=None,
    bandwidth_gbs: Optional[float] = None,
    progress: Callable[[str], None] = _stderr,
) -> Outcome:
    """Run the staged sweep (module docstring) on MODEL_DIR, each candidate's profile in `request` (the
    user's vLLM args; None: the defaults). Never raises for a failing candidate:
    its records carry `error` and the sweep goes on. Outcome.profile is None if none qualified."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective}: choose from {', '.join(OBJECTIVES)}")
    if tpot_limit_ms <= 0:
        raise UsageError(f"--tpot-limit-ms {tpot_limit_ms:g}: give a positive number of milliseconds")
    modes = tuple(dict.fromkeys(modes)) or MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UsageError(f"--modes {' '.join(bad)}: choose from {', '.join(MODES)}")
    workload = workload or bench.Workload(PROMPTS, GENS, BATCHES, REPETITIONS)
    machine = machine or hardware.detect()
    request = request or launch.EngineRequest()
    probe = dataclasses.replace(workload, batches=(1,))  # stages 1-2 rank by batch-1 decode
    full = workload if objective == "throughput" else probe
    env_info = bench.environment(machine)
    by_label: dict = {}
    ran: dict = {}
    stage_of: dict = {}
    place_of: dict = {}
    seen: dict = {}

    def run(place: Candidate, mode: str, wl: bench.Workload, stage: int, suffix: str = "") -> None:
        c = _with_mode(place, mode)
        c = dataclasses.replace(c, label=c.label + suffix)
        try:
            facts, plan = bench.engine_for(machine, model_dir, request.replace(profile=c.profile), wl)
        except ArmInt4Error as exc:
            if isinstance(exc, HeadsDoNotSplit) and (c.profile.ranks or 1) > 1:  # this model's heads: not a failure
                progress(f"tune: {c.label}: skipped: {exc}")
                return
            if not by_label:  # the very first plan failed: the model or vLLM args are unusable
                raise
            progress(f"tune: {c.label}: cannot plan: {exc}")
            by_label[c.label] = failed_records(str(model_dir), wl, env_info, str(exc))
            for r in by_label[c.label]:
                r.config = c.label
        else:
            key = (tuple(sorted(plan.env.items())), plan.engine, wl)
            if key in seen:
                progress(f"tune: {c.label}: same plan as {seen[key]} on this machine: skipped")
                return
            seen[key] = c.label
            progress(f"tune: stage {stage}: {c.label}: {c.why}")
            by_label[c.label] = bench.run_plan(
                plan,
                facts,
                wl,
                machine=machine,
                bandwidth_gbs=bandwidth_gbs,
                label=c.label,
                log_dir=log_dir,
                env_info=env_info,
                progress=progress,
            )
        ran[c.label], stage_of[c.label], place_of[c.label] = c, stage, place

    # stage 1: placement x threads in the first mode (eager if allowed: it starts fastest)
    first_mode = "eager" if "eager" in modes else modes[0]
    places = placements(machine, kinds)
    if not places:
        raise UsageError(
            f"--placements {' '.join(kinds)}: none applies to this machine "
            f"({machine.usable_cpus()} CPUs, {len(machine.numa_nodes)} NUMA node(s)); add all or auto"
        )
    for place in places:
        run(place, first_mode, probe, 1)
    best = (select(by_label, "decode") or [(None, None, None)])[0]
    if best[1] is not None:
        # stage 2: the winning placement in the other mode(s)
        for mode in modes:
            if mode != first_mode:
                run(place_of[best[0]], mode, full, 2)
        # stage 3 (throughput): the best so far only ran batch 1: run its batch sizes
        best = select(by_label, "decode")[0]
        if objective == "throughput" and full != probe and stage_of[best[0]] == 1:
            run(place_of[best[0]], first_mode, full, 3, suffix=" b" + "-".join(map(str, full.batches)))
    ranking = select(by_label, objective, tpot_limit_ms)
    records = [r for recs in by_label.values() for r in recs]
    if not ranking or ranking[0][1] is None:
        return Outcome(records, ranking, ran, stage_of, None)
    profile = profile_for(
        ran[ranking[0][0]],
        ranking,
        by_label,
        objective=objective,
        tpot_limit_ms=tpot_limit_ms,
        machine=machine,
        model_dir=model_dir,
        workload=workload,
    )
    return Outcome(records, ranking, ran, stage_of, profile)


def format_summary(outcome: Outcome, objective: str, tpot_limit_ms: float) -> str:
    """Markdown: one row per candidate (stage, engine start, score), best first."""
    unit = "decode tok/s (b1)" if objective == "decode" else f"output tok/s (TPOT p50 ≤ {tpot_limit_ms:g} ms)"
    out = [
        "## arm-int4 tune",
        "",
        f"| rank | config | stage | engine start s | {unit} | batch | result |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for i, (label, value, batch) in enumerate(outcome.ranking, 1):
        recs = [r for r in outcome.records if r.config == label]
        load = next((r.load_s for r in recs if r.load_s is not None), None)
        err = next((r.error for r in recs if r.error), None)
        result = (
            "failed"
            if err and value is None
            else "over the TPOT limit"
            if value is None
            else "chosen"
            if i == 1 and outcome.profile
            else "partly failed"
            if err
            else ""
        )
        out.append(
            f"| {i} | {label} | {outcome.stages.get(label, '-')} | {'-' if load is None else f'{load:.0f}'} | "
            f"{'-' if value is None else f'{value:.1f}'} | {batch or '-'} | {result} |"
        )
    if outcome.profile:
        out += [
            "",
            "profile: `"
            + json.dumps({k: v for k, v in outcome.profile.to_dict().items() if k != "meta"})
            + "`"
            + (f" → {outcome.path}" if outcome.path else ""),
        ]
    return "\n".join(out) + "\n"


def bandwidth_for(machine: hardware.Machine, progress=_stderr) -> Optional[float]:
    """This machine's triad GB/s (cached), for the GB/s column; None if it cannot be measured."""
    try:
        return bandwidth.machine_bandwidth(machine, progress=progress)["triad_gbs"]
    except (ArmInt4Error, OSError) as exc:
        progress(f"tune: memory bandwidth not measured: {exc}")
        return None
