"""Load a checkpoint in vLLM (CPU) and report greedy generations and prompt-token ranks as JSON.

Run: python tests/helpers/vllm_generate.py JOB.json OUT.json   (vLLM logs to stdout too, so the
result goes to a file)
JOB = {"model": dir, "prompts": [str], "max_tokens": int, "score": [[token ids]] | null,
       "engine_kwargs": {LLM kwargs from arm_int4's launch plan (Plan.engine_kwargs())}}
The caller runs it with the plan's environment (runner.process_env(plan)).
`score` asks for teacher-forced ranks: each sequence is fed as a prompt and vLLM returns, per
position, the rank of the given token under this model (1 = it is this model's top-1 choice).
"""

import json
import os
import sys


def main(path, out_path):
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], seed=0, **job["engine_kwargs"])
    greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    outs = llm.generate(job["prompts"], greedy, use_tqdm=False)
    result = {
        "texts": [o.outputs[0].text for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
    }
    if job.get("score"):
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        scored = llm.generate([{"prompt_token_ids": ids} for ids in job["score"]], sp, use_tqdm=False)
        ranks = []
        for ids, o in zip(job["score"], scored, strict=False):
            # prompt_logprobs[0] is None (no context); entry i maps token ids to Logprob(rank=…)
            ranks.append([lp[tok].rank for tok, lp in zip(ids[1:], o.prompt_logprobs[1:], strict=False)])
        result["ranks"] = ranks
    with open(out_path, "w") as f:
        json.dump(result, f)
    return llm


if __name__ == "__main__":
    llm = main(sys.argv[1], sys.argv[2])
    # Stop the engine core and worker while the interpreter is intact, then skip interpreter
    # teardown: vLLM 0.32 sometimes aborts there ("terminate called without an active exception",
    # SIGABRT) after the work is done. arm_int4/workers/perplexity_worker.py does the same.
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
