"""A Hugging Face hub on 127.0.0.1 for tests: the answers huggingface_hub 2.4 reads, no internet.

What it serves, as huggingface.co does (huggingface_hub/file_download.py get_hf_file_metadata,
utils/_http.py hf_raise_for_status, hf_api.py list_repo_tree):
- HEAD/GET /{org}/{name}/resolve/{rev}/{path}: 200 with X-Repo-Commit and ETag (Content-Length;
  for a file given by size only, HEAD answers X-Linked-Size and GET is refused);
- a gated repo without a token: 401, X-Error-Code: GatedRepo; with a token it does not accept: 403;
- a missing repo: 401 with X-Error-Code: RepoNotFound, as the hub answers a caller without a token
  (404 with one); a missing file: 404, X-Error-Code: EntryNotFound;
- GET /api/models/{org}/{name}/tree/{rev}: the file listing snapshot_download reads.
Every request is recorded as (method, path) in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict = field(default_factory=dict)  # path -> bytes
    sizes: dict = field(default_factory=dict)  # path -> size of a file served by HEAD only (never its body)
    gated: bool = False
    tokens: tuple = ()  # tokens given access to a gated repo


class FakeHub:
    def __init__(self, repos: dict):
        self.repos = repos
        self.requests: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, head=True)

            def do_GET(self):
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def paths(self, method: str | None = None) -> list:
        return [p for m, p in self.requests if method in (None, m)]

    def _send(self, h, status: int, headers: dict, body: bytes = b"", head: bool = False):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head: bool):
        body = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(h, status, headers, body, head)

    def answer(self, h, head: bool):
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        if len(parts) < 4:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        repo_id, kind, rev, file = "/".join(parts[:2]), parts[2], parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "RepoNotFound", "Repository not found", head)
        if repo.gated:
            token = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            if not token:
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._error(h, 401, "GatedRepo", msg, head)
            if token not in repo.tokens:
                msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
                return self._error(h, 403, "GatedRepo", msg, head)
        if rev not in ("main", COMMIT):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        if api and kind == "tree":
            listing = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(repo.files.items())
            ]
            return self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(listing).encode(), head)
        if kind != "resolve":
            return self._error(h, 404, "EntryNotFound", "Entry not found", head)
        base = {"X-Repo-Commit": COMMIT}
        if file in repo.files:
            body = repo.files[file]
            etag = f'"{hashlib.sha1(body).hexdigest()}"'
            return self._send(h, 200, {**base, "ETag": etag, "Content-Type": "application/octet-stream"}, body, head)
        if file in repo.sizes:
            if not head:
                return self._send(h, 500, base, b"this fake hub never sends weights it only sized")
            etag = f'"{hashlib.sha1(file.encode()).hexdigest()}"'
            return self._send(h, 200, {**base, "ETag": etag, "X-Linked-Size": repo.sizes[file]}, b"", head)
        return self._error(h, 404, "EntryNotFound", f"{file} does not exist on main", head)


def llama_index(config: dict, shards: int = 4) -> dict:
    """model.safetensors.index.json for a Llama config: transformers' tensor names, split over
    `shards` files in order (the split is ours, not Meta's)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    tensors = [("model.embed_tokens.weight", v * h)]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors += [
            (p + "self_attn.q_proj.weight", h * h),
            (p + "self_attn.k_proj.weight", kv * h),
            (p + "self_attn.v_proj.weight", kv * h),
            (p + "self_attn.o_proj.weight", h * h),
            (p + "mlp.gate_proj.weight", i * h),
            (p + "mlp.up_proj.weight", i * h),
            (p + "mlp.down_proj.weight", h * i),
            (p + "input_layernorm.weight", h),
            (p + "post_attention_layernorm.weight", h),
        ]
    tensors += [("model.norm.weight", h), ("lm_head.weight", v * h)]
    total = sum(n for _, n in tensors) * 2
    weight_map, done = {}, 0
    for name, n in tensors:
        shard = min(done * shards // total, shards - 1) + 1
        weight_map[name] = f"model-{shard:05d}-of-{shards:05d}.safetensors"
        done += n * 2
    return {"metadata": {"total_size": total}, "weight_map": weight_map}
