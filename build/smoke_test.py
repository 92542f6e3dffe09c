"""Smoke-test a freshly built vLLM CPU wheel: import, CPU platform, a W4A8 tiny model generating.

Run: PYTHONPATH=<repo> <scratch-venv>/bin/python build/smoke_test.py WORK_DIR
(scripts/build_vllm_cpu.sh runs it in a scratch venv holding only the new wheel and its
dependencies; arm_int4 comes from this checkout through PYTHONPATH, for its tiny-model builder
and quantizer.) Prints one JSON line "SMOKE {...}" on success; exits 1 with one line otherwise.
The model is random (plumbing, not accuracy): the check is that the W4A8 path loads and generates.
"""

import json
import os
import sys
import time

__all__ = ["main"]

MAX_TOKENS = 8


def main(argv) -> int:
    work = argv[0] if argv else "smoke"
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs little
    t0 = time.time()
    result = {}
    import vllm
    from vllm.platforms import current_platform

    result["vllm_version"] = vllm.__version__
    result["vllm_file"] = vllm.__file__
    result["platform"] = type(current_platform).__name__
    if not current_platform.is_cpu():
        print(f"smoke_test: vLLM {vllm.__version__} picked {result['platform']}, not the CPU platform",
              file=sys.stderr)
        return 1
    import vllm._C  # noqa: F401  the compiled CPU extension this build made

    result["import_s"] = round(time.time() - t0, 1)

    from arm_int4.options import QuantizeOptions
    from arm_int4.quantize import quantize
    from arm_int4.synthetic import build_random_llama

    t1 = time.time()
    base = build_random_llama(os.path.join(work, "tiny-llama"), "tiny", seed=0)
    q = quantize(QuantizeOptions(model=str(base), scheme="channelwise", method="minmax",
                                 output=os.path.join(work, "tiny-llama-w4a8"), overwrite=True))
    result["quantize_s"] = round(time.time() - t1, 1)

    from vllm import LLM, SamplingParams

    t2 = time.time()
    llm = LLM(model=str(q.output), enforce_eager=True, max_model_len=256, max_num_seqs=2, seed=0)
    out = llm.generate(["The build"], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                       use_tqdm=False)
    tokens = list(out[0].outputs[0].token_ids)
    result["generate_s"] = round(time.time() - t2, 1)
    result["tokens"] = len(tokens)
    if len(tokens) != MAX_TOKENS:
        print(f"smoke_test: the W4A8 model generated {len(tokens)} tokens, expected {MAX_TOKENS}", file=sys.stderr)
        return 1
    print("SMOKE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
