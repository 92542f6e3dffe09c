"""Load checkpoints in vLLM (CPU), one after the other in one process, and report greedy generations,
prompt-token ranks and the linear kernel vLLM put on the model, as JSON.

Run: python tests/helpers/vllm_generate.py JOB.json OUT.json   (vLLM logs to stdout too, so the
result goes to a file)
JOB = {"prompts": [str],
       "runs": [{"label": str, "model": dir, "max_tokens": int, "logprobs": int | null,
                 "score": [[token ids]] | null, "score_from": label | null,
                 "env": {arm_int4 launch plan's env (EngineSpec.env)},
                 "engine_kwargs": {LLM kwargs from the plan (EngineSpec.to_llm_kwargs())}}]}
OUT = {label: {"texts", "token_ids", "prompt_token_ids", "logprobs"?, "ranks"?, "linear", "layers", "log"?} | {"error"}}
"layers": every Linear-like module vLLM built → {"scheme": its compressed-tensors scheme class or
None (unquantized), "group_size": the scheme's (-1 channelwise)}.

Each run applies its plan's env, then LLM(model, **engine_kwargs), and after it vLLM's
cleanup_dist_env_and_memory() before the next. VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine
core in this process, so vLLM is imported once for the whole job (the caller's test pays one
import instead of two per checkpoint). vLLM prints a marker line before each run's log lines
(MARK + label) so the caller can split stdout per run.
`score` asks for teacher-forced ranks: each sequence is fed as a prompt and vLLM returns, per
position, the rank of the given token under this model (1 = it is this model's top-1 choice).
`score_from` scores the prompts + greedy tokens of an earlier run of the same job.
`logprobs` = n adds, per prompt and generated position, the top-n tokens' logprobs ({token id: logprob}).
"""

import gc
import json
import os
import sys

MARK = "### arm-int4 vllm_generate run: "


def linear_layers(model) -> dict:
    """Per Linear module vLLM built (qkv_proj, gate_up_proj… as fused): its scheme and group size."""
    from vllm.model_executor.layers.linear import LinearBase

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase):
            continue
        scheme = getattr(mod, "scheme", None)
        out[name] = {
            "scheme": type(scheme).__name__ if scheme is not None else None,
            "group_size": getattr(scheme, "group_size", None),
        }
    return out


def linear_kernel(model) -> dict:
    """The scheme and kernel vLLM put on the first quantized Linear (after loading), else {}."""
    for name, mod in model.named_modules():
        scheme = getattr(mod, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is not None:
            return {"layer": name, "scheme": type(scheme).__name__, "kernel": type(kernel).__name__}
    return {}


def run_one(LLM, SamplingParams, run, prompts, earlier) -> dict:
    llm = LLM(model=run["model"], seed=0, **run["engine_kwargs"])
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], logprobs=run.get("logprobs"))
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        result = {
            "texts": [o.outputs[0].text for o in outs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
            "linear": llm.apply_model(linear_kernel)[0],
            "layers": llm.apply_model(linear_layers)[0],
        }
        if run.get("logprobs"):
            result["logprobs"] = [
                [{str(tok): lp.logprob for tok, lp in pos.items()} for pos in o.outputs[0].logprobs] for o in outs
            ]
        score = run.get("score")
        if run.get("score_from"):
            base = earlier[run["score_from"]]
            score = [p + g for p, g in zip(base["prompt_token_ids"], base["token_ids"], strict=True)]
        if score:
            sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
            scored = llm.generate([{"prompt_token_ids": ids} for ids in score], sp, use_tqdm=False)
            # prompt_logprobs[0] is None (no context); entry i maps token ids to Logprob(rank=…)
            result["ranks"] = [
                [lp[tok].rank for tok, lp in zip(ids[1:], o.prompt_logprobs[1:], strict=True)]
                for ids, o in zip(score, scored, strict=True)
            ]
        return result
    finally:
        # the engine must be gone before the process groups are: a late __del__ would tear down the next one's
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main(path, out_path):
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM is imported
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    results: dict = {}
    for run in job["runs"]:
        print(MARK + run["label"], flush=True)
        os.environ.update(run.get("env", {}))
        try:
            results[run["label"]] = run_one(LLM, SamplingParams, run, job["prompts"], results)
        except Exception as e:  # recorded; the next run still goes
            results[run["label"]] = {"error": f"{type(e).__name__}: {e}"[:3000]}
        finally:
            cleanup_dist_env_and_memory()
    print(MARK + "(end)", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: vLLM 0.32 sometimes aborts there ("terminate called without an
    # active exception", SIGABRT) after the work is done. arm_int4/workers/perplexity_worker.py does
    # the same.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
