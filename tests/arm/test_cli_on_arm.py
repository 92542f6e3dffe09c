"""(6) The commands users run, `arm-int4 serve` and `arm-int4 eval`, inside the emulated aarch64
Python, on the groupwise + bias checkpoint, compared with the host's fp32 reference.

Run: ARM_INT4_REQUIRE_ARM=1 pytest tests/arm/test_cli_on_arm.py -m "requires_aarch64 and slow"

Slow (marked so; not in .ci/run's lane): each command starts more than one emulated process and
each pays an emulated vLLM import (74-86 s quiet, ~4 min on a loaded box). serve: the CLI, the API
server, and the engine core that vLLM spawns; eval: the CLI and its worker. Their children re-enter
qemu through the wrapper: it is the emulated Python's sys.executable (qemu -0), which is what
arm_int4's runner and launch.plan(python=sys.executable) start.
"""

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from arm_int4 import evaluate

from . import engine_models as em
from .arm_lane import REPO
from .test_vllm_engine import TOLERANCE

pytestmark = [pytest.mark.requires_aarch64, pytest.mark.slow]
LABEL = "bias-g32"
START_TIMEOUT = 1800  # s: two emulated vLLM imports on a box shared with other work


@pytest.fixture(scope="module")
def bias_ckpt(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("arm-cli")
    ckpt = em.build(root, tiny_llama, labels=(LABEL,))[LABEL]
    return ckpt, em.dequantized(ckpt, root / "ref")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=600):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_serve_answers_a_completion_over_http(bias_ckpt, arm_python, tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    ckpt, ref_dir = bias_ckpt
    port, log = _free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(arm_python),
                "-m",
                "arm_int4",
                "serve",
                str(ckpt),
                "--port",
                str(port),
                "--kv-cache-gib",
                "1",
                "--max-model-len",
                "256",
                "--",
                "--enforce-eager",
                "--max-num-seqs",
                "4",
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() - t0 < START_TIMEOUT, "serve was not ready:\n" + log.read_text()[-4000:]
            time.sleep(5)
        ready_s = time.monotonic() - t0
        ids = AutoTokenizer.from_pretrained(str(tiny_llama))("def main(argv):\n    return")["input_ids"]
        body = {
            "model": LABEL,
            "prompt": ids,
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": 5,
            "return_tokens_as_token_ids": True,
        }
        choice = _post(f"http://127.0.0.1:{port}/v1/completions", body)["choices"][0]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve forwards it to vLLM; then make sure
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    # the plan ran on the emulated Arm machine: the guard's dtype, the wrapper as the interpreter
    assert "dtype float32: groupwise W4A8 + Linear biases" in text, text[:3000]
    assert f"{arm_python} -m vllm.entrypoints" in text, text[:3000]
    assert "Using Dynamic4bitLinearKernel for CompressedTensorsW4A8Int" in text
    tokens = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
    ref = em.reference_logprobs(ref_dir, ids, tokens, 5)
    assert tokens == ref["greedy"], (tokens, ref["greedy"])
    diff = max(
        abs(lp - ref["steps"][t][int(k.split(":")[1])].item())
        for t, top in enumerate(choice["logprobs"]["top_logprobs"])
        for k, lp in top.items()
    )
    assert diff <= TOLERANCE["float32"], f"served logprobs differ from fp32 by {diff:.3g} (ready in {ready_s:.0f} s)"


def test_eval_perplexity_agrees_with_host_reference(bias_ckpt, arm_python):
    ckpt, ref_dir = bias_ckpt
    args = dict(num_tokens=48, max_len=32, stride=16)
    proc = subprocess.run(
        [
            str(arm_python),
            "-m",
            "arm_int4",
            "eval",
            str(ckpt),
            "--tasks",
            "perplexity",
            "--num-tokens",
            str(args["num_tokens"]),
            "--max-len",
            str(args["max_len"]),
            "--stride",
            str(args["stride"]),
            "--format",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)
    rec = next(r for r in (data if isinstance(data, list) else [data]) if "ppl" in r)
    # through the plan made on the emulated Arm machine: the bias guard's dtype (the record holds
    # plan.dtype once evaluate starts vLLM from launch.plan; before that it said "auto")
    assert rec["dtype"] == "float32", rec
    # the host: the same tokens and windows (arm_int4.evaluate), transformers fp32, same weights
    from transformers import AutoModelForCausalLM

    ids, bos = evaluate.tokenize(ckpt, evaluate.load_text(), args["num_tokens"])
    windows = evaluate.sliding_windows(ids, max_len=args["max_len"], stride=args["stride"], bos_id=bos)
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(model(torch.tensor([w.ids])).logits[0].double(), -1)
            for pos in range(max(w.score_from, 1), len(w.ids)):
                nll -= lp[pos - 1, w.ids[pos]].item()
                n += 1
    assert rec["scored_tokens"] == n
    # mean NLL per token: the fp32 engine's per-token logprob error is <= TOLERANCE["float32"]
    # (test_vllm_engine.py); the mean is well inside it
    assert abs(rec["nll"] - nll / n) <= TOLERANCE["float32"], (rec["nll"], nll / n, rec.get("dtype"))
    assert math.isclose(rec["ppl"], math.exp(rec["nll"]))
