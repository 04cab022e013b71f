"""Pure functions that build the desired child objects of one DiffusionGemma resource."""

from __future__ import annotations

import math
import re
from typing import Any

from dgemma_operator import models
from dgemma_operator.profiles import GPU_PRODUCT_LABEL, GPU_RESOURCE, profile

MANAGER = "dgemma-operator"
GRPC_PORT = 50051
METRICS_PORT = 9090
HEALTH_PORT = 50052  # plaintext gRPC health only, for the kubelet's probes when the worker serves TLS
TLS_MOUNT = "/etc/dgemma/tls"
PRESTOP_SLEEP_S = 5
# Time for SIGKILL to wait beyond the worker's own drain: the preStop sleep plus slack for exit.
SHUTDOWN_SLACK_S = 15
STARTUP_PROBE_PERIOD_S = 10
SOURCE_MOUNT = "/model-source"
MAX_DNS_LABEL = 63

Body = dict[str, Any]


def child_name(resource_name: str) -> str:
    """Name shared by the Deployment, Service and PodDisruptionBudget of a resource."""
    return f"{resource_name}-worker"


def label_safe(value: str) -> str:
    """A label value (63 chars of [A-Za-z0-9._-], alphanumeric at both ends) derived from any string."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:MAX_DNS_LABEL]
    return cleaned.strip("._-") or "unnamed"


def selector_labels(resource_name: str) -> dict[str, str]:
    """Labels that select one resource's worker pods (immutable in the Deployment)."""
    return {
        "app.kubernetes.io/name": "dgemma-worker",
        "app.kubernetes.io/instance": resource_name,
    }


def worker_labels(resource_name: str, spec: models.DiffusionGemmaSpec) -> dict[str, str]:
    """All labels of the worker pods and the children; the gateway selects on these."""
    return {
        **selector_labels(resource_name),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": MANAGER,
        "dgemma.io/variant": resource_name,
        "dgemma.io/model": label_safe(spec.served_model_name),
    }


def selector_string(resource_name: str) -> str:
    """The pod selector as a string, for status.selector and the scale subresource."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(resource_name).items())


def endpoint(resource_name: str, namespace: str) -> str:
    """The workers' in-cluster gRPC address the gateway uses."""
    return f"{child_name(resource_name)}.{namespace}.svc:{GRPC_PORT}"


def child_metadata(owner: Body, labels: Body) -> Body:
    """Name, namespace, labels and owner of a child object (every child shares the resource's name)."""
    return {
        "name": child_name(owner["metadata"]["name"]),
        "namespace": owner["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(owner)],
    }


def owner_reference(owner: Body) -> Body:
    """An ownerReference that makes the children garbage-collected with the resource."""
    return {
        "apiVersion": f"{models.GROUP}/{models.VERSION}",
        "kind": models.KIND,
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def semantic_problems(name: str, spec: models.DiffusionGemmaSpec) -> list[str]:
    """Errors the schema cannot express; any of them makes the resource Degraded."""
    problems: list[str] = []
    if len(child_name(name)) > MAX_DNS_LABEL:
        problems.append(
            f"name {name!r} is too long: the worker Service {child_name(name)!r} must be at most "
            f"{MAX_DNS_LABEL} characters"
        )
    if spec.gpu.profile == "custom" and not spec.gpu.product and not spec.gpu.node_selector:
        problems.append("gpu.profile 'custom' needs gpu.product or gpu.nodeSelector to say which GPUs to use")
    limits = (spec.gpu.resources or {}).get("limits") or {}
    if GPU_RESOURCE in limits and str(limits[GPU_RESOURCE]) != str(spec.gpu.count):
        problems.append(
            f"gpu.resources.limits[{GPU_RESOURCE!r}]={limits[GPU_RESOURCE]} "
            f"contradicts gpu.count={spec.gpu.count}"
        )
    if spec.model.pvc is not None and spec.cache.claim_name == spec.model.pvc.claim_name:
        problems.append(
            "cache.claimName must differ from model.pvc.claimName (the source is mounted read-only)"
        )
    return problems


def dtype(spec: models.DiffusionGemmaSpec) -> str:
    """The dtype/quantization in effect."""
    return spec.gpu.dtype or profile(spec.gpu.profile).dtype


def tokens_per_second_prior(spec: models.DiffusionGemmaSpec) -> float:
    """Expected tokens/s per replica until measured."""
    return spec.gpu.tokens_per_second_prior or profile(spec.gpu.profile).tokens_per_second_prior


def _model_location(name: str, spec: models.DiffusionGemmaSpec) -> str:
    source = spec.model
    if source.hugging_face is not None:
        return source.hugging_face.id
    if source.pvc is not None:
        return f"{SOURCE_MOUNT}/{source.pvc.path.strip('/')}".rstrip("/")
    return f"{spec.cache.mount_path.rstrip('/')}/url/{name}"


def _env(name: str, spec: models.DiffusionGemmaSpec) -> list[Body]:
    gen = spec.generation
    values: list[tuple[str, object | None]] = [
        ("DGEMMA_MODEL", _model_location(name, spec)),
        ("DGEMMA_MODEL_REVISION", spec.model.hugging_face.revision if spec.model.hugging_face else None),
        ("DGEMMA_SERVED_MODEL_NAME", spec.served_model_name),
        ("DGEMMA_PORT", GRPC_PORT),
        ("DGEMMA_METRICS_PORT", METRICS_PORT),
        ("DGEMMA_MAX_ACTIVE", spec.worker.max_active),
        ("DGEMMA_MAX_QUEUE", spec.worker.max_queue),
        ("DGEMMA_DTYPE", dtype(spec)),
        ("DGEMMA_DEVICE", "cuda"),
        ("DGEMMA_DRAIN_GRACE_S", spec.worker.drain_grace_seconds),
        ("DGEMMA_LOG_FORMAT", spec.worker.log_format),
        *_tls_env(spec),
        ("DGEMMA_DEFAULT_MAX_DENOISING_STEPS", gen.max_denoising_steps),
        ("DGEMMA_DEFAULT_T_MIN", gen.t_min),
        ("DGEMMA_DEFAULT_T_MAX", gen.t_max),
        ("DGEMMA_DEFAULT_ENTROPY_BOUND", gen.entropy_bound),
        ("DGEMMA_DEFAULT_STABILITY_THRESHOLD", gen.stability_threshold),
        ("DGEMMA_DEFAULT_CONFIDENCE_THRESHOLD", gen.confidence_threshold),
        ("HF_HOME", _hf_home(spec)),
        # The init container fetched the weights; the worker must not download them again.
        ("HF_HUB_OFFLINE", "1" if spec.model.hugging_face else None),
    ]
    env: list[Body] = [{"name": key, "value": str(value)} for key, value in values if value is not None]
    env.extend(_token_env(spec))
    return env


def _tls_env(spec: models.DiffusionGemmaSpec) -> list[tuple[str, object | None]]:
    if spec.worker.tls_secret is None:
        return []
    return [("DGEMMA_TLS_CERT_FILE", f"{TLS_MOUNT}/tls.crt"), ("DGEMMA_TLS_KEY_FILE", f"{TLS_MOUNT}/tls.key"),
            ("DGEMMA_TLS_CLIENT_CA_FILE", f"{TLS_MOUNT}/ca.crt"), ("DGEMMA_HEALTH_PORT", HEALTH_PORT)]


def _hf_home(spec: models.DiffusionGemmaSpec) -> str:
    return f"{spec.cache.mount_path.rstrip('/')}/huggingface"


def _token_env(spec: models.DiffusionGemmaSpec) -> list[Body]:
    secret = spec.model.token_secret
    if secret is None:
        return []
    ref: Body = {"name": secret.name, "key": secret.key, "optional": False}
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]


def _restricted_container_security() -> Body:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


_URL_FETCH = (
    "import os, pathlib, shutil, tarfile, urllib.request\n"
    "dest = pathlib.Path(os.environ['DGEMMA_MODEL'])\n"
    "if not (dest / '.complete').exists():\n"
    "    dest.mkdir(parents=True, exist_ok=True)\n"
    "    archive = dest.with_suffix('.download')\n"
    "    with urllib.request.urlopen(os.environ['DGEMMA_MODEL_URL']) as r, open(archive, 'wb') as f:\n"
    "        shutil.copyfileobj(r, f)\n"
    "    with tarfile.open(archive) as t:\n"
    "        t.extractall(dest, filter='data')\n"
    "    archive.unlink()\n"
    "    (dest / '.complete').touch()\n"
)


def _fetch_container(name: str, spec: models.DiffusionGemmaSpec, mounts: list[Body]) -> Body | None:
    """The init container that fills the shared cache once; None when the source is a PVC."""
    source = spec.model
    env: list[Body] = [{"name": "HF_HOME", "value": _hf_home(spec)}, *_token_env(spec)]
    if source.hugging_face is not None:
        command = ["hf", "download", source.hugging_face.id, "--revision", source.hugging_face.revision]
    elif source.url is not None:
        command = ["python", "-c", _URL_FETCH]
        env += [
            {"name": "DGEMMA_MODEL", "value": _model_location(name, spec)},
            {"name": "DGEMMA_MODEL_URL", "value": source.url},
        ]
    else:
        return None
    return {
        "name": "fetch-model",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": env,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": mounts,
    }


def _resources(spec: models.DiffusionGemmaSpec) -> Body:
    prof = profile(spec.gpu.profile)
    gpus = str(spec.gpu.count)
    base: Body = {
        "requests": {"cpu": prof.cpu, "memory": prof.memory, GPU_RESOURCE: gpus},
        "limits": {"memory": prof.memory, GPU_RESOURCE: gpus},
    }
    for section, values in (spec.gpu.resources or {}).items():
        if isinstance(values, dict):
            base[section] = {**base.get(section, {}), **{k: str(v) for k, v in values.items()}}
    return base


def _node_selector(spec: models.DiffusionGemmaSpec) -> dict[str, str]:
    prof = profile(spec.gpu.profile)
    selector: dict[str, str] = {"kubernetes.io/arch": spec.gpu.architecture or prof.architecture}
    product = spec.gpu.product or prof.gpu_product
    if product:
        selector[GPU_PRODUCT_LABEL] = product
    return {**selector, **(spec.gpu.node_selector or {})}


def _tolerations(spec: models.DiffusionGemmaSpec) -> list[Body]:
    if spec.gpu.tolerations is not None:
        return list(spec.gpu.tolerations)
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _volumes(spec: models.DiffusionGemmaSpec) -> list[Body]:
    cache: Body
    if spec.cache.claim_name:
        cache = {"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name}}
    else:
        cache = {"name": "model-cache", "emptyDir": {"sizeLimit": spec.cache.size_limit}}
    volumes = [
        cache,
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        # torch uses /dev/shm for tensors shared between threads and processes.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    if spec.model.pvc is not None:
        volumes.append(
            {
                "name": "model-source",
                "persistentVolumeClaim": {"claimName": spec.model.pvc.claim_name, "readOnly": True},
            }
        )
    if spec.worker.tls_secret is not None:
        # A mounted Secret is updated in place when cert-manager renews it; the worker re-reads the files.
        volumes.append({"name": "tls", "secret": {"secretName": spec.worker.tls_secret, "defaultMode": 0o440}})
    return volumes


def _mounts(spec: models.DiffusionGemmaSpec) -> list[Body]:
    mounts: list[Body] = [
        {"name": "model-cache", "mountPath": spec.cache.mount_path},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.model.pvc is not None:
        mounts.append({"name": "model-source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    return mounts


def _worker_mounts(spec: models.DiffusionGemmaSpec) -> list[Body]:
    """The worker container's mounts: the shared ones and its TLS Secret (the init container needs no key)."""
    tls = [{"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}] if spec.worker.tls_secret else []
    return [*_mounts(spec), *tls]


def _grpc_probe(spec: models.DiffusionGemmaSpec, period_s: int, failures: int, timeout_s: int = 5) -> Body:
    # The kubelet's gRPC probe speaks no TLS: a TLS worker answers it on its plaintext health-only port.
    return {
        "grpc": {"port": HEALTH_PORT if spec.worker.tls_secret else GRPC_PORT},
        "periodSeconds": period_s,
        "failureThreshold": failures,
        "timeoutSeconds": timeout_s,
    }


def deployment(owner: Body, spec: models.DiffusionGemmaSpec) -> Body:
    """The worker Deployment."""
    name = owner["metadata"]["name"]
    labels = worker_labels(name, spec)
    mounts = _mounts(spec)
    worker: Body = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dgemma", "worker"],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            *([{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}] if spec.worker.tls_secret else []),
        ],
        "env": _env(name, spec),
        "resources": _resources(spec),
        # Loading 50 GB of weights takes minutes: the startup probe holds off liveness that long.
        "startupProbe": _grpc_probe(
            spec, STARTUP_PROBE_PERIOD_S, math.ceil(spec.worker.startup_timeout_seconds / STARTUP_PROBE_PERIOD_S)
        ),
        "readinessProbe": _grpc_probe(spec, 5, 3),
        "livenessProbe": _grpc_probe(spec, 10, 6),
        # The sleep lets endpoints drop the pod before SIGTERM starts the worker's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": _worker_mounts(spec),
    }
    pod_spec: Body = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": _node_selector(spec),
        "tolerations": _tolerations(spec),
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + spec.worker.drain_grace_seconds + SHUTDOWN_SLACK_S,
        "containers": [worker],
        "volumes": _volumes(spec),
    }
    fetch = _fetch_container(name, spec, mounts)
    if fetch is not None:
        pod_spec["initContainers"] = [fetch]
    if spec.gpu.affinity:
        pod_spec["affinity"] = spec.gpu.affinity
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, labels),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # One GPU replica at a time; never below the desired count while rolling.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": spec.worker.startup_timeout_seconds + 600,
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(owner: Body, spec: models.DiffusionGemmaSpec) -> Body:
    """The headless worker Service; its EndpointSlices are how the gateway finds replicas."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, worker_labels(name, spec)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def pod_disruption_budget(owner: Body, spec: models.DiffusionGemmaSpec) -> Body:
    """At most one replica voluntarily disrupted at a time."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(owner, worker_labels(name, spec)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name)}},
    }


def children(owner: Body, spec: models.DiffusionGemmaSpec) -> list[Body]:
    """All desired children, in the order they are applied."""
    return [service(owner, spec), pod_disruption_budget(owner, spec), deployment(owner, spec)]
