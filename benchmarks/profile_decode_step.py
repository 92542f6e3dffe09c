#!/usr/bin/env python3
"""Where one vLLM CPU decode step's time goes at batch 1 (the evidence beside `bench --vs-llamacpp`).

Run: flock /tmp/arm-int4-cpu.lock .venv/bin/python benchmarks/profile_decode_step.py
     [MODEL=default] [--eager] [--threads 1] [-p 128] [-n 64] [--top 12]

One vLLM engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the engine core's work is
visible to the profiler), pinned like `arm-int4 serve` plans it. One untimed warm-up request, then
one request of P random token ids generating N tokens under torch.profiler (CPU activity). It prints
- wall time per generated token (the request's wall clock / N);
- the model forward's share: the profiler's total for vLLM's model-runner forward ranges and the
  top aten/oneDNN ops by self CPU time, per generated token;
- the rest (scheduler, input preparation, sampling, output processing, Python) = wall - forward.
Figures are per token and include the prefill step once (amortised over N).
"""

import argparse
import os
import random
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (default: vLLM's compiled mode)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads (pinned to CPUs 0..threads-1)")
    ap.add_argument("-p", "--prompt", type=int, default=128)
    ap.add_argument("-n", "--gen", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"  # vLLM's "gpu_model_runner: forward/sample/..." ranges
    from arm_int4 import models

    path = str(models.resolve(args.model, progress=lambda m: print(m, file=sys.stderr)))
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=path,
        dtype="bfloat16",
        max_model_len=args.prompt + args.gen,
        enforce_eager=args.eager,
        max_num_seqs=4,
        seed=0,
    )
    tok = llm.get_tokenizer()
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.gen, ignore_eos=True, temperature=0.0, detokenize=False)

    def one():
        return llm.generate(
            [{"prompt_token_ids": [rng.choice(pool) for _ in range(args.prompt)]}], params, use_tqdm=False
        )

    one()  # warm-up
    t0 = time.perf_counter()
    one()
    plain = (time.perf_counter() - t0) / args.gen
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        one()
        wall = time.perf_counter() - t0
    n = args.gen
    events = prof.key_averages()
    ranges = sorted((e for e in events if e.key.startswith("gpu_model_runner:")), key=lambda e: -e.cpu_time_total)
    print(
        f"# {os.path.basename(path)}, {'eager' if args.eager else 'compiled'}, {args.threads} thread(s), "
        f"torch {torch.__version__}; prompt {args.prompt}, {n} tokens, batch 1"
    )
    print(f"wall per token without profiler: {plain * 1e3:.2f} ms ({1 / plain:.1f} tok/s)")
    print(f"wall per token under profiler:   {wall / n * 1e3:.2f} ms")
    print("vLLM model-runner ranges (per generated token; % of wall):")
    for e in ranges:
        print(
            f"  {e.key[:48]:48s} {e.count / n:6.1f} calls {e.cpu_time_total / 1e3 / n:7.3f} ms "
            f"{e.cpu_time_total / 1e6 / wall * 100:5.1f}%"
        )
    runner = sum(e.cpu_time_total for e in ranges if e.key.count(":") == 1)
    print(
        f"  outside the model runner (scheduler, engine core loop, output processing): "
        f"{max(0.0, wall - runner / 1e6) / n * 1e3:.3f} ms per token (ranges may nest: an estimate)"
    )
    ops = sorted(
        (e for e in events if e.key.startswith(("aten::", "onednn", "mkldnn", "_C::", "vllm", "torch_"))),
        key=lambda e: -e.self_cpu_time_total,
    )[: args.top]
    print("top ops by self CPU time (per generated token; % of wall):")
    for e in ops:
        print(
            f"  {e.key[:48]:48s} {e.count / n:6.1f} calls {e.self_cpu_time_total / 1e3 / n:7.3f} ms "
            f"{e.self_cpu_time_total / 1e6 / wall * 100:5.1f}%"
        )
    total_ops = sum(e.self_cpu_time_total for e in events if e.key.startswith(("aten::", "_C::", "onednn", "mkldnn")))
    print(
        f"all aten/_C/oneDNN ops, self CPU: {total_ops / 1e3 / n:.2f} ms per token "
        f"({total_ops / 1e6 / wall * 100:.0f}% of wall); the rest is Python: scheduler, input preparation, "
        "sampling glue, output processing"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
