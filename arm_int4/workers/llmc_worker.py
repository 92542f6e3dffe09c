"""Runs inside the quantization environment (llmcompressor); started by arm_int4.quantize.llmc.

Run (by arm_int4.runner only): QUANT_PYTHON arm_int4/workers/llmc_worker.py JOB.json RESULT.json
(standalone: imports nothing of arm_int4, only its stdlib-only sibling worker_io.py)
JOB.json = {"model": dir, "output": dir, "weights": {...}, "input_activations": {...}|null,
            "ignore": [...], "algorithm": "rtn"|"gptq", "cast_fp32": bool, "calibration": {...}},
           or a list of such jobs, run in turn in one process (llmcompressor's import is paid once).
Imports only the quantization environment's stack (no vLLM); writes `{"ok": ..., ...}` to RESULT.json.
"""

import json
import sys
import time

from worker_io import write_json_atomic  # sibling module (this script's dir)


def _calibration_dataset(job, tokenizer):
    """GPTQ calibration samples: a local .jsonl/.txt/.json file or a `datasets` id, rendered with
    the chat template when the model has one (the vLLM INT4 page's recipe)."""
    import datasets

    cal = job["calibration"]
    src = cal["dataset"]
    if src.endswith((".jsonl", ".json")):
        ds = datasets.load_dataset("json", data_files=src, split="train")
    elif src.endswith(".txt"):
        ds = datasets.load_dataset("text", data_files=src, split="train")
        ds = ds.filter(lambda r: r["text"].strip() != "")
    else:
        ds = datasets.load_dataset(src, split=cal.get("split") or "train")
    ds = ds.shuffle(seed=42).select(range(min(cal["num_samples"], len(ds))))

    def render(row):
        if "messages" in row and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        elif "messages" in row:  # a base model: the turns' contents as plain text
            text = "\n\n".join(m["content"] for m in row["messages"])
        elif "text" in row:
            text = row["text"]
        else:
            raise ValueError(f"calibration rows need a 'text' or 'messages' field; got {sorted(row)}")
        return tokenizer(text, max_length=cal["max_seq_len"], truncation=True, add_special_tokens=False)

    return ds.map(render, remove_columns=ds.column_names)


def run(job):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    if job.get("cast_fp32"):
        model = model.to(torch.float32)  # the learning path's flow
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    inputs = job.get("input_activations")
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**job["weights"]),
        input_activations=QuantizationArgs(**inputs) if inputs else None,
        output_activations=None,
    )
    kwargs = {}
    if job["algorithm"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        cal = job["calibration"]
        recipe = GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=job["ignore"],
            dampening_frac=cal["dampening_frac"],
            actorder=None if cal["actorder"] == "none" else {"weight": "static", "group": "group"}[cal["actorder"]],
        )
        kwargs = dict(
            dataset=_calibration_dataset(job, tokenizer),
            num_calibration_samples=cal["num_samples"],
            max_seq_length=cal["max_seq_len"],
        )
    else:
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=job["ignore"])
    oneshot(model=model, recipe=recipe, tokenizer=tokenizer, **kwargs)
    model.save_pretrained(job["output"], save_compressed=True)
    tokenizer.save_pretrained(job["output"])
    return {"ok": True, "seconds": round(time.time() - t0, 3)}


def main(argv):
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    results = []
    for one in job if isinstance(job, list) else [job]:
        try:
            results.append(run(one))
        except Exception as exc:  # reported to the parent as one line; the traceback goes to stderr
            import traceback

            traceback.print_exc()
            results.append({"ok": False, "error": f"{one['model']}: {type(exc).__name__}: {exc}".splitlines()[0]})
            break
    result = (
        results[0]
        if len(results) == 1 and not isinstance(job, list)
        else {
            "ok": all(r["ok"] for r in results) and len(results) == len(job),
            "error": next((r["error"] for r in results if not r["ok"]), None),
            "results": results,
        }
    )
    write_json_atomic(argv[2], result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
