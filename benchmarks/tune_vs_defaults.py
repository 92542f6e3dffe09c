#!/usr/bin/env python3
"""Tuned profile vs vLLM's default binding vs Arm's learning-path env block; BF16 vs W4A8.

Run: flock /tmp/arm-int4-cpu.lock .venv/bin/python benchmarks/tune_vs_defaults.py
     [--shape 200m] [-p 128] [-n 32] [-b 1 4] [-r 3] [--workdir /tmp/arm-int4-tune-bench]
     [--out docs/benchmarks-tune-200m.json] [--md docs/benchmarks.md]

One run, in order, on a random Llama (arm_int4.synthetic; random weights are fine for speed):
1. build it (bf16) and quantize it with `arm-int4 quantize --engine stream` (W4A8 channelwise minmax);
2. `arm-int4 tune` (objective decode, both compilation modes) on the BF16 model -> profile;
3. four fresh engines, same workload, same KV cache and max-model-len:
   tuned      the profile from step 2, planned by arm_int4.launch as `serve --profile` does;
   vllm-auto  vLLM's defaults: VLLM_CPU_OMP_THREADS_BIND=auto, no other engine flags;
   lp-env     the learning path's env block (learn.arm.com vllm-acceleration, "run inference and
              serve"): VLLM_CPU_OMP_THREADS_BIND=0-(nproc-1), OMP_NUM_THREADS=nproc, VLLM_MLA_DISABLE=1,
              ONEDNN_DEFAULT_FPMATH_MODE=BF16, LD_PRELOAD=tcmalloc (if installed), and its
              --max-num-batched-tokens 4096; its --dtype float32 (meant for its INT4 model) is not
              applied, so every BF16 engine runs bfloat16;
   w4a8       the W4A8 checkpoint with the tuned profile (x86 reference fallback: NOT an Arm figure).
Ratios: mean of A's repetitions / mean of B's, sd by first-order error propagation of both
repetition sds: ratio * sqrt((sdA/A)^2 + (sdB/B)^2).
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from arm_int4 import bench, hardware, launch, report, tune  # noqa: E402

NO_TCMALLOC = "not installed here (ldconfig -p finds no libtcmalloc), so lp-env runs without LD_PRELOAD"
BEGIN, END = "<!-- tune_vs_defaults:begin -->", "<!-- tune_vs_defaults:end -->"


def log(msg):
    print(f"[tune_vs_defaults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(shape: str, work: Path) -> tuple:
    bf16, w4a8 = work / f"random-llama-{shape}", work / f"random-llama-{shape}-w4a8dyn-minmax-channelwise"
    if not (bf16 / "config.json").exists():
        log(f"building random Llama {shape} in {bf16}")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from arm_int4.synthetic import build_random_llama; "
                "build_random_llama(sys.argv[1], sys.argv[2])",
                str(bf16),
                shape,
            ],
            check=True,
            cwd=REPO,
        )
    if not (w4a8 / "config.json").exists():
        log(f"quantizing -> {w4a8}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "arm_int4",
                "quantize",
                str(bf16),
                "--engine",
                "stream",
                "--method",
                "minmax",
                "--output",
                str(w4a8),
            ],
            check=True,
            cwd=REPO,
        )
    return bf16, w4a8


def baseline_plans(tuned: launch.EngineSpec, machine: hardware.Machine, model_dir: str, max_model_len: int) -> dict:
    """vLLM-default and learning-path engines sharing the tuned plan's KV cache and max-model-len."""
    kv = tuned.env["VLLM_CPU_KVCACHE_SPACE"]
    # vLLM's defaults but the length: no dtype, sequences, step, block size or eager said
    defaults = launch.EngineArgs(None, 1, max_model_len, None, None, None, False)
    nproc = machine.usable_cpus() or os.cpu_count()
    auto = dataclasses.replace(
        tuned,
        model_dir=model_dir,
        env={"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_KVCACHE_SPACE": kv},
        engine=defaults,
        user_args=(),
        user_kwargs={},
        threads_per_rank=None,
        bind_lists=(),
    )
    lp_env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": kv,
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{nproc - 1}",
        "VLLM_MLA_DISABLE": "1",
        "ONEDNN_DEFAULT_FPMATH_MODE": "BF16",
        "OMP_NUM_THREADS": str(nproc),
    }
    if machine.tcmalloc_path:
        lp_env["LD_PRELOAD"] = machine.tcmalloc_path
    lp = dataclasses.replace(
        tuned,
        model_dir=model_dir,
        env=lp_env,
        engine=dataclasses.replace(defaults, max_num_batched_tokens=4096),
        user_args=(),
        user_kwargs={},
        threads_per_rank=nproc,
        bind_lists=(f"0-{nproc - 1}",),
    )
    return {"vllm-auto": auto, "lp-env": lp}


def ratio(a: report.Record, b: report.Record, metric: str) -> dict:
    ma, sa, mb, sb = (getattr(a, metric), getattr(a, metric + "_sd"), getattr(b, metric), getattr(b, metric + "_sd"))
    if not ma or not mb:
        return {"mean": None, "sd": None}
    r = ma / mb
    return {"mean": r, "sd": r * ((sa / ma) ** 2 + (sb / mb) ** 2) ** 0.5}


def pm(x, sd, f="{:.2f}"):
    return "-" if x is None else f.format(x) + " ± " + f.format(sd)


def num(x, f):
    return "-" if x is None else f.format(x)


def markdown(res: dict) -> str:
    m, rows = res["machine"], res["rows"]
    by = {(r["config"], r["test"]): r for r in rows}
    tests = list(dict.fromkeys(r["test"] for r in rows))
    out = [
        BEGIN,
        f"## Tuning: `arm-int4 tune` profile vs vLLM defaults vs the learning path (x86, {res['date']})",
        "",
        f"Command: `{res['command']}` — one run, {res['wall_min']:.0f} min. Machine: {m['cpu']} ({m['arch']}), "
        f"{m['usable_cpus']} usable CPUs, vLLM {m['vllm_version']}, torch {m['torch_version']}; 1-min load "
        f"average {res['load_before'][0]:.1f} before / {res['load_after'][0]:.1f} after (a shared box: "
        "other helpers' jobs wait on the same CPU lock, but anything outside it adds noise; the ratios "
        "come from engines run back to back).",
        "",
        f"Model: {res['model']}. Workload per engine: {res['workload']}. tcmalloc: {res['tcmalloc'] or NO_TCMALLOC}.",
        "",
        f"Tuned profile (from the same run's sweep, objective decode): `{json.dumps(res['profile_fields'])}`",
        "",
        "| config | test | decode tok/s | TPOT ms p50 | output tok/s | engine start s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['config']} | {r['test']} | {pm(r['decode_tok_s'], r['decode_tok_s_sd'], '{:.1f}')} | "
            f"{num(r['tpot_ms_p50'], '{:.1f}')} | {pm(r['output_tok_s'], r['output_tok_s_sd'], '{:.1f}')} | "
            f"{num(r['load_s'], '{:.0f}')} |"
        )
    out += [
        "",
        "Ratios of decode tok/s (mean ± sd, error-propagated from the repetitions):",
        "",
        "| ratio | " + " | ".join(tests) + " |",
        "|---|" + "---:|" * len(tests),
    ]
    for name, (a, b) in res["ratio_pairs"].items():
        cells = [
            pm(res["ratios"][name][t]["mean"], res["ratios"][name][t]["sd"]) + "×"
            if (a, t) in by and (b, t) in by and res["ratios"][name][t]["mean"]
            else "-"
            for t in tests
        ]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += [
        "",
        "The w4a8 rows run on vLLM's **x86 reference fallback** (Dynamic4bitLinearKernel without "
        "KleidiAI): INT4 is slower than BF16 here; this says nothing about Arm, where KleidiAI runs it.",
        "",
        f"Sweep (stage, engine start, batch-1 decode tok/s): {res['sweep_summary']}",
        f"Raw records: [{res['json_name']}]({res['json_name']}).",
        END,
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="200m")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-b", type=int, nargs="+", default=[1, 4])
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/arm-int4-tune-bench")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks-tune-200m.json"))
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"))
    a = ap.parse_args()
    t0, load_before = time.time(), os.getloadavg()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bf16, w4a8 = build(a.shape, work)
    machine = hardware.detect()
    workload = bench.Workload(prompts=(a.p,), gens=(a.n,), batches=tuple(a.b), repetitions=a.r)
    bw = tune.bandwidth_for(machine, progress=log)

    log("tune sweep (objective decode)")
    outcome = tune.sweep(
        str(bf16), objective="decode", workload=workload, machine=machine, bandwidth_gbs=bw, progress=log
    )
    if outcome.profile is None:
        log("tune found no working configuration")
        return 1
    prof = dataclasses.replace(outcome.profile, meta={})

    log("comparison engines")
    request = launch.EngineRequest(profile=prof)
    facts, tuned = bench.engine_for(machine, str(bf16), request, workload)
    plans = {
        "tuned": (facts, tuned),
        **{k: (facts, p) for k, p in baseline_plans(tuned, machine, str(bf16), workload.max_model_len).items()},
    }
    plans["w4a8"] = bench.engine_for(machine, str(w4a8), request, workload)
    records = []
    for label, (f, plan) in plans.items():
        records += bench.run_plan(plan, f, workload, machine=machine, bandwidth_gbs=bw, label=label, progress=log)
    by = {(r.config, r.test): r for r in records if r.error is None}
    pairs = {
        "tuned / vllm-auto": ("tuned", "vllm-auto"),
        "tuned / lp-env": ("tuned", "lp-env"),
        "w4a8 / bf16 (tuned), x86 reference fallback": ("w4a8", "tuned"),
    }
    tests = [t.name for t in workload.tests()]
    ratios = {
        n: {
            t: ratio(by[(a_, t)], by[(b_, t)], "decode_tok_s")
            if (a_, t) in by and (b_, t) in by
            else {"mean": None, "sd": None}
            for t in tests
        }
        for n, (a_, b_) in pairs.items()
    }
    keep = (
        "config",
        "test",
        "decode_tok_s",
        "decode_tok_s_sd",
        "decode_tok_s_samples",
        "tpot_ms_p50",
        "output_tok_s",
        "output_tok_s_sd",
        "load_s",
        "error",
        "env",
        "engine_args",
        "quantization",
        "linear_kernels",
    )
    rows = [{k: report.to_dict(r)[k] for k in keep} for r in records]
    sweep_summary = "; ".join(
        f"{lbl} (stage {outcome.stages.get(lbl)}, start "
        f"{next((r.load_s for r in outcome.records if r.config == lbl and r.load_s), 0):.0f} s)"
        f" {'-' if v is None else f'{v:.1f}'}"
        for lbl, v, _ in outcome.ranking
    )
    out = Path(a.out)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(
            ["flock /tmp/arm-int4-cpu.lock .venv/bin/python benchmarks/tune_vs_defaults.py"] + sys.argv[1:]
        ),
        "wall_min": (time.time() - t0) / 60,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": {
            "cpu": machine.cpu_name,
            "arch": machine.arch,
            "usable_cpus": machine.usable_cpus(),
            "vllm_version": machine.vllm_version,
            "torch_version": machine.torch_version,
        },
        "model": f"random Llama {a.shape} ({re.sub(r'^.*/', '', str(bf16))}, bf16) and its W4A8 channelwise "
        "minmax quantization (arm-int4 quantize --engine stream)",
        "workload": f"prompt {a.p}, generate {a.n}, batch {' and '.join(map(str, a.b))}, 1 warm-up + {a.r} "
        "timed repetitions",
        "tcmalloc": machine.tcmalloc_path,
        "profile_fields": prof.to_dict(),
        "profile_meta": outcome.profile.meta,
        "sweep_summary": sweep_summary,
        "ratio_pairs": pairs,
        "ratios": ratios,
        "rows": rows,
        "json_name": out.name,
        "sweep_records": [report.to_dict(r) for r in outcome.records],
        "records": [report.to_dict(r) for r in records],
    }
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = Path(a.md)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    section = markdown(res)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)
    sys.stdout.write(report.format_markdown(records))
    log(f"wrote {out} and a section of {md}")
    return report.exit_code(records)


if __name__ == "__main__":
    sys.exit(main())
