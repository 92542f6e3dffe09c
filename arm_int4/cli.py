"""`arm-int4`: one command line over the arm_int4 package. A thin layer: parse, call, print.

Library errors (arm_int4.errors) become one line on stderr and their exit code; argparse errors
become one line and exit 2. Heavy imports happen inside the handlers, so `--help` is instant.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__, options
from .errors import ArmInt4Error, BudgetNotMet, EnvironmentMissing, UsageError
from .options import (
    BenchOptions,
    BuildOptions,
    DemoOptions,
    DoctorOptions,
    EvalOptions,
    InfoOptions,
    LearningPathOptions,
    OptionsParser,
    QuantizeOptions,
    ServeOptions,
    TuneOptions,
    engine_request,
    options_from_namespace,
)

__all__ = ["main", "build_parser", "parse", "command_options", "learning_path_main", "COMMANDS"]


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + error; we print one line naming the problem, and exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandParser(OptionsParser, OneLineParser):
    """A command's parser: its options from its dataclass, its errors in one line."""


def _cmd_info(opts: InfoOptions) -> int:
    from . import doctor, hardware, verdict

    machine = hardware.detect()
    w4a16 = verdict.w4a16_kernel(machine)
    choice = verdict.int4_verdict(machine, verdict.load_history(machine)) if machine.vllm_version else None
    if opts.json:
        wheel = doctor.vllm_wheel(machine)
        print(
            json.dumps(
                {**machine.to_dict(), "int4_kernel_w4a16": w4a16, "int4_verdict": choice, "vllm_wheel": wheel}, indent=2
            )
        )
    else:
        rows = [("INT4 kernel (W4A16)", w4a16 or "n/a (needs vLLM)"), ("W4A8 or W4A16", choice or "n/a (needs vLLM)")]
        rows.append(("vLLM wheel", doctor.vllm_wheel(machine) or "not installed"))
        print(hardware.format_table(machine, rows))
    return 0


def _cmd_doctor(opts: DoctorOptions) -> int:
    from . import doctor, hardware

    findings = doctor.run_all(hardware.detect(), opts.model)
    if opts.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        for f in findings:
            print(
                f"{f.status.upper():4}  {f.check}: {f.detail}"
                + (f"\n      fix: {f.fix}" if f.fix and f.status != "ok" else "")
            )
    return 1 if any(f.status == "fail" for f in findings) else 0


def _cmd_quantize(opts: QuantizeOptions) -> int:
    from . import quantize

    if opts.verify_only:
        report = quantize.verify_dir(opts.model)
        print(report.summary())
        return 0
    if opts.dry_run:
        preview = quantize.dry_run(opts)
        print(preview.summary(), flush=True)
        preview.check_disk()  # after the plan is shown: the one line says what does not fit
        return 0
    try:
        result = quantize.quantize(opts)
    except BudgetNotMet as exc:  # --keep-best kept a checkpoint over budget: show it, then the one line
        if exc.result is not None:
            print(exc.result.summary(), flush=True)
        raise
    print(result.summary(), flush=True)
    if opts.eval:
        from . import lmeval, models

        source = models.resolve(opts.model, progress=lambda m: print(m, file=sys.stderr))
        print(lmeval.quick_check(source, result.output, progress=lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


def _cmd_serve(opts: ServeOptions) -> int:
    from . import hardware, hub, launch, models, runner

    request = engine_request(opts, offline=False)
    if opts.machine_dump and not (opts.dry_run or opts.emit):
        raise UsageError(
            f"--machine-dump {opts.machine_dump}: a recorded machine can only be planned for: add --dry-run or --emit"
        )
    machine = hardware.from_dump(opts.machine_dump) if opts.machine_dump else hardware.detect(probe_runtime=False)
    say = lambda m: print(m, file=sys.stderr)
    remote = hub.metadata(opts.model, progress=say) if opts.dry_run and hub.is_hub_id(opts.model) else None
    if remote is not None:  # planned from config.json and the index: the weights are not downloaded
        facts = launch.read_checkpoint(remote.snapshot, weights_total=remote.weight_bytes)
    else:
        facts = launch.read_checkpoint(models.resolve(opts.model, progress=say))
    can_bind = True if opts.machine_dump else runner.can_set_affinity()  # a recorded machine: the target's own
    if opts.emit:
        from . import manifests, placement, replicas

        count = opts.replicas or len(placement.cpu_sets(machine)) or 1  # one per NUMA node
        rs = replicas.plan_replicas(machine, facts, request, count, upstreams=tuple(opts.upstream or ()))
        print(manifests.render(opts.emit, rs, facts, machine.arch), end="")
        return 0
    if opts.replicas is not None or opts.upstream:
        from . import replicas

        rs = replicas.plan_replicas(
            machine,
            facts,
            request,
            0 if opts.replicas is None else opts.replicas,  # --upstream alone: a router over them only
            upstreams=tuple(opts.upstream or ()),
            can_bind=can_bind,
        )
        if opts.dry_run:
            print(rs.format())
            return 0
        for port in (*rs.router.ports, *(s.port for s in rs.replicas)):
            runner.check_port(rs.router.host if port in rs.router.ports else "127.0.0.1", port)
        print(rs.format(), file=sys.stderr, flush=True)
        return runner.serve_replicas(rs)
    plan = launch.plan(machine, facts, request, can_bind=can_bind)
    if opts.dry_run:
        if remote is not None:
            print("\n".join(f"# {line}" for line in remote.describe("`arm-int4 serve` without --dry-run")))
        print(plan.format(), flush=True)
        if remote is not None:
            hub.check_disk(remote.repo_id, [remote.download_need()])  # after the plan: one line if short
        return 0
    if not plan.headless:  # a worker node listens on no HTTP port
        runner.check_port(opts.host, opts.port)
    print(plan.format(), file=sys.stderr, flush=True)
    return runner.serve_foreground(plan)


def _cmd_bench(opts: BenchOptions) -> int:
    from . import bench, hardware, models, report

    workload = options.workload(opts)
    report.check_targets(json_path=opts.json, csv_path=opts.csv, jsonl_path=opts.jsonl, plot_path=opts.plot)
    if opts.server:
        from . import bench_server

        if len(opts.models) > 1 or opts.vllm_args or opts.profile:
            raise UsageError(
                f"--server {opts.server}: the server is already configured; give at most one MODEL "
                "(its checkpoint dir) and no --profile or vLLM args"
            )
        if opts.vs_llamacpp:
            raise UsageError("--vs-llamacpp runs beside bench's own vLLM engines (same threads): drop --server")
        records = bench_server.run_server(opts.server, workload, model_dir=opts.models[0] if opts.models else None)
    else:
        request = engine_request(opts)
        peer, first = None, (opts.models or ["default"])[0]
        say = lambda m: print(m, file=sys.stderr, flush=True)
        if opts.vs_llamacpp:  # env and GGUF settled before any engine starts
            from . import llamacpp

            peer = llamacpp.prepare(opts.vs_llamacpp, opts.models or ["default"], progress=say)
        machine = hardware.detect()
        records = bench.run(
            opts.models or ["default"],
            workload,
            request,
            machine=machine,
            log_dir=opts.log_dir,
            refresh_bandwidth=opts.refresh_bandwidth,
        )
        if peer:
            _, like = bench.engine_for(machine, models.resolve(first, progress=say), request, workload)
            records += llamacpp.run_like(peer, like, workload, machine=machine, log_dir=opts.log_dir, progress=say)
            said = llamacpp.comparison(records)  # which comparison the table is, first among the notes
            for r in records:
                r.notes = [said, *r.notes] if said else r.notes
    if not opts.server:
        from . import verdict

        verdict.append_history(records)  # `arm-int4 info` compares W4A8 with W4A16 from it
    report.emit(records, json_path=opts.json, csv_path=opts.csv, jsonl_path=opts.jsonl, plot_path=opts.plot)
    return report.exit_code(records)


def _cmd_tune(opts: TuneOptions) -> int:
    from . import hardware, models, report, tune

    workload = options.workload(opts)
    report.check_targets(json_path=opts.json)
    model_dir = models.resolve(opts.model, progress=lambda m: print(m, file=sys.stderr))
    output = opts.output or tune.default_output(model_dir, opts.objective)
    tune.check_output(output, opts.overwrite)  # before any engine starts
    machine = hardware.detect()
    outcome = tune.sweep(
        model_dir,
        engine_request(opts),
        objective=opts.objective,
        tpot_limit_ms=opts.tpot_limit_ms,
        workload=workload,
        modes=opts.modes,
        kinds=opts.placements,
        machine=machine,
        log_dir=opts.log_dir,
        bandwidth_gbs=tune.bandwidth_for(machine),
    )
    if outcome.profile is not None:
        outcome.path = tune.write_profile(output, outcome.profile, overwrite=opts.overwrite)
    report.emit(outcome.records, json_path=opts.json)
    if opts.json != "-":
        print("\n" + tune.format_summary(outcome, opts.objective, opts.tpot_limit_ms), end="")
    if outcome.profile is None:
        why = (
            "every candidate failed"
            if all(r.error for r in outcome.records)
            else f"no batch size kept TPOT p50 within {opts.tpot_limit_ms:g} ms: raise --tpot-limit-ms or give "
            "smaller -b sizes"
        )
        print(f"arm-int4 tune: error: no profile written: {why}", file=sys.stderr)
        return 1
    print(f"arm-int4 tune: profile written to {outcome.path}", file=sys.stderr)
    return report.exit_code(outcome.records)


def _cmd_demo(opts: DemoOptions) -> int:
    from . import demo

    result = demo.run_demo(Path(opts.output) if opts.output else None, quick=opts.quick, overwrite=opts.overwrite)
    print(demo.format_rows(result))
    return 1 if result.failed else 0


_BUILD_FLAGS = (
    ("vllm_version", "--vllm-version"),
    ("source", "--source"),
    ("source_from", "--from"),
    ("jobs", "--jobs"),
    ("out", "--out"),
    ("workdir", "--workdir"),
    ("offline_deps", "--offline-deps"),
    ("machine_dump", "--machine-dump"),
    ("test_wheel", "--test-wheel"),
)


def _cmd_build(opts: BuildOptions) -> int:
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_vllm_cpu.sh"
    if not script.is_file():
        raise EnvironmentMissing(
            f"arm-int4 build needs a checkout of arm-int4 ({script} not found): clone the repository and run it there"
        )
    args = []
    for name, flag in _BUILD_FLAGS:
        if getattr(opts, name) is not None:
            args += [flag, str(getattr(opts, name))]
    args += ["--dry-run"] * opts.dry_run + ["--no-test"] * opts.no_test
    return subprocess.run(["bash", str(script), *args]).returncode  # the script's one-line errors pass through


def _cmd_eval(opts: EvalOptions) -> int:
    from . import evaluate, hardware, lmeval, models, tradeoff

    def log(m):
        print(f"arm-int4: {m}", file=sys.stderr, flush=True)

    for flag, path in (("--output", opts.output), ("--plot", opts.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"{flag} {path}: directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if opts.plot and os.path.exists(opts.plot):
        raise UsageError(f"--plot {opts.plot}: exists: remove it or name another file")
    if opts.plot and not opts.plot.endswith(".png"):
        raise UsageError(f"--plot {opts.plot}: name a .png file")
    try:
        decode = tradeoff.bench_decode(opts.bench) if opts.bench else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    request = engine_request(opts)
    dirs = [models.resolve(m, progress=log) for m in opts.models]
    baseline = models.resolve(opts.baseline, progress=log) if opts.baseline else None
    ppl_kwargs = dict(
        max_len=opts.max_len,
        stride=opts.stride,
        num_tokens=opts.num_tokens,
        bos=not opts.no_bos,
        log=opts.log,
    )
    limit = int(opts.limit) if opts.limit >= 1 and opts.limit == int(opts.limit) else opts.limit
    out = lmeval.run_eval(
        dirs,
        baseline=baseline,
        tasks=opts.tasks,
        text=opts.text,
        ppl_kwargs=ppl_kwargs,
        include_path=opts.include_path,
        progress=log,
        num_fewshot=opts.num_fewshot,
        limit=limit,
        batch_size=opts.batch_size,
        request=request,
        machine=hardware.detect(probe_runtime=False),
        log=opts.log,
    )
    table = tradeoff.rows(out["perplexity"], decode) if out["perplexity"] else []
    out["tradeoff"] = table
    if opts.plot and table:
        tradeoff.plot(table, opts.plot, caption=f"perplexity on {out['perplexity'][0]['text']}")
        log(f"trade-off plot saved to {opts.plot}")
    if opts.output:
        with open(opts.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=str)
        log(f"results saved to {opts.output}")
    only_ppl = not out["tasks"]  # the perplexity-only output, as before lm-eval tasks existed
    if opts.format == "md":
        print(evaluate.format_table(out["perplexity"]) if only_ppl else lmeval.format_tables(out["rows"], out["tasks"]))
        if len(table) > 1 or opts.bench or opts.plot:
            print("\ntrade-off (bits/weight as stored, over every parameter):\n" + tradeoff.format_markdown(table))
    elif opts.format == "json":
        print(json.dumps(out["perplexity"] if only_ppl else out, indent=2, default=str))
    else:
        for r in out["perplexity"] if only_ppl else out["rows"]:
            print(json.dumps(r))
    return 0


# name → (options class, handler, one-line help, examples epilog)
COMMANDS: dict[str, tuple[type, Callable[[Any], int], str, str]] = {
    "bench": (
        BenchOptions,
        _cmd_bench,
        "prefill/decode tok/s, TTFT, TPOT, GB/s of vLLM on this CPU; several models side by side",
        "examples:\n  arm-int4 bench default\n"
        "  arm-int4 bench ./m ./m-w4a8dyn-mse-channelwise -p 128 -n 64 -b 1 4 --json r.json --plot r.png\n"
        "  arm-int4 bench ./m -- --enforce-eager\n"
        "  arm-int4 bench default --vs-llamacpp -p 128 -n 64 -b 1 4   # vLLM BF16 vs llama.cpp Q4_1\n"
        "  arm-int4 bench ./m ./m-w4a8 --vs-llamacpp   # INT4 vs INT4: + llama.cpp Q4_0 of ./m\n"
        "  arm-int4 bench --server http://127.0.0.1:8000 -b 1 4 16",
    ),
    "build": (
        BuildOptions,
        _cmd_build,
        "build vLLM's CPU wheel from source for this machine, record how, smoke-test it",
        "examples:\n  arm-int4 build --dry-run\n"
        "  arm-int4 build --dry-run --machine-dump tests/fixtures/machines/graviton2\n"
        "  arm-int4 build --offline-deps /srv/vllm-deps --jobs 16",
    ),
    "demo": (
        DemoOptions,
        _cmd_demo,
        "the whole flow on the embedded default model (SmolLM2-135M): prepare, quantize, perplexity, bench, "
        "summary table + PNG",
        "examples:\n  arm-int4 demo\n  arm-int4 demo --quick --output /tmp/demo",
    ),
    "doctor": (
        DoctorOptions,
        _cmd_doctor,
        "check this machine for what serving INT4 needs (system packages, vLLM wheel vs CPU, OpenMP, "
        "tcmalloc, huge pages, cgroup, compile cache; with --model its plan, disk, hub token); exit 1 if blocked",
        "examples:\n  arm-int4 doctor\n  arm-int4 doctor --model ./SmolLM2-135M-Instruct-w4a8dyn-mse-channelwise\n"
        "  arm-int4 doctor --model meta-llama/Llama-3.1-8B-Instruct --json",
    ),
    "eval": (
        EvalOptions,
        _cmd_eval,
        "accuracy through vLLM: perplexity on a packaged text and lm-eval tasks, vs an unquantized baseline",
        "examples:\n"
        "  arm-int4 eval ./SmolLM2-135M-Instruct-w4a8dyn-mse-channelwise --baseline default\n"
        "  arm-int4 eval ./m-cw --baseline ./m --tasks perplexity opticks_cloze --num-fewshot 0 --limit 50\n"
        "  arm-int4 eval ./m-cw --baseline ./m --tasks gsm8k --output gsm8k.json   # vLLM's INT4 doc (hub data)\n"
        "  arm-int4 eval ./m-cw --tasks my_task --include-path ./my_tasks\n"
        "  arm-int4 eval ./m-cw --profile m.json   # the engine `arm-int4 serve --profile m.json` runs\n"
        "  arm-int4 eval ./m-cw ./m-g32 --baseline ./m --num-tokens 2048 --format json\n"
        "  arm-int4 eval ./m-budget10 --baseline default --text opticks-search   # the part --budget fitted on\n"
        "  arm-int4 eval default --text notes.txt --num-tokens 0",
    ),
    "info": (
        InfoOptions,
        _cmd_info,
        "describe this machine: CPU, ISA features, cores, NUMA, memory, INT4 kernel",
        "examples:\n  arm-int4 info\n  arm-int4 info --json",
    ),
    "quantize": (
        QuantizeOptions,
        _cmd_quantize,
        "quantize a Hugging Face model to INT4 (W4A8-dynamic) in compressed-tensors format",
        "examples:\n"
        "  arm-int4 quantize default                                  # channelwise, mse\n"
        "  arm-int4 quantize ./Llama-3.1-8B --scheme groupwise --groupsize 32 --method minmax\n"
        "  arm-int4 quantize ./model --preset w4a16 --scheme groupwise --algorithm gptq   "
        "# the vLLM INT4 page's flow, offline calibration\n"
        "  arm-int4 quantize ./model --algorithm gptq --dataset calib.jsonl --output ./model-gptq\n"
        "  arm-int4 quantize default --budget 10     # a scheme per layer, within 10% perplexity (vLLM-checked)\n"
        "  arm-int4 quantize meta-llama/Llama-3.1-8B-Instruct --dry-run   # layers, output, memory, disk; no download\n"
        "  arm-int4 quantize --verify-only ./model-w4a8dyn-mse-channelwise",
    ),
    "tune": (
        TuneOptions,
        _cmd_tune,
        "sweep CPU binding, threads, eager vs compiled and batch size in vLLM; write the best as a profile",
        "examples:\n"
        "  arm-int4 tune ./SmolLM2-135M-Instruct-w4a8dyn-mse-channelwise     # best batch-1 decode\n"
        "  arm-int4 tune ./model --objective throughput --tpot-limit-ms 100 -b 1 4 16 --output m.json\n"
        "  arm-int4 tune ./model --modes eager -p 64 -n 32 -r 2                # quick: no compiled engine\n"
        "  arm-int4 serve --profile m.json ./model; arm-int4 bench --profile m.json ./model",
    ),
    "serve": (
        ServeOptions,
        _cmd_serve,
        "serve a model with vLLM's OpenAI-compatible server, env and engine args planned for this CPU",
        "examples:\n"
        "  arm-int4 serve ./SmolLM2-135M-Instruct-w4a8dyn-mse-channelwise\n"
        "  arm-int4 serve default --dry-run                  # print the plan as a shell snippet\n"
        "  arm-int4 serve meta-llama/Llama-3.1-8B-Instruct --dry-run   # from config.json + index, no download\n"
        "  arm-int4 serve ORG/NAME --dry-run --machine-dump tests/fixtures/machines/graviton4   # plan for that box\n"
        "  arm-int4 serve --port 8001 --kv-cache-gib 4 ./model -- --enforce-eager\n"
        "  arm-int4 serve --profile graviton4.json ./model\n"
        "  arm-int4 serve ./model --replicas 4 --dry-run      # 4 engines, one per CPU slice, behind vllm-router\n"
        "  arm-int4 serve ./model --replicas 2 --upstream http://10.0.0.2:8000   # + an engine on another host\n"
        "  arm-int4 serve ./model -- --data-parallel-size 2   # vLLM's own data parallel, one API server\n"
        "  arm-int4 serve ./model -- -pp 2 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # node 0 of 2\n"
        "  arm-int4 serve ./model --emit k8s --machine-dump tests/fixtures/machines/graviton4 > model.yaml",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="arm-int4",
        description="Hugging Face LLM to fast, accurate INT4 inference on Arm CPU servers with vLLM.",
        epilog="Run `arm-int4 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"arm-int4 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, (options_class, _handler, help_, epilog) in COMMANDS.items():
        sub.add_parser(
            name,
            options_class=options_class,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return parser


def parse(argv) -> tuple:
    """argv -> (parser, namespace): everything after the first `--` goes to vLLM untouched, as the
    command's vllm_args (refused for commands that start no vLLM)."""
    parser = build_parser()
    argv, passthrough = list(argv), None
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    ns = parser.parse_args(argv)
    if passthrough is not None:
        if not hasattr(ns, "vllm_args"):
            parser.error(f"arguments after -- are only for commands that start vLLM, not {ns.command or 'none'}")
        ns.vllm_args = passthrough
    return parser, ns


def command_options(argv):
    """A command line's options dataclass (ServeOptions, BenchOptions...), as the command receives it."""
    _, ns = parse(argv)
    return options_from_namespace(COMMANDS[ns.command][0], ns)


def main(argv=None) -> int:
    parser, ns = parse(sys.argv[1:] if argv is None else argv)
    if not ns.command:
        parser.print_help(sys.stderr)
        return 2
    options_class, handler, _help, _epilog = COMMANDS[ns.command]
    try:
        rc = handler(options_from_namespace(options_class, ns))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except ArmInt4Error as exc:
        print(f"arm-int4 {ns.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"arm-int4 {ns.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `arm-int4 info | head`: the reader left; no traceback (Python docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


def learning_path_main(argv=None) -> int:
    """scripts/quantize_vllm_models.py: Arm's script's interface over `arm-int4 quantize`."""
    parser = CommandParser(
        LearningPathOptions,
        prog="quantize_vllm_models.py",
        description="Quantize a model using INT4 with minmax or mse and dynamic activation quantization "
        "(Arm learning path interface; output ./{model}-w4a8dyn-{method}-{scheme}[-g{N}]).",
        epilog="example:\n  quantize_vllm_models.py deepseek-ai/DeepSeek-V2-Lite --scheme channelwise --method mse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opts = parser.parse_args(argv).to_quantize_options()
    try:
        return _cmd_quantize(opts)
    except ArmInt4Error as exc:
        print(f"quantize_vllm_models.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("quantize_vllm_models.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
