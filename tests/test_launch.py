"""arm_int4.launch: serving plans for recorded Arm machines, without vLLM.

Run: .venv/bin/python -m pytest tests/test_launch.py -q
Machines come from tests/fixtures/machines (hardware.from_dump); most Arm records carry no memory
figure, so tests set mem_available_bytes themselves. Checkpoints are config.json + safetensors
headers only (the data section is never read by the planner, so it is left out).
"""

import dataclasses
import json
import pathlib
import shlex
import struct

import pytest

from arm_int4 import cli, hardware, launch
from arm_int4.errors import PreflightError, RayUnsupported, UsageError
from arm_int4.hardware import parse_cpulist
from arm_int4.launch import EngineRequest, GiB, Profile, read_checkpoint

MACHINES = pathlib.Path(__file__).parent / "fixtures" / "machines"
ARM_LSCPU = ["ampere-altra", "graviton2", "graviton3", "graviton4", "grace", "github-arm64-runner"]
_ST = {"BF16": 2, "F32": 4, "I8": 1, "I32": 4, "I64": 8}


def plan(m, facts, profile=None, *, extra_args=(), can_bind=True, **fields):
    """launch.plan of the request a command builds from these options and the words after `--`."""
    request = EngineRequest.build(vllm_args=extra_args, offline=False, **fields)
    return launch.plan(m, facts, request.replace(profile=profile or Profile()), can_bind=can_bind)


def machine(name, mem_gib=None, **changes):
    if name == "x86-amd-epyc-this-box":
        m = hardware.detect(str(MACHINES / name / "root"), probe_runtime=False)
    else:
        m = hardware.from_dump(str(MACHINES / name))
    if mem_gib is not None:
        changes["mem_available_bytes"] = int(mem_gib * GiB)
    return dataclasses.replace(m, **changes)


def write_checkpoint(
    folder,
    *,
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=8,
    inter=14336,
    vocab=128256,
    scheme=None,
    group=32,
    bias=False,
    experts=0,
    config_extra=None,
    preset="w4a8",
):
    """A Llama-shaped checkpoint: config.json + one safetensors header (no tensor data)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
        **(config_extra or {}),
    }
    if experts:
        cfg["num_local_experts"] = experts
    if scheme:
        strategy = {"strategy": "group", "group_size": group} if scheme == "groupwise" else {"strategy": "channel"}
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "int-quantized" if preset == "w4a8" else "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "dynamic": False,
                        "observer": "minmax",
                        **strategy,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": False,
                        "dynamic": True,
                        "strategy": "token",
                    }
                    if preset == "w4a8"
                    else None,
                }
            },
        }
    linears = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_heads * hd, hidden),
        "self_attn.v_proj": (kv_heads * hd, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    tensors = {
        "model.embed_tokens.weight": ("BF16", (vocab, hidden)),
        "lm_head.weight": ("BF16", (vocab, hidden)),
        "model.norm.weight": ("BF16", (hidden,)),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ("BF16", (hidden,))
        for name, (out, inp) in linears.items():
            if scheme and preset == "w4a16":
                tensors[p + name + ".weight_packed"] = ("I32", (out, inp // 8))
                tensors[p + name + ".weight_shape"] = ("I64", (2,))
                tensors[p + name + ".weight_scale"] = ("BF16", (out, inp // group if scheme == "groupwise" else 1))
            elif scheme:
                tensors[p + name + ".weight"] = ("I8", (out, inp))
                tensors[p + name + ".weight_scale"] = ("BF16", (out, inp // group if scheme == "groupwise" else 1))
            else:
                tensors[p + name + ".weight"] = ("BF16", (out, inp))
            if bias and name.endswith(("q_proj", "k_proj", "v_proj")):
                tensors[p + name + ".bias"] = ("BF16", (out,))
    header, offset = {}, 0
    for name, (dt, shape) in tensors.items():
        n = _ST[dt]
        for d in shape:
            n *= d
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    return read_checkpoint(write_checkpoint(tmp_path_factory.mktemp("ck") / "llama8b"))


def test_two_numa_nodes_give_two_ranks_with_disjoint_bind_lists(llama8b):
    p = plan(machine("ampere-altra", 256), llama8b, reserve=0)
    assert p.ranks == 2 and p.bind_lists == ("0-79", "80-159")
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-79|80-159"
    assert p.to_server_argv()[p.to_server_argv().index("--tensor-parallel-size") + 1] == "2"
    d = plan(machine("ampere-altra", 256), llama8b)  # default: vLLM's one reserved CPU per rank
    a, b = (set(parse_cpulist(x)) for x in d.bind_lists)
    assert not a & b and a <= set(range(80)) and b <= set(range(80, 160)) and len(a) == len(b) == 79


@pytest.mark.parametrize("name", ARM_LSCPU)
def test_single_node_arm_machines_bind_one_rank_minus_the_reserve(name, llama8b):
    m = machine(name, 64)
    p = plan(m, llama8b)
    if len(m.numa_nodes) <= 1:
        assert p.ranks == 1 and "--tensor-parallel-size" not in p.to_server_argv()
        assert len(parse_cpulist(p.bind_lists[0])) == m.logical_cpus - 1
    else:  # Ampere Altra's two nodes: a rank on each, one CPU of each left to vLLM's scheduler
        assert p.ranks == len(m.numa_nodes) == 2
        for bind, (_, node_cpus) in zip(p.bind_lists, m.numa_nodes, strict=True):
            cpus = set(parse_cpulist(bind))
            assert cpus < set(parse_cpulist(node_cpus)) and len(cpus) == len(parse_cpulist(node_cpus)) - 1


def test_container_cpuset_and_affinity_are_respected(llama8b):
    p = plan(machine("graviton3", 64, cgroup_cpuset="8-15"), llama8b)
    assert set(parse_cpulist(p.env["VLLM_CPU_OMP_THREADS_BIND"])) <= set(range(8, 16))
    assert p.threads_per_rank == 7 and "cgroup cpuset" in "\n".join(p.reasons)
    # a cpuset inside one node of a 2-node machine: one rank, only those CPUs
    p = plan(machine("ampere-altra", 64, cgroup_cpuset="80-95", affinity="0-159"), llama8b, reserve=0)
    assert p.ranks == 1 and p.bind_lists == ("80-95",)
    # a CPU quota below the cpuset trims the thread count
    p = plan(machine("graviton4", 64, cgroup_cpuset="0-15", cgroup_cpu_quota=4.0), llama8b, reserve=0)
    assert p.threads_per_rank == 4


def test_nobind_where_sched_setaffinity_is_forbidden(llama8b):
    p = plan(machine("ampere-altra", 64), llama8b, can_bind=False)
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and p.ranks == 1
    assert p.env["OMP_NUM_THREADS"] == "159" and not p.bind_lists


@pytest.mark.parametrize("name", ARM_LSCPU + ["x86-amd-epyc-this-box"])
@pytest.mark.parametrize("mem_gib", [24, 48, 200, 1000])
def test_kv_cache_never_exceeds_available_memory(name, mem_gib, llama8b):
    m = machine(name, mem_gib, node_memory=None)  # the system-wide rule (per-node: the tests below)
    ref = plan(
        machine(name, 10**6, node_memory=None), llama8b
    )  # the dtype and ranks the plan picks here (fp32 without bf16)
    weights = launch.weights_in_memory(llama8b, ref.dtype, m.arch)
    headroom = (3 + ref.ranks) * GiB  # the margin measured for serve (docs/serve.md), not read from the planner
    if weights + headroom + ref.ranks * GiB > m.mem_available_bytes:  # refused exactly when 1 GiB does not fit
        with pytest.raises(PreflightError, match="no room for the minimum 1 GiB KV cache"):
            plan(m, llama8b)
        return
    p = plan(m, llama8b)
    assert p.kv_cache_gib >= launch.MIN_KV_CACHE_GIB
    assert p.kv_cache_gib * p.ranks * GiB + weights + headroom <= m.mem_available_bytes
    # and it uses what there is, to the whole GiB (no cap applies: 128 x 131072 tokens is far more)
    assert (p.kv_cache_gib + 1) * p.ranks * GiB + weights + headroom > m.mem_available_bytes
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == str(p.kv_cache_gib)


def test_kv_cache_refusals_are_one_line(llama8b):
    with pytest.raises(PreflightError, match="no room for the minimum 1 GiB KV cache") as e:
        plan(machine("graviton3", 16), llama8b)
    assert "\n" not in str(e.value)
    # 64 - 15 GiB of weights = 49 GiB: 49 is accepted (no headroom asked of an explicit size), 50 is not
    assert plan(machine("graviton3", 64), llama8b, kv_cache_gib=49).kv_cache_gib == 49
    with pytest.raises(PreflightError, match=r"KV cache 50 GiB per rank does not fit.*at most 45"):
        plan(machine("graviton3", 64), llama8b, kv_cache_gib=50)
    with pytest.raises(PreflightError, match="does not fit"):
        plan(machine("graviton3", 64), llama8b, kv_cache_gib=1, max_model_len=131072)


def _node_mem(m, *nodes_gib):
    return dataclasses.replace(
        m, node_memory=tuple((i, int(t * GiB), int(a * GiB)) for i, (t, a) in enumerate(nodes_gib))
    )


def test_kv_cache_is_sized_from_the_node_vllm_checks(llama8b):
    """This box's shape (the issue's report): MemAvailable 23 GiB but NUMA node 0 holds 17.7 GiB with
    15.2 available; vLLM binds the rank's memory to node 0 and refuses a KV cache above that."""
    m = _node_mem(machine("graviton4", 23.0), (17.7, 15.2))
    tiny = read_checkpoint(
        write_checkpoint(
            m and pathlib.Path(__import__("tempfile").mkdtemp()) / "t",
            hidden=576,
            layers=30,
            heads=9,
            kv_heads=3,
            inter=1536,
            vocab=49152,
        )
    )
    p = plan(m, tiny, max_model_len=8192 * 16)  # a context long enough that no cap applies
    weights = launch.weights_in_memory(tiny, p.dtype, m.arch)
    node_budget = 15.2 * GiB - weights - launch.NODE_HEADROOM_BYTES - launch.NODE_HEADROOM_BYTES_PER_RANK
    assert p.kv_cache_gib == int(node_budget // GiB) == 10  # not 18 (from MemAvailable), which vLLM refused
    assert "NUMA node 0" in "\n".join(p.reasons)
    with pytest.raises(PreflightError, match="KV cache 18 GiB per rank does not fit: NUMA node 0"):
        plan(m, tiny, kv_cache_gib=18)


def test_kv_cache_per_rank_follows_each_ranks_node(llama8b):
    m = _node_mem(machine("ampere-altra", 256), (128, 100), (128, 40))  # node 1 is busy
    p = plan(m, llama8b, reserve=0)
    assert p.ranks == 2
    # float32 on Altra (no bf16): 30 GiB of weights, half on each node; node 1 decides (40 - 15 - 3 - 1 = 21)
    assert p.kv_cache_gib == 21
    cg = dataclasses.replace(m, cgroup_mem_limit=int(60 * GiB), cgroup_mem_usage=int(10 * GiB))
    assert plan(cg, llama8b, reserve=0).kv_cache_gib == 21  # the pod's 50 GiB of room: node 1's 40 still decides
    cg = dataclasses.replace(m, cgroup_mem_limit=int(40 * GiB), cgroup_mem_usage=int(10 * GiB))
    assert plan(cg, llama8b, reserve=0).kv_cache_gib == 11  # 30 GiB of room clamps both nodes: 30 - 15 - 4


def test_kv_cache_is_capped_at_what_vllm_could_use(tmp_path):
    tiny = read_checkpoint(
        write_checkpoint(
            tmp_path / "t",
            hidden=256,
            layers=2,
            heads=4,
            kv_heads=2,
            inter=512,
            vocab=1024,
            config_extra={"max_position_embeddings": 2048},
        )
    )
    p = plan(machine("graviton4", 500), tiny)
    assert p.kv_cache_gib == 1  # 1 KiB/token x 2048 tokens x 128 sequences = 256 MiB -> the 1 GiB minimum


def test_groupwise_bias_rule_picks_fp32_on_arm_only(tmp_path):
    gw_bias = read_checkpoint(write_checkpoint(tmp_path / "a", scheme="groupwise", bias=True, layers=2))
    gw = read_checkpoint(write_checkpoint(tmp_path / "b", scheme="groupwise", layers=2))
    cw_bias = read_checkpoint(write_checkpoint(tmp_path / "c", scheme="channelwise", bias=True, layers=2))
    assert gw_bias.quantized_linear_bias and not gw.quantized_linear_bias and gw_bias.is_w4a8_groupwise
    arm, x86 = machine("graviton4", 64), machine("x86-amd-epyc-this-box", 64)
    assert "bf16" in arm.features and "avx512_bf16" in x86.features
    p = plan(arm, gw_bias)
    assert p.dtype == "float32" and any("garbage on Arm" in r for r in p.reasons)
    assert plan(arm, gw_bias, Profile(dtype="bfloat16")).dtype == "float32"  # a profile cannot undo it
    assert plan(x86, gw_bias).dtype == "bfloat16"
    assert plan(arm, gw).dtype == "bfloat16" and plan(arm, cw_bias).dtype == "bfloat16"
    assert plan(machine("graviton2", 64), gw).dtype == "float32"  # Neoverse N1: no bf16


def test_checkpoint_facts_come_from_the_files_not_the_folder_name(tmp_path):
    d = write_checkpoint(
        tmp_path / "model-w4a8dyn-minmax-groupwise-g32",
        scheme="channelwise",
        layers=1,
        config_extra={"attention_bias": False},
    )
    f = read_checkpoint(d)
    assert f.scheme.granularity == "channelwise" and f.scheme.preset == "w4a8"
    assert f.name == "model-w4a8dyn-minmax-groupwise-g32" and f.num_layers == 1
    assert f.quantized_values == 4096 * 4096 * 2 + 1024 * 4096 * 2 + 14336 * 4096 * 3
    dense = read_checkpoint(write_checkpoint(tmp_path / "w4a8-groupwise", layers=1))
    assert dense.scheme is None and dense.quantized_values == 0


def test_w4a8_moe_is_refused_off_arm_in_one_line(tmp_path):
    moe = read_checkpoint(write_checkpoint(tmp_path / "moe", scheme="channelwise", experts=8, layers=1))
    assert moe.is_moe
    with pytest.raises(PreflightError, match=r"CPUExpertsInt4.*Arm CPUs only") as e:
        plan(machine("x86-amd-epyc-this-box", 20), moe)
    assert "\n" not in str(e.value)
    assert plan(machine("graviton4", 64), moe).dtype == "bfloat16"


def test_tcmalloc_is_preloaded_when_found(llama8b):
    p = plan(machine("graviton4", 64, tcmalloc_path="/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"), llama8b)
    assert p.env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    assert "LD_PRELOAD" not in plan(machine("graviton4", 64), llama8b).env


def test_extra_vllm_args_win_and_the_plan_drops_what_they_repeat(llama8b):
    p = plan(machine("graviton4", 64), llama8b, extra_args=["--dtype", "float32", "--enforce-eager"])
    argv = p.to_server_argv()
    assert argv.count("--dtype") == 1 and argv[-3:] == ("--dtype", "float32", "--enforce-eager")
    assert p.dtype == "float32"
    p = plan(machine("graviton4", 64), llama8b, extra_args=["--kv-cache-memory-bytes=4000000000"])
    assert "VLLM_CPU_KVCACHE_SPACE" not in p.env  # the env var would override the flag
    p = plan(machine("ampere-altra", 256), llama8b, extra_args=["-tp", "2"])
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-78|80-158" and p.to_server_argv().count("-tp") == 1
    assert "--tensor-parallel-size" not in p.to_server_argv()  # the user's -tp stands for it


def test_profile_overrides_and_rejects_unknown_keys(tmp_path, llama8b):
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps(
            {
                "max_num_seqs": 8,
                "max_num_batched_tokens": 512,
                "block_size": 64,
                "enforce_eager": True,
                "reserve": 0,
                "meta": {"by": "tune"},
            }
        )
    )
    p = plan(machine("graviton4", 64), llama8b, Profile.load(str(f)))
    a = p.to_server_argv()
    assert a[a.index("--max-num-seqs") + 1] == "8" and a[a.index("--max-num-batched-tokens") + 1] == "512"
    assert a[a.index("--block-size") + 1] == "64" and "--enforce-eager" in a and p.bind_lists == ("0-63",)
    for bad, match in (
        ({"threads": 3}, "unknown key"),
        ({"max_num_seqs": "8"}, "whole number"),
        ({"bind": "all"}, "bind must be"),
    ):
        f.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=match):
            Profile.load(str(f))


def test_sharded_checkpoint_reads_the_shards_its_index_names(tmp_path):
    d = write_checkpoint(tmp_path / "sharded", layers=1)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})
    )
    (d / "consolidated.safetensors").write_bytes(b"not a safetensors file")  # stray: not in the index
    assert read_checkpoint(d).float_values == read_checkpoint(write_checkpoint(tmp_path / "one", layers=1)).float_values


def test_plan_for_this_machine_live(tmp_path):
    tiny = read_checkpoint(
        write_checkpoint(tmp_path / "t", hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1024)
    )
    m = hardware.detect(probe_runtime=False)
    p = plan(m, tiny)
    assert set(parse_cpulist(p.bind_lists[0])) <= set(parse_cpulist(m.affinity))
    assert p.kv_cache_gib * GiB < m.mem_available_bytes


def _parse_snippet(text):
    env, cmd = {}, []
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("export "):
            k, _, v = line[len("export ") :].partition("=")
            env[k] = shlex.split(v)[0]
        elif line and not line.startswith("#"):
            cmd = shlex.split(line)
    return env, cmd


def test_format_is_a_shell_snippet_that_round_trips(llama8b):
    p = plan(machine("ampere-altra", 256), llama8b, extra_args=["--enforce-eager"])
    env, cmd = _parse_snippet(p.format())
    assert env == p.env and tuple(cmd) == p.to_server_argv()
    assert cmd[1:4] == ["-m", launch.SERVER_MODULE, "--model"]


def test_cli_dry_run_prints_the_plan_on_stdout(tmp_path, capsys):
    d = write_checkpoint(tmp_path / "tiny", hidden=256, layers=2, heads=4, kv_heads=2, inter=512, vocab=1024)
    rc = cli.main(["serve", "--dry-run", "--port", "8123", "--kv-cache-gib", "1", str(d), "--", "--enforce-eager"])
    out = capsys.readouterr().out
    assert rc == 0
    env, cmd = _parse_snippet(out)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_TARGET_DEVICE"] == "cpu"
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[-1] == "--enforce-eager" and str(d) in cmd


# ---------------------------------------------------------------- tensor parallel inside one node
@pytest.mark.parametrize("how", ["ranks", "vllm-arg", "profile"])
def test_two_ranks_on_one_node_get_their_own_cpus(how, llama8b):
    """vLLM 0.32's auto binding refuses 2 ranks on 1 node ("Not enough allowed NUMA nodes to bind
    threads of 2 local CPUWorkers"); explicit per-rank lists run (seen here: TP=2 with "0|1")."""
    m = machine("graviton4", 256)
    kw = {
        "ranks": {"ranks": 2},
        "vllm-arg": {"extra_args": ["--tensor-parallel-size", "2"]},
        "profile": {"profile": Profile(ranks=2)},
    }[how]
    p = plan(m, llama8b, **kw)
    assert p.ranks == 2 and p.bind_lists == ("0-30", "32-62")  # halves of 0-63, one CPU each reserved
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-30|32-62" and p.threads_per_rank == 31
    assert p.to_server_argv().count("--tensor-parallel-size") == 1
    assert p.to_server_argv()[p.to_server_argv().index("--tensor-parallel-size") + 1] == "2"


def test_ranks_on_this_two_cpu_box_and_their_limits(llama8b):
    m = machine("x86-amd-epyc-this-box", 64, affinity="0-1", node_memory=None)
    p = plan(m, llama8b, ranks=2)
    assert p.bind_lists == ("0", "1") and p.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"  # no CPU to spare
    assert "no CPU reserved" in "\n".join(p.reasons)
    with pytest.raises(PreflightError, match="4 ranks do not fit 2 usable CPUs"):
        plan(m, llama8b, ranks=4)
    with pytest.raises(PreflightError, match="do not split over 3 tensor-parallel ranks"):
        plan(machine("graviton4", 256), llama8b, ranks=3)  # 32 heads / 8 KV heads
    with pytest.raises(PreflightError, match="vLLM binds one rank per NUMA node"):
        plan(machine("graviton4", 256), llama8b, Profile(bind="auto"), ranks=2)
    with pytest.raises(UsageError, match="--ranks 0"):
        plan(m, llama8b, ranks=0)
    with pytest.raises(PreflightError, match="one rank"):
        plan(m, llama8b, ranks=2, can_bind=False)


def test_four_ranks_on_two_nodes_split_each_node(llama8b):
    p = plan(machine("ampere-altra", 512), llama8b, ranks=4, reserve=0)
    assert p.bind_lists == ("0-39", "40-79", "80-119", "120-159")


def test_ray_is_refused_in_one_typed_line(llama8b):
    """vLLM 0.32's CPU platform has no Ray device key: ray_utils.py raises "current platform cpu does not
    support ray" after the engine has begun to start. The plan refuses it first, in one line."""
    for flag in ("--distributed-executor-backend", "--data-parallel-backend"):
        with pytest.raises(RayUnsupported) as e:
            plan(machine("graviton4", 256), llama8b, ranks=2, extra_args=["--pipeline-parallel-size", "2", flag, "ray"])
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{flag} ray: vLLM 0.32 on CPU refuses Ray")


def test_data_parallel_binds_each_rank_and_sizes_kv_for_every_copy(llama8b):
    """--data-parallel-size N: vLLM reads the bind lists in [DP, PP, TP] order (ompmultiprocessing.py); every
    DP engine loads the whole model, so the KV budget counts N copies of the weights."""
    m = machine("ampere-altra", 256)
    p = plan(m, llama8b, extra_args=["--data-parallel-size", "2"])
    assert p.bind_lists == ("0-78", "80-158") and p.engine.tensor_parallel_size == 1
    argv = p.to_server_argv()
    assert "--tensor-parallel-size" not in argv and argv[-2:] == ("--data-parallel-size", "2")
    tp2 = plan(m, llama8b, ranks=2)  # the same two ranks as one TP engine: one copy of the weights
    assert p.kv_cache_gib < tp2.kv_cache_gib
    four = plan(m, llama8b, ranks=2, extra_args=["-dp", "2"])  # DP 2 x TP 2: four lists, DP-major
    assert four.bind_lists == ("0-38", "40-78", "80-118", "120-158") and four.engine.tensor_parallel_size == 2
    with pytest.raises(PreflightError, match="4 ranks do not fit 2 usable CPUs"):
        plan(machine("x86-amd-epyc-this-box", 20), llama8b, extra_args=["-dp", "4"])


def test_each_node_of_a_multi_node_engine_gets_its_own_command(llama8b):
    """--nnodes/--node-rank/--master-addr (vLLM's mp executor): node 0 runs the API server, the others vLLM's
    `serve --headless` through HEADLESS_ENTRY; each binds only its own ranks (world / nodes)."""
    m = machine("graviton4", 256)
    words = ["--pipeline-parallel-size", "2", "--nnodes", "2", "--master-addr", "10.0.0.1", "--master-port", "29700"]
    head = plan(m, llama8b, ranks=2, extra_args=[*words, "--node-rank", "0"])
    other = plan(m, llama8b, ranks=2, extra_args=[*words, "--node-rank", "1"])
    assert head.bind_lists == other.bind_lists == ("0-30", "32-62")  # TP 2 on each node
    assert head.to_server_argv()[1:3] == ("-m", launch.SERVER_MODULE) and "--headless" not in head.to_server_argv()
    argv = other.to_server_argv()
    assert argv[1] == str(launch.HEADLESS_ENTRY) and argv[4] == "--headless" and "--port" not in argv
    assert head.env["VLLM_HOST_IP"] == "10.0.0.1" and "VLLM_HOST_IP" not in other.env  # vLLM finds node 1's own
    loop = plan(m, llama8b, extra_args=["-pp", "2", "-n", "2", "-r", "1", "--master-addr", "127.0.0.1"])
    assert loop.env["VLLM_HOST_IP"] == "127.0.0.1" and loop.bind_lists == ("0-62",)  # one PP stage here
    for words, said in (
        (["-pp", "2", "--nnodes", "2"], "needs --master-addr"),
        (["-pp", "3", "--nnodes", "2", "--master-addr", "h"], "does not divide the 3 workers"),
        (["-pp", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 is not below"),
        (["--node-rank", "1"], "without --nnodes"),
        (["-dp", "2", "--nnodes", "2", "--master-addr", "h"], "multi-node data parallel is not planned"),
        (["-pp", "2", "--enforce-eager"], "with --enforce-eager: vLLM 0.32 on CPU fails the first request"),
    ):
        with pytest.raises(PreflightError, match=said):
            plan(m, llama8b, extra_args=words)


def test_cpus_restricts_the_engine_to_a_slice(llama8b):
    m = machine("ampere-altra", 256)
    p = plan(m, llama8b, cpus="80-119", reserve=0)
    assert p.bind_lists == ("80-119",) and p.ranks == 1
    with pytest.raises(PreflightError, match="--cpus 999: none of them is usable"):
        plan(m, llama8b, cpus="999")
    with pytest.raises(UsageError, match="is not a CPU list"):
        plan(m, llama8b, cpus="0-a")


def test_explicit_half_precision_is_refused_where_the_bias_guard_applies(tmp_path):
    ck = read_checkpoint(write_checkpoint(tmp_path / "gb", scheme="groupwise", bias=True, layers=1))
    with pytest.raises(PreflightError, match=r"--dtype bfloat16 .* gives wrong outputs"):
        plan(machine("graviton4", 64), ck, extra_args=["--dtype", "bfloat16"])
    assert plan(machine("graviton4", 64), ck, extra_args=["--dtype", "float32"]).dtype == "float32"
    assert plan(machine("graviton4", 64), ck).dtype == "float32"
    assert plan(machine("x86-amd-epyc-this-box", 20), ck, extra_args=["--dtype", "bfloat16"]).dtype == "bfloat16"


def test_w4a8_on_an_amx_cpu_runs_float32(tmp_path):
    """vLLM 0.32's bf16 attention uses AMX without requesting AMX state: a W4A8 worker (no bf16 GEMM
    to request it first) dies of SIGILL on AMX Xeons (seen on this box). Dense models keep bf16."""
    amx = machine("x86-amd-epyc-this-box", 64, node_memory=None)
    amx = dataclasses.replace(amx, features=amx.features + ("amx_tile",))
    w4 = read_checkpoint(write_checkpoint(tmp_path / "w4", scheme="channelwise", layers=1))
    dense = read_checkpoint(write_checkpoint(tmp_path / "d", layers=1))
    assert plan(amx, w4).dtype == "float32" and "SIGILL" in "\n".join(plan(amx, w4).reasons)
    assert plan(amx, dense).dtype == "bfloat16"
    assert plan(amx, w4, extra_args=["--dtype", "float32"]).dtype == "float32"
    with pytest.raises(PreflightError, match=r"--dtype bfloat16 .* crashes .*SIGILL"):
        plan(amx, w4, extra_args=["--dtype", "bfloat16"])
    no_amx = machine("x86-amd-epyc-this-box", 64, node_memory=None)
    assert plan(no_amx, w4).dtype == plan(no_amx, dense).dtype  # only AMX CPUs are affected


def test_w4a16_is_refused_where_vllm_has_no_wna16_gemm_in_one_line(tmp_path):
    """vLLM 0.32 builds cpu_gemm_wna16 only into its AVX-512 x86 libraries: a W4A16 engine starts,
    then dies at its first forward on an AVX2-only EPYC (seen) and on aarch64 (seen under emulation,
    tests/arm). AVX-512 x86 runs it; W4A8 and dense are unaffected."""
    w16 = read_checkpoint(write_checkpoint(tmp_path / "w16", scheme="groupwise", group=128, layers=1, preset="w4a16"))
    assert w16.scheme is not None and w16.scheme.preset == "w4a16"
    avx512 = machine("x86-amd-epyc-this-box", 64, node_memory=None)
    avx2 = dataclasses.replace(avx512, features=tuple(f for f in avx512.features if not f.startswith("avx512")))
    for m in (avx2, machine("graviton3", 64), machine("graviton4", 64)):
        with pytest.raises(PreflightError, match=r"W4A16 .*cpu_gemm_wna16.*--preset w4a8") as e:
            plan(m, w16)
        assert "\n" not in str(e.value)
        assert plan(m, read_checkpoint(write_checkpoint(tmp_path / "w8a", scheme="channelwise", layers=1)))
    assert plan(avx512, w16).dtype == "bfloat16"
    w8 = read_checkpoint(write_checkpoint(tmp_path / "w8", scheme="groupwise", layers=1))
    assert plan(avx2, w8).dtype == "float32"  # no bf16 on this CPU; W4A8 still plans
