"""Hub ids (org/name): a plan from config.json and the safetensors index alone, one true line for
each way the hub can say no, and a disk check before any weight is downloaded.

huggingface_hub does the HTTP and keeps the cache (HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE
as it reads them). What a plan needs from the hub, and nothing more:
  config.json                       -> the model's shape (layers, heads, KV heads, context, dtype)
  model.safetensors.index.json      -> metadata.total_size (the weights' bytes) and the shard names
  or, for a single-file model, a HEAD of model.safetensors -> its size (X-Linked-Size); no body.
How huggingface_hub 2.4 tells the hub's answers apart (utils/_http.py hf_raise_for_status): the
X-Error-Code header, "GatedRepo" -> GatedRepoError, "RepoNotFound" -> RepositoryNotFoundError
(the hub answers 401 RepoNotFound for a missing repo and for a private one without a token),
"EntryNotFound" -> RemoteEntryNotFoundError; a connection error or HF_HUB_OFFLINE with nothing
cached -> LocalEntryNotFoundError, caused by the transport error or OfflineModeIsEnabled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import GatedModel, HubUnreachable, ModelError, NotEnoughDisk

__all__ = [
    "HUB_ID",
    "INDEX",
    "DiskNeed",
    "HubModel",
    "is_hub_id",
    "repo_of_snapshot",
    "model_name",
    "metadata",
    "explain",
    "free_bytes",
    "check_disk",
    "download",
    "size",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Besides the weights the index names: tokenizer, chat template, generation config, custom code.
SIDE_FILES = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.py"]
DISK_MARGIN = 256 * 2**20  # config, tokenizer and side files, partial blobs, the filesystem's rounding


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def is_hub_id(model: str) -> bool:
    """org/name with no such local path (a local path always wins; see models.resolve)."""
    return not model.startswith((".", "/", "~")) and bool(HUB_ID.match(model)) and not Path(model).exists()


def repo_of_snapshot(path) -> Optional[str]:
    """org/name when `path` is a huggingface_hub cache snapshot (.../models--org--name/snapshots/REV):
    the cache's own layout, where "/" in the id is stored as "--" (which hub ids may not contain)."""
    p = Path(path)
    repo_dir = p.parent.parent.name
    if p.parent.name != "snapshots" or not repo_dir.startswith("models--") or "--" not in repo_dir[8:]:
        return None
    return repo_dir[len("models--") :].replace("--", "/", 1)


def model_name(path) -> str:
    """What a model directory is called in plans, records and file names: org/name for a hub cache
    snapshot (not its commit hash), else the directory's own name."""
    return repo_of_snapshot(path) or os.path.basename(os.path.abspath(os.fspath(path)))


@dataclass(frozen=True)
class HubModel:
    """What the hub says about a model before any weight is downloaded."""

    repo_id: str
    commit: str
    snapshot: Path  # the cache dir this commit's files land in; config.json (and the index) are there
    weight_bytes: int
    weight_files: tuple  # the safetensors files a download fetches
    size_source: str  # where weight_bytes came from
    endpoint: str

    @property
    def cached_bytes(self) -> int:
        """Weight bytes already complete in the local cache (an interrupted download counts nothing)."""
        return sum((self.snapshot / f).stat().st_size for f in self.weight_files if (self.snapshot / f).is_file())

    @property
    def to_download(self) -> int:
        return max(self.weight_bytes - self.cached_bytes, 0)

    def download_need(self) -> DiskNeed:
        return DiskNeed(f"the {self.repo_id} download", self.snapshot.parents[2], self.to_download)

    def describe(self, step: str) -> list:
        """Comment lines for a printed plan: where the sizes come from and what `step` downloads."""
        cache = self.snapshot.parents[2]
        return [
            f"hub: {self.repo_id} at commit {self.commit[:12]} ({self.endpoint}): config.json"
            + (f" and {INDEX}" if (self.snapshot / INDEX).is_file() else "")
            + " read, no weights downloaded",
            f"weights: {self.weight_bytes / 1e9:.2f} GB ({size(self.weight_bytes)}) in {len(self.weight_files)} "
            f"safetensors file(s), from {self.size_source}; {size(self.cached_bytes)} already cached",
            f"disk: {step} downloads {size(self.to_download)} into {cache} ({size(free_bytes(cache))} free there)",
        ]


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def metadata(repo_id: str, *, progress: Callable[[str], None] = lambda m: None) -> HubModel:
    """config.json and the index (or one file's size) from the hub or the cache; ModelError in one line."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = _config(repo_id)
        snapshot, commit = config.parent, config.parent.name
        try:
            index = json.loads(Path(hf_hub_download(repo_id, INDEX, revision=commit)).read_text())
            files = tuple(sorted(set(index["weight_map"].values())))
            total = (index.get("metadata") or {}).get("total_size")
            source = f"{INDEX} metadata.total_size"
            if not isinstance(total, int):  # an index without it: each shard's size, HEAD only
                total = sum(_remote_size(repo_id, f, commit) for f in files)
                source = "the shards' sizes (hub file metadata)"
        except EntryNotFoundError:  # no index: a single-file model
            if (snapshot / SINGLE).is_file():
                total, source = (snapshot / SINGLE).stat().st_size, f"the cached {SINGLE}"
            else:
                try:
                    total = get_hf_file_metadata(hf_hub_url(repo_id, SINGLE, revision=commit)).size or 0
                except EntryNotFoundError:
                    raise ModelError(
                        f"hub model {repo_id} has no safetensors weights ({SINGLE} or {INDEX}): arm-int4 plans "
                        "and quantizes safetensors checkpoints; convert it, or pick a repo that has them"
                    ) from None
                source = f"{SINGLE}'s size (hub file metadata, a HEAD request)"
            files = (SINGLE,)
    except ModelError:
        raise
    except Exception as exc:  # huggingface_hub's error types are sorted by explain()
        raise explain(repo_id, exc) from None
    progress(f"{repo_id}: config.json and weight sizes read (commit {commit[:12]}), no weights downloaded")
    return HubModel(repo_id, commit, snapshot, int(total), files, source, _endpoint())


def _config(repo_id: str) -> Path:
    """config.json, after one HEAD without retries: with no connection (or HF_HUB_OFFLINE) the cached
    copy, else at once the line saying so (hf_hub_download alone retries for ~25 s first)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
    except _transport_errors() as exc:  # OfflineModeIsEnabled is a ConnectionError too
        try:
            return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))
        except Exception:
            raise explain(repo_id, exc) from None
    return Path(hf_hub_download(repo_id, "config.json"))


def _remote_size(repo_id: str, filename: str, commit: str) -> int:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    return get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=commit)).size or 0


def _has_token() -> bool:
    from huggingface_hub import get_token

    try:
        return bool(get_token())
    except Exception:  # an unreadable token file or a failed OIDC exchange: no usable token
        return False


def _chain(exc: BaseException):
    seen, at = set(), exc  # type: tuple[set, Optional[BaseException]]
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        yield at
        at = at.__cause__ or at.__context__


def _transport_errors() -> tuple:
    """The exception types that mean "no connection" for the HTTP client this huggingface_hub uses."""
    kinds: list = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        try:
            kinds.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


def explain(repo_id: str, exc: BaseException) -> ModelError:
    """One true line for why the hub would not give `repo_id` (never a guess that the machine is offline)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _endpoint()
    page = f"{endpoint}/{repo_id}"
    if isinstance(exc, GatedRepoError):
        if _has_token():
            return GatedModel(
                f"{repo_id} is a gated model and the Hugging Face token on this machine has no access to it: "
                f"accept its licence at {page} with that token's account (some need the owner's approval), then retry"
            )
        return GatedModel(
            f"{repo_id} is a gated model: accept its licence at {page}, then set HF_TOKEN=hf_... (a read token "
            "from your hub settings) or run `hf auth login` (older huggingface_hub: `huggingface-cli login`) "
            "on this machine, and retry"
        )
    if isinstance(exc, RepositoryNotFoundError):
        private = "" if _has_token() else " (a private repo also needs HF_TOKEN of an account that can read it)"
        return ModelError(
            f"hub model {repo_id} not found at {endpoint}: check the id, org/name as on its hub page{private}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelError(f"hub model {repo_id}: the revision asked for does not exist at {endpoint}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ModelError(f"hub repo {repo_id} has no config.json: it is not a Hugging Face transformers model")
    chain = list(_chain(exc))
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return HubUnreachable(
            f"HF_HUB_OFFLINE is set and {repo_id} is not in the local Hugging Face cache: unset HF_HUB_OFFLINE "
            "to download it, or pass a local model directory"
        )
    if any(isinstance(e, _transport_errors()) for e in chain):
        return HubUnreachable(
            f"cannot reach the Hugging Face hub at {endpoint} ({type(chain[-1]).__name__}) and {repo_id} is not in "
            "the local cache: check the network or proxy, or download it elsewhere "
            f"(`hf download {repo_id} --local-dir DIR`) and pass DIR"
        )
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if http is not None:
        return ModelError(f"the hub at {endpoint} answered HTTP {http.response.status_code} for {repo_id}: retry later")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelError(f"cannot get hub model {repo_id}: {first[:200]}")


def free_bytes(path) -> int:
    """Free bytes on the filesystem `path` is (or will be) on: its nearest existing ancestor's."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass(frozen=True)
class DiskNeed:
    what: str  # "the BF16 download", "the INT4 output"
    where: Path
    bytes: int


def _device(path: Path) -> int:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return os.stat(p).st_dev


def check_disk(repo_id: str, needs: Sequence[DiskNeed], free: Callable[[Path], int] = free_bytes) -> None:
    """Refuse in one line, with the numbers, when what a step writes does not fit its filesystem(s)."""
    by_fs: dict = {}
    for n in needs:
        if n.bytes > 0:
            by_fs.setdefault(_device(n.where), []).append(n)
    for group in by_fs.values():
        need = sum(n.bytes for n in group) + DISK_MARGIN
        have = free(group[0].where)
        if have < need:
            parts = " and ".join(f"{n.what} {size(n.bytes)} in {n.where}" for n in group)
            raise NotEnoughDisk(
                f"not enough disk for {repo_id}: {parts} (+ {size(DISK_MARGIN)} margin) need {size(need)}, the "
                f"filesystem has {size(have)} free: free {size(need - have)}, or put HF_HOME (the download) or "
                "--output on a larger disk"
            )


def download(
    model: HubModel,
    also: Sequence[DiskNeed] = (),
    *,
    free: Callable[[Path], int] = free_bytes,
    progress: Callable[[str], None] = lambda m: None,
) -> Path:
    """Check the disk for the download (and `also`: what the step writes next), then download the
    commit `metadata` read: the weights the index names and the side files, nothing else."""
    from huggingface_hub import snapshot_download

    check_disk(model.repo_id, [model.download_need(), *also], free)
    if model.to_download:
        progress(f"downloading {model.repo_id}: {size(model.to_download)} into {model.snapshot.parents[2]}")
    try:
        path = snapshot_download(
            model.repo_id, revision=model.commit, allow_patterns=[*model.weight_files, *SIDE_FILES]
        )
    except Exception as exc:
        raise explain(model.repo_id, exc) from None
    return Path(path)
