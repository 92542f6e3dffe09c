"""Hub ids without the internet: a fake hub on 127.0.0.1 (tests/helpers/fake_hub.py) answers as
huggingface.co does; the CLI runs as a user runs it (a subprocess, HF_ENDPOINT pointing there).

Run: .venv/bin/python -m pytest tests/test_hub.py -q   (no vLLM; the download case builds a tiny Llama)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from fake_hub import COMMIT, FakeHub, Repo, llama_index

from arm_int4 import hub
from arm_int4.checkpoint import read_checkpoint

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
CONFIG_8B = (REPO / "tests/fixtures/hub/llama-3.1-8b-instruct/config.json").read_bytes()
TOTAL_8B = 16_060_522_496  # 8,030,261,248 parameters x 2 bytes (BF16), the real index's total_size


def repo_8b(**kw) -> Repo:
    index = llama_index(json.loads(CONFIG_8B))
    assert index["metadata"]["total_size"] == TOTAL_8B
    sizes = dict.fromkeys(set(index["weight_map"].values()), TOTAL_8B // 4)  # HEAD only, never sent
    files = {"config.json": CONFIG_8B, hub.INDEX: json.dumps(index).encode()}
    return Repo(files=files, sizes=sizes, **kw)


@pytest.fixture
def env(tmp_path):
    """A user with an empty Hugging Face cache and no token (whatever this machine's user has)."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}


def run_cli(*args, cwd=None, env=None):
    """conftest.run_cli with the caller's HF_* and TRANSFORMERS_OFFLINE variables removed first."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    return subprocess.run(
        [sys.executable, "-m", "arm_int4", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**clean, **(env or {})},
    )


def graviton4_with(folder: Path, mem_kb: int, avail_kb: int) -> Path:
    """The recorded Graviton4 (c8g.16xlarge lscpu) with the memory given, as meminfo: plans that
    do not depend on this shared box's free memory."""
    folder.mkdir()
    shutil.copy(REPO / "tests/fixtures/machines/graviton4/lscpu.txt", folder / "lscpu.txt")
    (folder / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemAvailable:   {avail_kb} kB\n")
    return folder


@pytest.fixture
def graviton4(tmp_path) -> Path:
    """c8g.16xlarge: 128 GB, as its source (tests/fixtures/machines/graviton4/SOURCE.md) states."""
    return graviton4_with(tmp_path / "graviton4", 128_000_000, 124_000_000)


def one_line(r) -> str:
    """The one error line (progress lines may precede it on stderr), exit 1, no traceback, no retries."""
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and "Retrying" not in r.stderr, r.stderr
    assert ": error: " in lines[-1] and sum(": error: " in x for x in lines) == 1, r.stderr
    return lines[-1]


def test_serve_dry_run_plans_a_hub_id_from_config_and_index_alone(env, graviton4, tmp_path):
    with FakeHub({LLAMA_8B: repo_8b()}) as fake:
        r = run_cli("serve", LLAMA_8B, "--dry-run", "--machine-dump", graviton4, env={**env, "HF_ENDPOINT": fake.url})
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # served under its repo name, from the cache snapshot the download will fill
    assert f"--served-model-name {LLAMA_8B}" in out
    assert f"models--meta-llama--Llama-3.1-8B-Instruct/snapshots/{COMMIT}" in out
    assert "16.06 GB (14.96 GiB) in 4 safetensors file(s), from model.safetensors.index.json" in out
    # the plan sized memory with the weights the index declares: 124000000 kB available - 14.96 GiB
    assert "weights 15.0 GiB" in out and "VLLM_CPU_KVCACHE_SPACE" in out and "dtype bfloat16" in out
    assert "downloads 14.96 GiB into" in out
    assert not [p for p in fake.paths() if p.endswith(".safetensors")], fake.requests
    assert fake.paths("GET") == [
        f"/{LLAMA_8B}/resolve/main/config.json",
        f"/{LLAMA_8B}/resolve/{COMMIT}/{hub.INDEX}",
    ]


def test_quantize_dry_run_computes_output_memory_and_disk_from_the_index(env, tmp_path):
    with FakeHub({LLAMA_8B: repo_8b()}) as fake:
        r = run_cli(
            "quantize", LLAMA_8B, "--dry-run", "--jobs", "2", cwd=tmp_path, env={**env, "HF_ENDPOINT": fake.url}
        )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "224 Linear layers quantized" in out  # 32 layers x 7 projections; lm_head ignored by default
    # int8 per int4 value + a bf16 scale per output row; embeddings, lm_head, norms as they are:
    # 6,979,321,856 + 2 x 1,572,864 scales... computed by the stream engine's own output_specs
    assert "output: 8.46 GiB (from the tensor shapes)" in out
    assert "model.embed_tokens.weight 1002.0 MiB" in out  # the largest tensor sets the memory bound
    assert "disk: the meta-llama/Llama-3.1-8B-Instruct download 14.96 GiB in" in out
    assert "disk: the INT4 output 8.46 GiB in" in out
    assert not [p for p in fake.paths() if p.endswith(".safetensors")], fake.requests


def test_a_gated_model_without_a_token_says_so_not_offline(env):
    with FakeHub({LLAMA_8B: repo_8b(gated=True)}) as fake:
        line = one_line(run_cli("serve", LLAMA_8B, "--dry-run", env={**env, "HF_ENDPOINT": fake.url}))
    assert "is a gated model: accept its licence at " + f"{fake.url}/{LLAMA_8B}" in line
    assert "HF_TOKEN" in line and "`hf auth login`" in line and "offline" not in line


def test_a_gated_model_with_a_token_it_does_not_accept(env, graviton4):
    with FakeHub({LLAMA_8B: repo_8b(gated=True, tokens=("hf_good",))}) as fake:
        base = {**env, "HF_ENDPOINT": fake.url}
        line = one_line(run_cli("quantize", LLAMA_8B, "--dry-run", env={**base, "HF_TOKEN": "hf_other"}))
        assert "token on this machine has no access to it" in line
        ok = run_cli("serve", LLAMA_8B, "--dry-run", "--machine-dump", graviton4, env={**base, "HF_TOKEN": "hf_good"})
    assert ok.returncode == 0 and f"--served-model-name {LLAMA_8B}" in ok.stdout, ok.stderr[-2000:]


def test_a_missing_repo_is_not_found(env):
    with FakeHub({}) as fake:
        line = one_line(run_cli("serve", "nobody/no-such-model", "--dry-run", env={**env, "HF_ENDPOINT": fake.url}))
    assert f"hub model nobody/no-such-model not found at {fake.url}" in line and "offline" not in line


def test_offline_and_unreachable_each_say_what_is_true(env):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    line = one_line(run_cli("serve", LLAMA_8B, "--dry-run", env={**env, "HF_ENDPOINT": closed}))
    assert line.startswith("arm-int4 serve: error: cannot reach the Hugging Face hub at " + closed), line
    line = one_line(run_cli("quantize", LLAMA_8B, env={**env, "HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE is set and meta-llama/Llama-3.1-8B-Instruct is not in the local" in line


def test_a_download_that_does_not_fit_stops_before_any_weight(env, tmp_path):
    """The index declares twice the free space of this filesystem: a real shortage, nothing faked
    in arm-int4. quantize checks download + output, serve the download; no weight is requested."""
    free = shutil.disk_usage(tmp_path).free
    index = {"metadata": {"total_size": 2 * free}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    repo = Repo(files={"config.json": CONFIG_8B, hub.INDEX: json.dumps(index).encode()})
    with FakeHub({"big/model": repo}) as fake:
        e = {**env, "HF_ENDPOINT": fake.url}
        q = one_line(run_cli("quantize", "big/model", cwd=tmp_path, env=e))
        s = one_line(run_cli("serve", "big/model", env=e))
        big = graviton4_with(tmp_path / "big-box", 8 * free // 1024, 8 * free // 1024)  # memory is not the limit
        d = run_cli("serve", "big/model", "--dry-run", "--machine-dump", big, env=e)
        assert not [p for p in fake.paths() if p.endswith(".safetensors")], fake.requests
    assert "not enough disk for big/model: the big/model download" in q and "and the INT4 output" in q
    assert "free" in q and "HF_HOME" in q and "--output" in q
    assert "not enough disk for big/model: the big/model download" in s and "INT4" not in s
    assert d.returncode == 1 and "--served-model-name big/model" in d.stdout  # the plan, then the line
    assert d.stderr.strip().splitlines()[-1].startswith("arm-int4 serve: error: not enough disk")


def test_a_single_file_model_is_sized_by_a_head_request(env, graviton4):
    repo = Repo(files={"config.json": CONFIG_8B}, sizes={"model.safetensors": TOTAL_8B})
    with FakeHub({"one/file": repo}) as fake:
        r = run_cli("serve", "one/file", "--dry-run", "--machine-dump", graviton4, env={**env, "HF_ENDPOINT": fake.url})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "from model.safetensors's size (hub file metadata, a HEAD request)" in r.stdout
    assert ("GET", "/one/file/resolve/" + COMMIT + "/model.safetensors") not in fake.requests
    assert ("HEAD", "/one/file/resolve/" + COMMIT + "/model.safetensors") in fake.requests


def test_a_hub_model_downloads_and_is_named_by_its_repo(env, tiny_llama, tmp_path):
    """The whole way: disk checked, snapshot_download from the fake hub, quantized, and the cache
    snapshot is read as org/name (vLLM's served name), not as its commit hash."""
    files = {f.name: f.read_bytes() for f in tiny_llama.iterdir() if f.is_file()}
    with FakeHub({"tiny-org/tiny-llama": Repo(files=files)}) as fake:
        r = run_cli(
            "quantize", "tiny-org/tiny-llama", "--method", "minmax", cwd=tmp_path, env={**env, "HF_ENDPOINT": fake.url}
        )
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("GET", f"/tiny-org/tiny-llama/resolve/{COMMIT}/model.safetensors") in fake.requests
    assert (tmp_path / "tiny-llama-w4a8dyn-minmax-channelwise" / "config.json").is_file()
    snapshot = tmp_path / "hf/hub/models--tiny-org--tiny-llama/snapshots" / COMMIT
    assert read_checkpoint(snapshot).name == "tiny-org/tiny-llama"
    # offline afterwards (HF_HUB_OFFLINE, the hub gone): the cached copy serves both commands
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": fake.url}
    again = run_cli(
        "quantize", "tiny-org/tiny-llama", "--method", "minmax", "--output", "again", cwd=tmp_path, env=offline
    )
    assert again.returncode == 0 and (tmp_path / "again" / "config.json").is_file(), again.stderr[-2000:]
    plan = run_cli("serve", "tiny-org/tiny-llama", "--dry-run", cwd=tmp_path, env=offline)
    assert plan.returncode == 0 and "--served-model-name tiny-org/tiny-llama" in plan.stdout, plan.stderr[-2000:]


def test_repo_of_snapshot_reads_the_cache_layout_only(tmp_path):
    assert hub.repo_of_snapshot(tmp_path / "models--a--b.c/snapshots" / COMMIT) == "a/b.c"
    assert hub.repo_of_snapshot(tmp_path / "a--b" / "snapshots" / COMMIT) is None
    assert hub.repo_of_snapshot(tmp_path / "models--a--b" / COMMIT) is None
    snapshot = tmp_path / "hub/models--meta-llama--Llama-3.1-8B-Instruct/snapshots" / COMMIT
    assert hub.model_name(snapshot) == LLAMA_8B and hub.model_name(tmp_path / "m-w4a8") == "m-w4a8"
    from arm_int4.tune import default_output

    assert default_output(snapshot, "decode") == "Llama-3.1-8B-Instruct-decode.profile.json"


def test_shapes_from_config_match_a_real_checkpoints_headers(tiny_llama):
    """checkpoint_from_index (hub plans) gives each tensor the shape the real safetensors header has."""
    from arm_int4.quantize.preflight import checkpoint_from_index, read_source_checkpoint

    real = read_source_checkpoint(tiny_llama)
    weight_map = {n: shard for shard, ts in real.shards.items() for n in ts}
    made = checkpoint_from_index(tiny_llama, real.config, weight_map, real.nbytes)
    assert made is not None
    assert {n: t.shape for ts in made.shards.values() for n, t in ts.items()} == {
        n: t.shape for ts in real.shards.values() for n, t in ts.items()
    }
    assert checkpoint_from_index(tiny_llama, real.config, weight_map, real.nbytes + 2) is None  # must add up


DOCTOR = (
    "import json, sys\n"
    "from arm_int4 import doctor, hardware\n"
    "found = doctor.hub_model(hardware.from_dump(sys.argv[1]), sys.argv[2], sys.argv[3])\n"
    "print(json.dumps([f.to_dict() for f in found]))\n"
)


def doctor_hub(env, machine, model, out_dir) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", DOCTOR, str(machine), model, str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, **env},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return {f["check"]: f for f in json.loads(r.stdout)}


def test_doctor_checks_a_hub_model_plan_and_disk_without_the_weights(env, graviton4, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    index = {"metadata": {"total_size": 2 * free}, "weight_map": {"model.embed_tokens.weight": "model.safetensors"}}
    repos = {
        LLAMA_8B: repo_8b(),
        "big/model": Repo(files={"config.json": CONFIG_8B, hub.INDEX: json.dumps(index).encode()}),
        "gated/model": repo_8b(gated=True),
    }
    with FakeHub(repos) as fake:
        e = {**env, "HF_ENDPOINT": fake.url}
        ok = doctor_hub(e, graviton4, LLAMA_8B, tmp_path)
        big = doctor_hub(e, graviton4, "big/model", tmp_path)
        gated = doctor_hub(e, graviton4, "gated/model", tmp_path)
        assert not [p for p in fake.paths() if p.endswith(".safetensors")], fake.requests
    assert ok["hub model"]["status"] == "ok" and "16.06 GB of safetensors" in ok["hub model"]["detail"]
    assert ok["serve plan"]["status"] == "ok" and "VLLM_CPU_KVCACHE_SPACE" in ok["serve plan"]["detail"]
    assert ok["disk"]["status"] == "ok" and "download 14.96 GiB" in ok["disk"]["detail"]
    assert big["disk"]["status"] == "fail" and "not enough disk for big/model" in big["disk"]["detail"]
    assert gated["hub model"]["status"] == "fail" and "is a gated model" in gated["hub model"]["detail"]


def test_dry_run_of_a_local_model_predicts_what_quantize_writes(tiny_llama, tmp_path):
    """The plan's output size is the stream engine's own header arithmetic: equal to what it writes."""
    from arm_int4 import quantize
    from arm_int4.cli import command_options

    argv = ["quantize", str(tiny_llama), "--method", "minmax", "--output", str(tmp_path / "out"), "--jobs", "1"]
    planned = quantize.dry_run(command_options([*argv, "--dry-run"]))
    written = quantize.quantize(command_options(argv))
    assert planned.output_exact and planned.output_bytes == written.bytes_out
    assert planned.layers == written.layers and planned.source_bytes == written.bytes_in
    assert planned.hub is None and str(tmp_path / "out") in planned.summary()


def test_the_8b_plan_matches_the_8b_outputs_measured_on_x86():
    """The plan's tensor bytes (config shapes + index names) against the four 8B-shaped outputs the
    quantizer wrote (docs/benchmarks-quantize-8b.json, whole directories): equal but for the
    safetensors headers, config and index, which the plan does not count (~60 kB; 100 kB allowed)."""
    from arm_int4.quantize.preflight import checkpoint_from_index, plan_quantization
    from arm_int4.quantize.stream import output_bytes
    from arm_int4.schemes import Scheme

    config = json.loads(CONFIG_8B)
    index = llama_index(config)
    ck = checkpoint_from_index(Path("."), config, index["weight_map"], TOTAL_8B)
    assert ck is not None
    recipes = {  # benchmarks/quantize_scale.py's recipe names
        "cw-mse-lp": (Scheme("w4a8", "channelwise", None, "mse"), "fp32"),
        "cw-minmax": (Scheme("w4a8", "channelwise", None, "minmax"), "weight"),
        "g32-minmax": (Scheme("w4a8", "groupwise", 32, "minmax"), "weight"),
        "g128-mse": (Scheme("w4a8", "groupwise", 128, "mse"), "weight"),
    }
    runs = json.loads((REPO / "docs/benchmarks-quantize-8b.json").read_text())["runs"]
    for run in runs:
        scheme, precision = recipes[run["recipe"]]
        planned = output_bytes(plan_quantization(ck, scheme, ["lm_head"], require_safetensors=True), precision)
        assert 0 < run["output_bytes"] - planned < 100_000, (run["recipe"], run["output_bytes"], planned)
