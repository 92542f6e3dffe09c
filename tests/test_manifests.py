"""`serve --emit k8s|compose`: deployment files from the plan, validated offline against published schemas.

Run: PYTHONPATH=. .venv/bin/python -m pytest tests/test_manifests.py -q   (~5 s)
kubernetes-validate (the API's own OpenAPI schemas for each Kubernetes release, bundled in its wheel) checks
the Deployment and Service strictly (unknown fields refused); check-jsonschema checks the compose file
against the compose-spec schema it bundles (--builtin-schema vendor.compose-spec). Neither reaches the
network. No cluster or Docker host runs them here.
"""

import importlib.util
import subprocess
import sys

import pytest
import yaml
from conftest import run_cli
from test_launch import write_checkpoint

MACHINES = "tests/fixtures/machines"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "Llama-Tiny-w4a8"
    return write_checkpoint(d, hidden=256, layers=1, heads=4, kv_heads=2, inter=512, vocab=1024, scheme="channelwise")


def _emit(*args) -> str:
    r = run_cli("serve", *args, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_kubernetes_one_guaranteed_pod_per_numa_node_on_arm64(model):
    """Ampere Altra: 2 NUMA nodes x 80 CPUs -> 2 pods, whole CPUs, requests == limits (Guaranteed QoS, so the
    static CPU manager pins them), memory = weights + KV + headroom, arm64 nodes, /health probes, a Service."""
    text = _emit(model, "--emit", "k8s", "--machine-dump", f"{MACHINES}/ampere-altra", "--kv-cache-gib", "8")
    assert text.startswith("# arm-int4 serve --emit k8s") and "never run on a cluster" in text
    deployment, service = yaml.safe_load_all(text)
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 2 and spec["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    res = c["resources"]
    assert res["requests"] == res["limits"] and res["limits"]["cpu"] == "79"  # 80 per node, one left
    # 8 GiB KV + 3 GiB + 1 GiB headroom + the weights (tiny): 13 GiB, rounded up to whole GiB
    assert res["limits"]["memory"] == "13Gi"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and env["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert c["args"][:2] == ["--model", "/models/Llama-Tiny-w4a8"] and "--dtype" in c["args"]  # the plan's
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.skipif(importlib.util.find_spec("kubernetes_validate") is None, reason="kubernetes-validate missing")
def test_kubernetes_manifests_validate_offline(model):
    import kubernetes_validate

    for machine in ("ampere-altra", "graviton4"):
        docs = list(yaml.safe_load_all(_emit(model, "--emit", "k8s", "--machine-dump", f"{MACHINES}/{machine}")))
        for doc in docs:
            kubernetes_validate.validate(doc, "1.33", strict=True)  # raises ValidationError
    bad = {**docs[0], "spec": {**docs[0]["spec"], "replica": 2}}  # a typo the strict check must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)


def test_compose_replicas_keep_their_cpus_behind_the_router(model, tmp_path):
    text = _emit(model, "--emit", "compose", "--replicas", "2", "--kv-cache-gib", "1")
    data = yaml.safe_load(text)
    services = data["services"]
    assert [services[f"replica-{k}"]["cpuset"] for k in (1, 2)] == ["0", "1"]  # this box's plan
    assert services["replica-1"]["environment"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert services["router"]["depends_on"] == {
        "replica-1": {"condition": "service_healthy"},
        "replica-2": {"condition": "service_healthy"},
    }
    assert "--worker-urls http://replica-1:8000 http://replica-2:8000" in services["router"]["command"][2]
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema missing")
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    r = subprocess.run([*check, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    services["replica-1"]["cpuset"] = 0  # compose wants a string: the schema must say no
    path.write_text(yaml.safe_dump(data))
    assert subprocess.run([*check, str(path)], capture_output=True, text=True, timeout=120).returncode == 1


def test_a_recorded_machine_is_for_planning_only(model):
    r = run_cli("serve", model, "--machine-dump", f"{MACHINES}/graviton4", timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "can only be planned for" in r.stderr
