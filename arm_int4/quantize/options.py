"""QuantizeOptions: every setting of `arm-int4 quantize`, its default and its help, written once.

The quantizer's own input (arm_int4.quantize.quantize takes it), kept here so the library does not
import the command layer; arm_int4.options re-exports it for the CLI, which builds `--help` from it.
No `from __future__ import annotations`: argparse-dataclass reads the real field types.
"""

from dataclasses import dataclass
from typing import List, Literal, Optional

from ..fields import opt, positional

__all__ = ["QuantizeOptions"]


@dataclass
class QuantizeOptions:
    model: str = positional(
        "model", "a local Hugging Face model dir, a hub id, or 'default' (the packaged SmolLM2-135M)", metavar="MODEL"
    )
    scheme: Literal["channelwise", "groupwise"] = opt(
        "channelwise", "weight granularity: one scale per output channel, or per group of --groupsize inputs"
    )
    method: Literal["minmax", "mse"] = opt(
        "mse", "weight observer: minmax (fast) or mse (searches a clipping range; the learning path's default)"
    )
    groupsize: Optional[int] = opt(
        None,
        "input features per scale for --scheme groupwise, a multiple of 32 (default: 32 for w4a8, the "
        "learning path's; 128 for w4a16, the vLLM INT4 page's)",
        metavar="N",
    )
    preset: Literal["w4a8", "w4a16"] = opt(
        "w4a8", "w4a8: INT8 dynamic per-token activations (Arm KleidiAI path); w4a16: weights only"
    )
    algorithm: Literal["rtn", "gptq"] = opt(
        "rtn", "rtn: round to nearest, data-free; gptq: error-correcting, calibrated on --dataset"
    )
    dataset: Optional[str] = opt(
        None,
        "calibration data for gptq: a local .jsonl/.txt file or a datasets id (default: the packaged "
        "offline set, 512 chat rows of public-domain prose; use text like your traffic for real models)",
        metavar="FILE|ID",
    )
    num_samples: int = opt(512, "calibration samples for gptq")
    max_seq_len: int = opt(2048, "longest calibration sample, in tokens")
    dampening_frac: float = opt(0.01, "gptq: fraction of the Hessian diagonal added for stability")
    actorder: Literal["weight", "group", "none"] = opt("weight", "gptq activation ordering")
    ignore: List[str] = opt(["lm_head"], "module names (or re:regex) left unquantized", nargs="+", metavar="NAME")
    # default from measured perplexity (docs/quantize.md): weight beat fp32 on SmolLM2 in both schemes
    observer_precision: Literal["fp32", "weight"] = opt(
        "weight",
        "dtype of the observer math and of the written scales: weight (the weight's own dtype, e.g. "
        "bf16 scales) or fp32 (the learning path's: it casts the model to fp32 first; same int values "
        "and fp32 scales as its script); unquantized tensors keep their dtype either way",
    )
    jobs: Optional[int] = opt(
        None,
        "tensors quantized at once by the stream engine (threads; each holds one tensor; default: the CPUs "
        "this process may use: affinity, cgroup cpuset and CPU quota)",
        metavar="N",
    )
    engine: Optional[str] = opt(
        None,
        "stream: tensor by tensor, low memory (default for rtn); llmcompressor: the reference "
        "engine in the quantization environment (default for gptq)",
        choices=("stream", "llmcompressor"),
    )
    output: Optional[str] = opt(None, "output dir (default: ./{model}-w4a8dyn-{method}-{scheme}[-g{N}])", metavar="DIR")
    overwrite: bool = opt(False, "replace an existing output dir")
    budget: Optional[float] = opt(
        None,
        "choose a W4A8 scheme per Linear (channelwise, g128, g64, g32, or BF16 as the last resort) for the "
        "smallest model within PCT%% perplexity of MODEL: sensitivity measured per layer on the packaged "
        "calibration text, the result checked through vLLM on the search part of the packaged text "
        "(opticks-search) and reported on the held-out part too (opticks-heldout, what eval scores; "
        "docs/accuracy.md)",
        metavar="PCT",
    )
    budget_tokens: int = opt(
        512,
        "calibration tokens for --budget's per-layer sensitivity (its time grows with them: one pass per unit "
        "and candidate, from the unit's layer to the LM head; the estimate is printed before it starts)",
        metavar="N",
    )
    budget_max_minutes: float = opt(
        60.0,
        "stop before --budget's per-layer sensitivity pass when its estimate exceeds this (a pass measured "
        "before is reused from the cache at no cost)",
        metavar="MIN",
    )
    budget_eval_tokens: int = opt(
        4096,  # = evaluate.NUM_TOKENS (not imported here: the library must not load the eval command)
        "tokens --budget's vLLM check scores on each part of the packaged text, search and held-out "
        "(arm-int4 eval's default; fewer is faster on x86, where W4A8 runs vLLM's slow reference kernel)",
        metavar="N",
    )
    keep_best: bool = opt(
        False, "with --budget: when no choice meets the budget through vLLM, keep the closest (still exits 1)"
    )
    rotate: bool = opt(
        False,
        "before quantizing, rotate the residual stream and each head's values with randomized Hadamard "
        "matrices fused into the weights (QuaRot/SpinQuant R1+R2: exact in float, fewer outliers for INT4; "
        "Llama/Mistral/Qwen2; tied embeddings are untied: +1 embedding matrix); output name gets -rot",
    )
    dry_run: bool = opt(
        False,
        "print the plan (layers, output size, memory, disk: download + output, free space) and exit; a hub id "
        "is planned from its config.json and safetensors index, no weights downloaded; exit 1 if the disk is short",
    )
    verify_only: bool = opt(False, "only check MODEL (a quantized dir) against its quantization_config")
    eval: bool = opt(
        False,
        "after quantizing, run the quick offline check: perplexity of the new dir vs MODEL "
        "through vLLM (arm-int4 eval --num-tokens 256), and print the delta",
    )
