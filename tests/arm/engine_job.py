"""One emulated vLLM engine process (vllm_engine.py) over a list of checkpoints, and how its top-K
logprobs are scored against the host's fp32 reference: shared by test_vllm_engine.py and
test_neoverse_n1.py (conftest.engine_run runs the main job once per session)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from . import engine_models as em
from .arm_lane import ARM_DIR, describe, run_json
from .vllm_engine import MARK

__all__ = ["CONTROL", "MAX_TOKENS", "PROMPT", "TOP_K", "W4A16", "run", "scores", "seed_model_info_cache"]

DRIVER = ARM_DIR / "vllm_engine.py"
PROMPT = "def main(argv):\n    return"
MAX_TOKENS, TOP_K = 8, 5
CONTROL = "bias-g32-bf16"
W4A16 = [label for label, (_, opts) in em.MODELS.items() if opts.get("preset") == "w4a16"]


def seed_model_info_cache() -> None:
    """vLLM inspects a model class in a subprocess (a second emulated vLLM import, ~2.5 min) unless
    ~/.cache/vllm/modelinfos has it, keyed by the model file's hash. The x86 and aarch64 wheels ship
    the same Python source, so the host fills that cache in ~15 s."""
    code = (
        "from vllm.model_executor.models.registry import ModelRegistry as R\n"
        "for a in ('LlamaForCausalLM', 'Qwen3MoeForCausalLM'): assert R._try_inspect_model_cls(a), a"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def run(arm_python: Path, root: Path, ids: list, models: list, env: dict | None = None) -> tuple[dict, dict]:
    """Run the models one after the other in one emulated vLLM process; (the driver's JSON, label ->
    result with its slice of vLLM's log under "log")."""
    job = root / "job.json"
    job.write_text(
        json.dumps(
            {"prompt_ids": ids, "max_tokens": MAX_TOKENS, "logprobs": TOP_K, "max_model_len": 256, "models": models}
        )
    )
    proc, data = run_json([arm_python, DRIVER, job], env=env, timeout=1500)
    assert data is not None, "the emulated vLLM engine run failed: " + describe(proc)
    (root / "engine-run.json").write_text(json.dumps(data))  # kept with pytest's tmp dirs, for a look
    results = {r["label"]: r for r in data["results"]}
    # vLLM logs to stdout; vllm_engine.py prints a marker line before each model
    for chunk in proc.stdout.split(MARK)[1:]:
        label, _, text = chunk.partition("\n")
        if label in results:
            results[label]["log"] = text
    return data, results


def scores(res: dict, ref_dir: Path, prompt: list) -> tuple[float, float, list]:
    """Max |logprob difference| over vLLM's top-K per step, and the reference's margin at each
    step between its best token and the token vLLM chose (0 where they agree)."""
    ref = em.reference_logprobs(ref_dir, prompt, res["tokens"], TOP_K)
    diffs, margins = [], []
    for t, (step, tok) in enumerate(zip(res["logprobs"], res["tokens"], strict=False)):
        row = ref["steps"][t]
        diffs += [abs(lp - row[int(k)].item()) if math.isfinite(lp) else math.inf for k, lp in step.items()]
        margins.append(row.max().item() - row[tok].item())
    return max(diffs), max(margins), ref["greedy"]
