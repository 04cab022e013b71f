"""Pure functions that build the desired child objects of one DiffusionGemma resource.

A dgemma variant gets a Deployment of `dgemma worker` pods, a headless Service and a PodDisruptionBudget; a
vLLM variant the same three around `vllm serve` (probes on /health, metrics on /metrics, its API on the
Service's `http` port); an external variant nothing, since nothing of it runs in the cluster.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from dgemma_common import naming, profiles, vllm
from dgemma_common.dtypes import dtype_problem
from dgemma_common.naming import MANAGER as MANAGER  # re-exported: the operator's field manager
from dgemma_common.naming import RUNTIME_LABEL as RUNTIME_LABEL
from dgemma_common.naming import WORKER_GRPC_PORT as GRPC_PORT
from dgemma_common.naming import WORKER_HEALTH_PORT as HEALTH_PORT
from dgemma_common.naming import WORKER_METRICS_PORT as METRICS_PORT
from dgemma_common.profiles import GPU_PRODUCT_LABEL, GPU_RESOURCE, profile, vllm_memory_gib, worker_memory_gib
from dgemma_common.variants import variant_name
from dgemma_operator import models

VLLM_USER = 2000  # the `vllm` user of vLLM's image
WORKER_USER = 1000
TLS_MOUNT = "/etc/dgemma/tls"
# spec.worker.apiKeySecret's key as a keys file: the dgemma worker's DGEMMA_API_KEYS_FILE; vLLM's launcher reads it.
API_KEYS_MOUNT = "/etc/dgemma/api-keys"
API_KEYS_FILE = "keys"
# vLLM 0.24.0 takes one key, from VLLM_API_KEY, and compares it whole: a Secret made from an echoed file (its
# newline) would refuse every request, and an empty key leaves vLLM open. So vLLM starts through this launcher,
# which reads the mounted Secret by the rule of every dgemma key reader (dgemma_common.auth.parse_key_lines: one
# key per line, whitespace around it dropped, blank and # lines skipped, `KEY no-overflow` options dropped),
# refuses to start without a key, and replaces itself with vLLM (exec: vLLM stays PID 1 and gets SIGTERM) given
# the first key in VLLM_API_KEY (not an argument: vLLM logs its non-default arguments). Run by python in
# vLLM's image; tests/operator check it against the rule on the same values.
VLLM_KEY_LAUNCHER = (
    "import os, sys\n"
    "keys = []\n"
    "for line in open(sys.argv[1], encoding='utf-8', errors='replace').read().splitlines():\n"
    "    line = line.strip()\n"
    "    if line and not line.startswith('#'):\n"
    "        key, *words = line.split()\n"
    "        keys.append(key if words and set(words) <= {'no-overflow'} else line)\n"
    "if not keys:\n"
    "    sys.exit(f'{sys.argv[1]} holds no API key (spec.worker.apiKeySecret): not starting vLLM without one')\n"
    "os.environ['VLLM_API_KEY'] = keys[0]\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
PRESTOP_SLEEP_S = 5
# Time for SIGKILL to wait beyond the worker's own drain: the preStop sleep plus slack for exit.
SHUTDOWN_SLACK_S = 15
STARTUP_PROBE_PERIOD_S = 10
SOURCE_MOUNT = "/model-source"
MAX_DNS_LABEL = 63

Body = dict[str, Any]


def child_name(resource_name: str) -> str:
    """Name shared by the Deployment, Service and PodDisruptionBudget of a resource."""
    return naming.worker_service(resource_name)


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
    """All labels of the worker pods and the children; the gateway selects on these. A vLLM variant's carry its
    runtime too (dgemma's do not, so that existing workers are not rolled for a new label)."""
    runtime = {RUNTIME_LABEL: spec.runtime} if spec.runtime != "dgemma" else {}
    return {
        **selector_labels(resource_name),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": MANAGER,
        naming.VARIANT_LABEL: resource_name,
        naming.MODEL_LABEL: label_safe(spec.served_model_name),
        **runtime,
    }


def selector_string(resource_name: str) -> str:
    """The pod selector as a string, for status.selector and the scale subresource."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(resource_name).items())


def endpoint(resource_name: str, namespace: str, spec: models.DiffusionGemmaSpec) -> str:
    """Where the gateway reaches the variant: the workers' gRPC Service, vLLM's API root, or the external API."""
    if spec.runtime == "vllm":
        return f"http://{child_name(resource_name)}.{namespace}.svc:{vllm.PORT}{vllm.API_PREFIX}"
    if spec.runtime == "external" and spec.external is not None:
        return spec.external.base_url
    return naming.worker_address(resource_name, namespace)


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
    problems = _runtime_problems(spec) + _env_problems(name, spec)
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
    gpu = profile(spec.gpu.profile)
    # The dtype and unified-memory rules are the dgemma worker's (its kernels, its loading); vLLM sizes and
    # checks its own (an external variant runs nothing).
    if spec.runtime == "dgemma" and spec.gpu.product is None and gpu.gpu_product is not None:
        trouble = dtype_problem(dtype(spec), gpu.compute_capability, f"profile {gpu.name} ({gpu.gpu_product})")
        if trouble is not None:
            problems.append(f"gpu.dtype: {trouble}")
        given = _given_memory(spec)
        if gpu.node_memory_gib is not None and given is None and worker_memory(spec) > gpu.node_memory_gib:
            problems.append(
                f"worker.maxActive: {spec.worker.max_active} requests in {dtype(spec)} need {worker_memory(spec)}Gi "
                f"of unified memory, more than a {gpu.name} node's {gpu.node_memory_gib}Gi "
                "(lower worker.maxActive or generation.canvasLength, pick a smaller dtype, or set "
                "gpu.resources for a smaller model)"
            )
    if spec.model is not None and spec.model.pvc is not None and spec.cache.claim_name == spec.model.pvc.claim_name:
        problems.append(
            "cache.claimName must differ from model.pvc.claimName (the source is mounted read-only)"
        )
    return problems


def _runtime_problems(spec: models.DiffusionGemmaSpec) -> list[str]:
    """The CRD's runtime rules, checked again here (an API server without CEL lets them through)."""
    problems = []
    if spec.runtime != "external" and spec.model is None:
        problems.append(f"runtime {spec.runtime} needs model")
    if spec.runtime == "dgemma" and not spec.image:
        problems.append("runtime dgemma needs image")
    if (spec.runtime == "external") != (spec.external is not None):
        problems.append("the external section goes with runtime external, and only with it")
    if spec.vllm is not None and spec.runtime != "vllm":
        problems.append("the vllm section is for runtime vllm")
    if spec.runtime == "external" and spec.autoscaling.enabled:
        problems.append("an external variant has no replicas to autoscale")
    if spec.runtime != "dgemma" and spec.worker.tls_secret:
        # The gateway reaches vLLM over plain HTTP inside the cluster (the NetworkPolicy admits only it).
        problems.append("worker.tlsSecret is for runtime dgemma")
    if spec.runtime == "external" and (spec.worker.api_key_secret or spec.worker.env):
        problems.append("worker.apiKeySecret and worker.env are for runtimes that run pods (an external API's key "
                        "is external.apiKeySecret)")
    fixed = [f for f in models.VLLM_FIXED_SETTINGS if getattr(spec.generation, _snake(f)) is not None]
    if spec.runtime == "vllm" and fixed:
        problems.append(f"generation.{', '.join(fixed)} cannot be set for runtime vllm: vLLM {vllm.VERSION} reads "
                        "them from the checkpoint's generation_config.json")
    return problems


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def vllm_defaults(spec: models.DiffusionGemmaSpec) -> vllm.RecipeSettings:
    """The recipe's settings for the variant's GPU profile."""
    return vllm.RECIPE[spec.gpu.profile]


def dtype(spec: models.DiffusionGemmaSpec) -> str:
    """The dtype/quantization in effect (vLLM's recipe has its own per-profile defaults)."""
    if spec.gpu.dtype:
        return spec.gpu.dtype
    return vllm_defaults(spec).dtype if spec.runtime == "vllm" else profile(spec.gpu.profile).dtype


def worker_memory(spec: models.DiffusionGemmaSpec) -> int:
    """The server container's memory request and limit in GiB (on unified memory it holds the weights too)."""
    gpu = profile(spec.gpu.profile)
    if spec.runtime == "vllm":
        utilization = (spec.vllm and spec.vllm.gpu_memory_utilization) or vllm_defaults(spec).gpu_memory_utilization
        return vllm_memory_gib(gpu, utilization)
    return worker_memory_gib(gpu, dtype(spec), spec.worker.max_active, spec.generation.canvas_length)


def tokens_per_second_prior(spec: models.DiffusionGemmaSpec) -> float:
    """Expected tokens/s per replica until measured."""
    return profiles.tokens_per_second_prior(spec.gpu.profile, spec.gpu.tokens_per_second_prior, spec.runtime)


def _source(spec: models.DiffusionGemmaSpec) -> models.ModelSource:
    assert spec.model is not None, "runtimes that run pods have a model (semantic_problems)"
    return spec.model


def _model_location(name: str, spec: models.DiffusionGemmaSpec) -> str:
    source = _source(spec)
    if source.hugging_face is not None:
        return source.hugging_face.id
    if source.pvc is not None:
        return f"{SOURCE_MOUNT}/{source.pvc.path.strip('/')}".rstrip("/")
    return f"{spec.cache.mount_path.rstrip('/')}/url/{name}"


def _env(name: str, namespace: str | None, spec: models.DiffusionGemmaSpec) -> list[Body]:
    gen = spec.generation
    source = _source(spec)
    values: list[tuple[str, object | None]] = [
        # The gateway's name for this variant: the worker's metrics carry it as their `variant` label.
        ("DGEMMA_VARIANT", variant_name(namespace, name)),
        ("DGEMMA_MODEL", _model_location(name, spec)),
        ("DGEMMA_MODEL_REVISION", source.hugging_face.revision if source.hugging_face else None),
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
        ("DGEMMA_API_KEYS_FILE", f"{API_KEYS_MOUNT}/{API_KEYS_FILE}" if spec.worker.api_key_secret else None),
        ("DGEMMA_DEFAULT_MAX_DENOISING_STEPS", gen.max_denoising_steps),
        ("DGEMMA_DEFAULT_T_MIN", gen.t_min),
        ("DGEMMA_DEFAULT_T_MAX", gen.t_max),
        ("DGEMMA_DEFAULT_ENTROPY_BOUND", gen.entropy_bound),
        ("DGEMMA_DEFAULT_STABILITY_THRESHOLD", gen.stability_threshold),
        ("DGEMMA_DEFAULT_CONFIDENCE_THRESHOLD", gen.confidence_threshold),
        *_hub_env(spec),
        # The compiled step's kernels (worker --compile, on by default with CUDA): kept on the cache volume,
        # so a restarted replica (or, on a shared claim, the next one) skips most of the compiling; the root
        # file system is read-only.
        ("TORCHINDUCTOR_CACHE_DIR", f"{spec.cache.mount_path.rstrip('/')}/torchinductor"),
        ("TRITON_CACHE_DIR", f"{spec.cache.mount_path.rstrip('/')}/triton"),
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


def _hub_env(spec: models.DiffusionGemmaSpec) -> list[tuple[str, object | None]]:
    return [
        ("HF_HOME", _hf_home(spec)),
        # The init container fetched the weights; the server must not download them again.
        ("HF_HUB_OFFLINE", "1" if _source(spec).hugging_face else None),
    ]


def _token_env(spec: models.DiffusionGemmaSpec) -> list[Body]:
    secret = _source(spec).token_secret
    if secret is None:
        return []
    ref: Body = {"name": secret.name, "key": secret.key, "optional": False}
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]


def _vllm_command(spec: models.DiffusionGemmaSpec) -> list[str]:
    """`vllm serve`; with a key Secret, through the launcher that gives vLLM the mounted key."""
    if spec.worker.api_key_secret is None:
        return ["vllm", "serve"]
    return ["python3", "-c", VLLM_KEY_LAUNCHER, f"{API_KEYS_MOUNT}/{API_KEYS_FILE}", "vllm", "serve"]


def server_env(name: str, namespace: str | None, spec: models.DiffusionGemmaSpec) -> list[Body]:
    """The server container's own variables (dgemma worker or vLLM), which spec.worker.env may not override."""
    return _vllm_env(spec) if spec.runtime == "vllm" else _env(name, namespace, spec)


def reserved_env_names(name: str, spec: models.DiffusionGemmaSpec) -> set[str]:
    """Names spec.worker.env may not take: the container's own, and VLLM_API_KEY, which vLLM's launcher sets."""
    launcher = {"VLLM_API_KEY"} if spec.runtime == "vllm" and spec.worker.api_key_secret else set()
    return {e["name"] for e in server_env(name, None, spec)} | launcher


def _user_env(spec: models.DiffusionGemmaSpec) -> list[Body]:
    """spec.worker.env as the API writes it, after the operator's own (so $(NAME) can refer to those)."""
    return [e.model_dump(by_alias=True, exclude_none=True) for e in spec.worker.env or ()]


def _env_problems(name: str, spec: models.DiffusionGemmaSpec) -> list[str]:
    """worker.env may add variables, never replace one the operator sets (which the worker or probes rely on)."""
    given = [e.name for e in spec.worker.env or ()]
    problems = []
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        problems.append(f"worker.env: {', '.join(twice)} given more than once")
    if spec.runtime != "external" and spec.model is not None:
        taken = sorted(set(given) & reserved_env_names(name, spec))
        if taken:
            problems.append(f"worker.env: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the "
                            "operator and cannot be overridden (use the resource's own fields)")
    return problems


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
    """The init container that fills the shared cache once; None when the source is a PVC. It runs in the
    server's own image (the dgemma worker's, or vLLM's: both carry huggingface_hub's `hf` and python)."""
    source = _source(spec)
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
        "image": image(spec),
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": env,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": mounts,
    }


def _given_memory(spec: models.DiffusionGemmaSpec) -> str | None:
    """A memory quantity the spec sets under gpu.resources (requests first), replacing the derived one."""
    given = spec.gpu.resources or {}
    for section in ("requests", "limits"):
        values = given.get(section)
        if isinstance(values, dict) and values.get("memory") is not None:
            return str(values["memory"])
    return None


def _resources(spec: models.DiffusionGemmaSpec) -> Body:
    prof = profile(spec.gpu.profile)
    gpus = str(spec.gpu.count)
    # One given quantity stands for both: a limit below the derived request would be refused by the API.
    memory = _given_memory(spec) or f"{worker_memory(spec)}Gi"
    base: Body = {
        "requests": {"cpu": prof.cpu, "memory": memory, GPU_RESOURCE: gpus},
        "limits": {"memory": memory, GPU_RESOURCE: gpus},
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
    pvc = _source(spec).pvc
    if pvc is not None:
        claim = {"claimName": pvc.claim_name, "readOnly": True}
        volumes.append({"name": "model-source", "persistentVolumeClaim": claim})
    if spec.worker.tls_secret is not None:
        # A mounted Secret is updated in place when cert-manager renews it; the worker re-reads the files.
        volumes.append({"name": "tls", "secret": {"secretName": spec.worker.tls_secret, "defaultMode": 0o440}})
    key = spec.worker.api_key_secret
    if key is not None:
        # Updated in place when the Secret changes: a dgemma worker re-reads the file (a rotation needs no restart);
        # vLLM's launcher reads it when the pod starts.
        volumes.append({"name": "api-keys", "secret": {"secretName": key.name, "defaultMode": 0o440,
                                                       "items": [{"key": key.key, "path": API_KEYS_FILE}]}})
    return volumes


def _mounts(spec: models.DiffusionGemmaSpec) -> list[Body]:
    mounts: list[Body] = [
        {"name": "model-cache", "mountPath": spec.cache.mount_path},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if _source(spec).pvc is not None:
        mounts.append({"name": "model-source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    return mounts


def _worker_mounts(spec: models.DiffusionGemmaSpec) -> list[Body]:
    """The server container's mounts: the shared ones, and a worker's TLS and API key Secrets (the init container
    needs neither)."""
    tls = [{"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}] if spec.worker.tls_secret else []
    keys = [{"name": "api-keys", "mountPath": API_KEYS_MOUNT, "readOnly": True}] if spec.worker.api_key_secret else []
    return [*_mounts(spec), *tls, *keys]


def _probes(spec: models.DiffusionGemmaSpec, action: Body) -> Body:
    """Startup, readiness and liveness on one check (a gRPC health call, or GET /health)."""

    def probe(period_s: int, failures: int) -> Body:
        return {**action, "periodSeconds": period_s, "failureThreshold": failures, "timeoutSeconds": 5}

    return {
        # Loading 50 GB of weights takes minutes: the startup probe holds off liveness that long.
        "startupProbe": probe(STARTUP_PROBE_PERIOD_S,
                              math.ceil(spec.worker.startup_timeout_seconds / STARTUP_PROBE_PERIOD_S)),
        "readinessProbe": probe(5, 3),
        "livenessProbe": probe(10, 6),
    }


def image(spec: models.DiffusionGemmaSpec) -> str:
    """The server's image: the dgemma worker's, or vLLM's."""
    if spec.runtime == "vllm":
        return (spec.vllm or models.VllmSpec()).image
    assert spec.image is not None, "runtime dgemma has an image (semantic_problems)"
    return spec.image


def _worker_container(name: str, namespace: str | None, spec: models.DiffusionGemmaSpec) -> Body:
    return {
        "name": "worker",
        "image": image(spec),
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dgemma", "worker"],
        "ports": [
            {"name": naming.GRPC_PORT_NAME, "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": naming.METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"},
            *([{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}] if spec.worker.tls_secret else []),
        ],
        "env": [*_env(name, namespace, spec), *_user_env(spec)],
        # The kubelet's gRPC probe speaks no TLS: a TLS worker answers it on its plaintext health-only port.
        **_probes(spec, {"grpc": {"port": HEALTH_PORT if spec.worker.tls_secret else GRPC_PORT}}),
    }


VLLM_DTYPES = {"bf16": ["--dtype", "bfloat16"], "fp16": ["--dtype", "float16"], "fp32": ["--dtype", "float32"],
               # Online dynamic FP8 of a bf16 checkpoint; an NVFP4 checkpoint carries its own quantization config.
               "fp8": ["--quantization", "fp8"], "nvfp4": []}


def vllm_args(name: str, spec: models.DiffusionGemmaSpec) -> list[str]:
    """`vllm serve` arguments: the model and its served name, the recipe's limits, the diffusion settings vLLM
    takes per server, a drain on SIGTERM, then the user's extra arguments (which win)."""
    v, defaults = spec.vllm or models.VllmSpec(), vllm_defaults(spec)
    hub = _source(spec).hugging_face
    diffusion = {"canvas_length": spec.generation.canvas_length,
                 "max_denoising_steps": spec.generation.max_denoising_steps}
    return [
        _model_location(name, spec),
        *(["--revision", hub.revision] if hub else []),
        "--served-model-name", spec.served_model_name,
        "--host", "0.0.0.0", "--port", str(vllm.PORT),
        "--max-num-seqs", str(v.max_num_seqs or defaults.max_num_seqs),
        "--gpu-memory-utilization", f"{v.gpu_memory_utilization or defaults.gpu_memory_utilization:g}",
        "--tensor-parallel-size", str(v.tensor_parallel_size or spec.gpu.count),
        "--diffusion-config", json.dumps(diffusion, separators=(",", ":")),
        *VLLM_DTYPES[dtype(spec)],
        *(["--max-model-len", str(v.max_model_len)] if v.max_model_len else []),
        "--shutdown-timeout", str(spec.worker.drain_grace_seconds),
        *defaults.extra_args,
        *(v.extra_args or []),
    ]


def _vllm_env(spec: models.DiffusionGemmaSpec) -> list[Body]:
    values: list[tuple[str, object | None]] = [
        *_hub_env(spec),
        # The root filesystem is read-only: vLLM's, torch's and Triton's caches go to /tmp (an emptyDir).
        ("HOME", "/tmp/home"), ("USER", "vllm"), ("VLLM_CACHE_ROOT", "/tmp/vllm"),
        ("TRITON_CACHE_DIR", "/tmp/triton"), ("XDG_CACHE_HOME", "/tmp/cache"),
        ("VLLM_NO_USAGE_STATS", "1"),
    ]
    return [{"name": k, "value": str(v)} for k, v in values if v is not None] + _token_env(spec)


def _vllm_container(name: str, spec: models.DiffusionGemmaSpec) -> Body:
    return {
        "name": "vllm",
        "image": image(spec),
        "imagePullPolicy": spec.image_pull_policy,
        "command": _vllm_command(spec),
        "args": vllm_args(name, spec),
        "ports": [{"name": naming.HTTP_PORT_NAME, "containerPort": vllm.PORT, "protocol": "TCP"}],
        "env": [*_vllm_env(spec), *_user_env(spec)],
        **_probes(spec, {"httpGet": {"path": vllm.HEALTH_PATH, "port": naming.HTTP_PORT_NAME}}),
    }


def deployment(owner: Body, spec: models.DiffusionGemmaSpec) -> Body:
    """The Deployment of the variant's servers: dgemma workers or vLLM, on the same GPUs, drained alike."""
    name = owner["metadata"]["name"]
    labels = worker_labels(name, spec)
    mounts = _mounts(spec)
    container = (_vllm_container(name, spec) if spec.runtime == "vllm"
                 else _worker_container(name, owner["metadata"].get("namespace"), spec))
    server: Body = {
        **container,
        "resources": _resources(spec),
        # The sleep lets endpoints drop the pod before SIGTERM starts the server's drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
        "securityContext": _restricted_container_security(),
        "volumeMounts": _worker_mounts(spec),
    }
    user = VLLM_USER if spec.runtime == "vllm" else WORKER_USER
    pod_spec: Body = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": user,
            "runAsGroup": user,
            "fsGroup": user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": _node_selector(spec),
        "tolerations": _tolerations(spec),
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + spec.worker.drain_grace_seconds + SHUTDOWN_SLACK_S,
        "containers": [server],
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
    """The headless Service; its EndpointSlices are how the gateway finds replicas (the port's name says how
    to talk to them: `grpc` a dgemma worker, `http` vLLM's OpenAI server, which serves /metrics too)."""
    name = owner["metadata"]["name"]
    if spec.runtime == "vllm":
        ports: list[Body] = [{"name": naming.HTTP_PORT_NAME, "port": vllm.PORT, "targetPort": naming.HTTP_PORT_NAME,
                              "protocol": "TCP", "appProtocol": "http"}]
    else:
        ports = [
            {"name": naming.GRPC_PORT_NAME, "port": GRPC_PORT, "targetPort": naming.GRPC_PORT_NAME, "protocol": "TCP",
             "appProtocol": "grpc"},
            {"name": naming.METRICS_PORT_NAME, "port": METRICS_PORT, "targetPort": naming.METRICS_PORT_NAME,
             "protocol": "TCP"},
        ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, worker_labels(name, spec)),
        "spec": {"clusterIP": "None", "selector": selector_labels(name), "ports": ports},
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
    """All desired children, in the order they are applied (none for an external API)."""
    if spec.runtime == "external":
        return []
    return [service(owner, spec), pod_disruption_budget(owner, spec), deployment(owner, spec)]
