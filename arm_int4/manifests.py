"""Deployment files rendered from a replica set's plan: Kubernetes manifests for an arm64 node pool, and a
docker-compose file for one host (`arm-int4 serve MODEL --emit k8s|compose`).

Kubernetes: one Deployment whose pods are the plan's replicas (one per NUMA node unless --replicas says
otherwise), Guaranteed QoS (requests == limits, whole CPUs) so the kubelet's static CPU manager pins each pod
to CPUs of its own; memory = weights + KV cache + headroom as the plan sized them; nodeSelector
kubernetes.io/arch=arm64; readiness and liveness on vLLM's /health; a Service in front (Kubernetes balances
the pods, no router). Inside a pod the CPU ids are whatever the CPU manager assigned, so vLLM binds them
itself (VLLM_CPU_OMP_THREADS_BIND=auto: its allowed CPUs on the first allowed NUMA node).
Compose: one service per replica with the plan's own CPU list (`cpuset`, host CPU ids, as the plan bound
them), memory limit and environment, and vllm-router in front, started once every replica is healthy.
Both are validated offline in tests (kubernetes-validate, check-jsonschema's bundled compose schema); no
cluster or Docker host ran them here. Pure: text out, nothing started.
"""

import dataclasses
import math
import re

from .checkpoint import CheckpointFacts, weights_in_memory
from .hardware import parse_cpulist
from .kvcache import HEADROOM_BYTES, HEADROOM_BYTES_PER_RANK, GiB
from .launch import SERVER_MODULE
from .replicas import POLICY, ReplicaSet

__all__ = ["KINDS", "IMAGE", "MODEL_ROOT", "kubernetes", "compose", "render", "replica_memory_gib"]

KINDS = ("k8s", "compose")
# vLLM's own CPU image for Arm (published on Docker Hub for every release since 0.11.2)
IMAGE = "vllm/vllm-openai-cpu:v0.32.0-arm64"
ROUTER_IMAGE = "python:3.12-slim"  # vllm-router is a wheel on the package index; pip installs it at start
MODEL_ROOT = "/models"  # where the model directory is mounted in the container
PORT = 8000
HEALTH_CHECK = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}/health')"  # exit 1 unless 200


def _name(text: str) -> str:
    """A DNS-1123 label from the model name ("SmolLM2-135M-Instruct" -> "smollm2-135m-instruct")."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50] or "model"


def replica_memory_gib(spec, facts: CheckpointFacts, arch: str) -> int:
    """Memory limit of one replica: its weights in memory + its KV cache (all ranks) + the plan's headroom."""
    kv = (spec.kv_cache_gib or 0) * GiB * spec.ranks
    need = weights_in_memory(facts, spec.dtype, arch) + kv + HEADROOM_BYTES + HEADROOM_BYTES_PER_RANK * spec.ranks
    return math.ceil(need / GiB)


def _args(spec, model_path: str, host: str) -> list:
    """The replica's server arguments (after `python -m MODULE`) as the container runs them: the same spec
    with the container's model path, host and port, rendered once."""
    inside = dataclasses.replace(spec, model_dir=model_path, host=host, port=PORT)
    return list(inside.to_server_argv()[3:])


def kubernetes(rs: ReplicaSet, facts: CheckpointFacts, arch: str, image: str = IMAGE) -> list:
    """[Deployment, Service] as dicts (kubernetes-validate checks them against the API's schemas)."""
    spec = rs.replicas[0]
    name = _name(spec.served_model_name)
    # whole CPUs, one fewer than the slice (the kubelet reserves some of every node for system daemons, so a
    # pod asking for a whole NUMA node would never schedule); vLLM keeps one of them for its scheduler
    cpus = max(1, max(len(parse_cpulist(c)) for c in rs.cpus) - 1)
    mem = f"{replica_memory_gib(spec, facts, arch)}Gi"
    env = {**spec.env, "VLLM_CPU_OMP_THREADS_BIND": "auto"}  # pod CPU ids come from the CPU manager
    env.pop("LD_PRELOAD", None)  # a path on this machine, not in the image
    model = f"{MODEL_ROOT}/{spec.served_model_name}"
    probe = {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10}
    container = {
        "name": "vllm",
        "image": image,
        "command": ["python3", "-m", SERVER_MODULE],
        "args": _args(spec, model, "0.0.0.0"),
        "env": [{"name": k, "value": str(v)} for k, v in env.items() if k != "VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {  # requests == limits, whole CPUs: Guaranteed QoS, pinned by the static CPU manager
            "requests": {"cpu": str(cpus), "memory": mem},
            "limits": {"cpu": str(cpus), "memory": mem},
        },
        "readinessProbe": {**probe, "initialDelaySeconds": 20},
        "livenessProbe": {**probe, "initialDelaySeconds": 600, "failureThreshold": 6},  # first start compiles
        "volumeMounts": [{"name": "models", "mountPath": MODEL_ROOT, "readOnly": True}],
    }
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "arm-int4"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": len(rs.replicas),
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/arch": "arm64"},
                    "containers": [container],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "arm-int4-models"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def compose(rs: ReplicaSet, facts: CheckpointFacts, arch: str, image: str = IMAGE) -> dict:
    """A compose file: one service per replica (its CPU list, memory limit, env), vllm-router in front."""
    services: dict = {}
    model = f"{MODEL_ROOT}/{rs.replicas[0].served_model_name}"
    for k, (spec, cpus) in enumerate(zip(rs.replicas, rs.cpus, strict=True)):
        env = {k_: str(v) for k_, v in spec.env.items() if k_ != "LD_PRELOAD"}
        services[f"replica-{k + 1}"] = {
            "image": image,
            "command": ["python3", "-m", SERVER_MODULE, *_args(spec, model, "0.0.0.0")],
            "environment": env,
            "cpuset": cpus,  # host CPU ids: the plan's bind list is within them
            "mem_limit": f"{replica_memory_gib(spec, facts, arch)}g",
            "volumes": [f"{spec.model_dir}:{model}:ro"],
            "healthcheck": {
                "test": ["CMD", "python3", "-c", HEALTH_CHECK],
                "interval": "10s",
                "start_period": "600s",
            },
            "restart": "unless-stopped",
        }
    workers = [f"http://replica-{k + 1}:{PORT}" for k in range(len(rs.replicas))] + list(rs.upstreams)
    router = f"pip install --no-cache-dir vllm-router==0.1.17 && exec vllm-router --host 0.0.0.0 --port {PORT} " + (
        f"--worker-urls {' '.join(workers)} --policy {POLICY} --health-check-interval-secs 5"
    )
    services["router"] = {
        "image": ROUTER_IMAGE,
        "command": ["sh", "-c", router],
        "ports": [f"{rs.router.host}:{rs.router.port}:{PORT}"],
        "depends_on": {f"replica-{k + 1}": {"condition": "service_healthy"} for k in range(len(rs.replicas))},
        "restart": "unless-stopped",
    }
    return {"name": f"arm-int4-{_name(rs.replicas[0].served_model_name)}", "services": services}


def render(kind: str, rs: ReplicaSet, facts: CheckpointFacts, arch: str) -> str:
    """YAML text of `kind` ("k8s": documents separated by ---; "compose")."""
    import yaml  # PyYAML: in the serving environment (vLLM needs it)

    class Plain(yaml.SafeDumper):  # no &anchors / *aliases for repeated mappings: easier to read and edit
        def ignore_aliases(self, data):
            return True

    dump = lambda d: yaml.dump(d, Dumper=Plain, sort_keys=False)

    head = (
        f"# arm-int4 serve --emit {kind}: rendered from the plan of {len(rs.replicas)} replica(s); "
        "validated offline against the schemas, never run on a cluster by arm-int4's tests\n"
    )
    if kind == "k8s":
        docs = kubernetes(rs, facts, arch)
        note = "# the model directory is read from the PersistentVolumeClaim arm-int4-models (create it first)\n"
        return head + note + "---\n".join(dump(d) for d in docs)
    return head + dump(compose(rs, facts, arch))
