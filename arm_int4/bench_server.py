"""`arm-int4 bench --server URL`: time a running OpenAI-compatible (vLLM) server over HTTP.

`batch` = concurrent clients, one thread and one streamed /v1/completions request each. Prompts
are token ids (drawn from what the server's /tokenize returns for a fixed word list, untimed), so
the client never tokenizes; HTTP, SSE framing and the server's detokenization are inside the
timings. Records are the same arm_int4.report.Record as offline bench, mode="server".
"""

import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from typing import Callable

from . import bandwidth, hardware, models
from .checkpoint import FLOAT_BYTES, kv_bytes_per_token, read_checkpoint
from .errors import ArmInt4Error, RunError, UsageError
from .report import Record
from .workload import (
    SERVER_EXCLUDED,
    Test,
    Workload,
    bytes_per_step,
    environment,
    fill_record,
    kernel_note,
    model_bytes,
    quant_label,
    short,
    to_stderr,
)

__all__ = ["run_server"]


def _http_json(host: str, port: int, method: str, path: str, body=None, timeout: float = 60.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            method,
            path,
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"} if body is not None else {},
        )
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RunError(
                f"{method} http://{host}:{port}{path} answered HTTP {resp.status}: "
                f"{data[:200].decode('utf-8', 'replace')}"
            )
        return json.loads(data)
    except (OSError, ValueError) as exc:
        raise RunError(f"{method} http://{host}:{port}{path} failed: {exc}") from None
    finally:
        conn.close()


def _stream_one(host, port, path, model, ids, gen, timeout, out, i) -> None:
    """One streamed completion; out[i] = timings (seconds, perf_counter) or the exception.

    The server may merge several tokens into one chunk (vLLM does when its output queue is not
    drained fast enough), so chunks carry their token ids (return_token_ids, a vLLM extension;
    one token per chunk is assumed without it) and TPOT = time from the first chunk to the last /
    tokens after the first chunk."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RunError(f"POST {path} answered HTTP {resp.status}: {resp.read()[:200].decode('utf-8', 'replace')}")
        first: float | None = None
        last = 0.0
        n = in_first = 0
        for raw in resp:  # server-sent events: `data: {json}` lines, then `data: [DONE]`
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now, chunk = time.perf_counter(), json.loads(data)
            k = sum(len(c.get("token_ids") or [None]) for c in chunk.get("choices") or [] if c.get("text") is not None)
            if k:
                if first is None:
                    first, in_first = now, k
                n, last = n + k, now
        if first is None:
            raise RunError(f"POST {path}: the stream carried no tokens")
        out[i] = {
            "t0": t0,
            "end": time.perf_counter(),
            "ttft_s": first - t0,
            "tpot_s": (last - first) / (n - in_first) if n > in_first else None,
            "gen_tokens": n,
        }
    except Exception as exc:  # handed to the caller's thread, which records it
        out[i] = exc
    finally:
        conn.close()


def _server_round(host, port, path, model, pool, test: Test, rng, timeout) -> dict:
    """`batch` concurrent streamed requests (one thread each); worker-format timings."""
    prompts = [[rng.choice(pool) for _ in range(test.prompt)] for _ in range(test.batch)]
    out: list = [None] * test.batch
    threads = [
        threading.Thread(target=_stream_one, args=(host, port, path, model, ids, test.gen, timeout, out, i))
        for i, ids in enumerate(prompts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in out if isinstance(o, BaseException)]
    if errors:
        raise errors[0] if isinstance(errors[0], ArmInt4Error) else RunError(f"request failed: {errors[0]}")
    return {
        "wall_s": max(o["end"] for o in out) - min(o["t0"] for o in out),
        "ttft_s": [o["ttft_s"] for o in out],
        "tpot_s": [o["tpot_s"] for o in out],
        "gen_tokens": [o["gen_tokens"] for o in out],
    }


def run_server(
    url: str,
    workload: Workload = Workload(),
    *,
    model_dir=None,
    timeout: float = 600.0,
    progress: Callable[[str], None] = to_stderr,
) -> list:
    """Time a running OpenAI-compatible (vLLM) server: `batch` = concurrent clients. Prompts are
    token ids drawn from what the server's /tokenize returns for a fixed word list (untimed).
    GB/s needs the checkpoint: `model_dir`, or the server's model root when it is a local dir."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise UsageError(f"--server {url}: give the http://HOST:PORT URL of an OpenAI-compatible server")
    host, port, prefix = u.hostname, u.port or 80, u.path.rstrip("/").removesuffix("/v1")
    machine = hardware.detect()
    env = environment(machine)
    listed = _http_json(host, port, "GET", prefix + "/v1/models").get("data") or []
    if not listed:
        raise RunError(f"{url} serves no model (/v1/models is empty)")
    model_id, root = listed[0]["id"], listed[0].get("root")
    local = model_dir or (root if root and os.path.isfile(os.path.join(str(root), "config.json")) else None)
    facts = read_checkpoint(models.resolve(str(local), progress=progress)) if local else None
    words = random.Random(0)
    text = " ".join(
        "".join(words.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(words.randint(2, 9))) for _ in range(3000)
    )
    tokens = _http_json(host, port, "POST", prefix + "/tokenize", {"model": model_id, "prompt": text})["tokens"]
    pool = sorted(set(tokens))
    bw = None
    if facts and host in ("127.0.0.1", "localhost", "::1"):  # the server runs on this machine
        bw = bandwidth.machine_bandwidth(machine, progress=progress)["triad_gbs"]
    dtype = facts.config_dtype if facts and facts.config_dtype in FLOAT_BYTES else "bfloat16"
    notes = ["server mode: the client runs on the same CPUs as a local server"] if bw else []
    note = kernel_note(facts, machine) if facts and bw else None
    if note:
        notes.append(note)
    rng, records = random.Random(workload.seed), []
    for t in workload.tests():
        rec = Record(
            model=url,
            model_name=model_id,
            quantization=quant_label(facts) if facts else None,
            quantized=bool(facts and facts.quant_method),
            test=t.name,
            prompt_tokens=t.prompt,
            gen_tokens=t.gen,
            batch=t.batch,
            mode="server",
            repetitions=workload.repetitions,
            warmup=workload.warmup,
            excluded=SERVER_EXCLUDED,
            notes=notes,
            bandwidth_gbs=bw,
            **env,
        )
        if facts:
            rec.model_bytes, rec.kv_bytes_per_token = model_bytes(facts.path), kv_bytes_per_token(facts, dtype)
            rec.bytes_per_step = bytes_per_step(facts, dtype, machine.arch, t.batch, t.prompt + t.gen / 2)
        try:
            for _ in range(workload.warmup):
                _server_round(host, port, prefix + "/v1/completions", model_id, pool, t, rng, timeout)
            reps = [
                _server_round(host, port, prefix + "/v1/completions", model_id, pool, t, rng, timeout)
                for _ in range(workload.repetitions)
            ]
            fill_record(rec, reps, rec.bytes_per_step if bw else None, bw)
            rec.cached_tokens = None  # not reported over HTTP
            progress(
                f"{model_id} @ {url}: {t.name}: decode {short(rec.decode_tok_s)} tok/s, TTFT {short(rec.ttft_ms)} ms"
            )
        except ArmInt4Error as exc:
            rec.error = str(exc)
            progress(f"{model_id} @ {url}: {t.name}: failed: {exc}")
        records.append(rec)
    return records
