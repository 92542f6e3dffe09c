"""vLLM's own offline engine, started through arm_int4's launch plan, on several checkpoints in one
process; prints one JSON line (last stdout line).

Run: "$(scripts/arm_emulation.sh --print)" tests/arm/vllm_engine.py JOB.json   (emulated aarch64)
JOB.json: {"prompt_ids": [int], "max_tokens": N, "logprobs": K, "max_model_len": L,
           "models": [{"label": str, "path": dir, "dtype": null or a dtype forced over the plan's,
                       "despite_plan": run vLLM even where the plan refuses the checkpoint (a control)}]}

For each model: plan = launch.plan(hardware.detect(), read_checkpoint(dir), ...), plan.env goes
into os.environ, LLM(model=dir, **plan.to_llm_kwargs(), enforce_eager=True) (eager: compiling
under emulation would take minutes), greedy generation with top-K logprobs, the classes vLLM put
on the quantized layers, then vLLM's cleanup_dist_env_and_memory() before the next model.
VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in this process: importing vLLM costs
~80 s emulated, and a spawned engine core would pay it again.
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

MARK = "### arm-int4 vllm_engine model: "  # precedes each model's vLLM log lines on stdout


def bias_error(mod, kernel) -> dict:
    """The bias as vLLM's packed layer applies it: the kernel on activations ~1e-3 (so x @ W is
    ~1e-4) against the layer's bias parameter (kept as loaded for groupwise layers, an fp32 copy for
    channelwise ones). Largest error and how many output channels are off by more than 0.5."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = (1e-3 * torch.randn(4, kernel.config.partition_weight_shape[0], generator=g)).to(mod.bias.dtype)
    err = (kernel.apply_weights(mod, x).double() - mod.bias.double()).abs().amax(dim=0)
    bad = (~torch.isfinite(err)) | (err > 0.5)
    return {
        "layer_dtype": str(mod.bias.dtype),
        "max_abs": float(err.nan_to_num(float("inf")).max()),
        "channels_off": int(bad.sum()),
        "channels": int(err.numel()),
        "first_off": bad.nonzero().flatten()[:8].tolist(),
    }


def layer_facts(model) -> dict:
    """What vLLM put on the model after process_weights_after_loading: the linear kernel and the
    packed weight of the first W4A8 Linear, the bias as the first biased one applies it, the MoE
    method and experts class of the first MoE."""
    out = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is not None and getattr(mod, "bias", None) is not None and "bias" not in out:
            out["bias"] = {"layer": name, **bias_error(mod, kernel)}
        if kernel is not None and "linear" not in out:
            w = getattr(mod, kernel.w_q_name)
            out["linear"] = {
                "layer": name,
                "scheme": type(scheme).__name__,
                "kernel": type(kernel).__name__,
                "kernel_module": type(kernel).__module__,
                "packed_dtype": str(w.dtype),
                "packed_numel": w.numel(),
                "bias": getattr(mod, "bias", None) is not None,
            }
        qm = getattr(mod, "quant_method", None)
        if qm is not None and hasattr(qm, "experts_cls") and "moe" not in out:
            out["moe"] = {
                "layer": name,
                "method": type(qm).__name__,
                "experts": getattr(qm.experts_cls, "__name__", str(qm.experts_cls)),
            }
    return out


def main(job_path):
    job = json.loads(Path(job_path).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM is imported
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # the plan sets it too; vLLM may pick a platform earlier
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's arm_int4
    t0 = time.time()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    from arm_int4 import hardware, launch
    from arm_int4.checkpoint import read_checkpoint
    from arm_int4.errors import PreflightError

    timings = {"import_s": round(time.time() - t0, 1)}
    machine = hardware.detect()
    probe = {
        "machine": machine.arch,
        "cpu_name": machine.cpu_name,
        "torch": torch.__version__,
        "kleidiai": bool(torch.backends.kleidiai.is_available()),
    }
    results = []
    for m in job["models"]:
        res = {"label": m["label"]}
        results.append(res)
        print(MARK + m["label"], flush=True)
        llm = None
        try:
            t = time.time()
            try:
                request = launch.EngineRequest(max_model_len=job["max_model_len"], kv_cache_gib=1)
                plan = launch.plan(machine, read_checkpoint(m["path"]), request)
            except PreflightError as e:  # the plan refused this checkpoint here
                res["plan_refused"] = str(e)
                if not m.get("despite_plan"):
                    continue
                plan = None
            if plan is None:  # a control: vLLM on the checkpoint the plan refused, its own defaults
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
                kwargs = {"max_model_len": job["max_model_len"], "enforce_eager": True}
            else:
                os.environ.update(plan.env)
                kwargs = {**plan.to_llm_kwargs(), "enforce_eager": True}
                res.update(plan_dtype=plan.dtype, plan_env=plan.env, plan_reasons=list(plan.reasons))
            if m.get("dtype"):
                kwargs["dtype"] = m["dtype"]  # the control: deliberately not the plan's choice
            res["engine_kwargs"] = kwargs
            llm = LLM(model=m["path"], seed=0, **kwargs)
            res["init_s"] = round(time.time() - t, 1)
            t = time.time()
            params = SamplingParams(
                temperature=0.0, max_tokens=job["max_tokens"], logprobs=job["logprobs"], ignore_eos=True
            )
            out = llm.generate([TokensPrompt(prompt_token_ids=job["prompt_ids"])], params, use_tqdm=False)[0].outputs[0]
            res["generate_s"] = round(time.time() - t, 1)
            res["tokens"] = list(out.token_ids)
            # per step: {token id: logprob} of the top-K (+ the chosen token)
            res["logprobs"] = [{str(k): v.logprob for k, v in step.items()} for step in out.logprobs]
            res["layers"] = llm.apply_model(layer_facts)[0]
            res["model_dtype"] = str(llm.llm_engine.model_config.dtype)
        except Exception as e:  # recorded; the next model still runs
            res["error"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            # the engine must be gone before the groups are: a late __del__ would tear down the next one's
            llm = None
            gc.collect()
            cleanup_dist_env_and_memory()
    print(MARK + "(end)", flush=True)
    print(json.dumps({"probe": probe, "timings": timings, "results": results}), flush=True)
    os._exit(0)  # skip interpreter teardown: vLLM can abort at exit after a finished run


if __name__ == "__main__":
    main(sys.argv[1])
