"""The desired children are built by pure functions; every field that matters is checked here."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from dgemma_operator import children, models, status

OWNER = {"metadata": {"name": "gemma", "namespace": "ml", "uid": "1234", "generation": 3}}


def spec(**overrides: Any) -> models.DiffusionGemmaSpec:
    body: dict[str, Any] = {
        "servedModelName": "google/diffusiongemma-26B-A4B-it",
        "model": {"huggingFace": {"id": "google/diffusiongemma-26B-A4B-it", "revision": "abc123"}},
        "image": "ghcr.io/example/dgemma:0.1.0",
    }
    body.update(overrides)
    return models.DiffusionGemmaSpec.model_validate(body)


def pod(s: models.DiffusionGemmaSpec) -> dict[str, Any]:
    return dict(children.deployment(OWNER, s)["spec"]["template"]["spec"])


def env(s: models.DiffusionGemmaSpec) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod(s)["containers"][0]["env"]}


PROFILES = [
    ("h100", "NVIDIA-H100-80GB-HBM3", "amd64", "fp8", 1100.0),
    ("rtx-pro-6000", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "amd64", "bf16", 700.0),
    ("dgx-spark", "NVIDIA-GB10", "arm64", "bf16", 150.0),
    ("dgx-station", "NVIDIA-GB300", "arm64", "bf16", 800.0),
]


@pytest.mark.parametrize(("profile", "product", "arch", "dtype", "prior"), PROFILES)
def test_each_profile_selects_its_gpu_architecture_dtype_and_prior(
    profile: str, product: str, arch: str, dtype: str, prior: float
) -> None:
    s = spec(gpu={"profile": profile})
    p = pod(s)
    assert p["nodeSelector"] == {"nvidia.com/gpu.product": product, "kubernetes.io/arch": arch}
    assert p["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    resources = p["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
    assert env(s)["DGEMMA_DTYPE"] == dtype
    assert children.tokens_per_second_prior(s) == prior


def test_every_profile_default_can_be_overridden() -> None:
    s = spec(
        gpu={
            "profile": "h100",
            "product": "NVIDIA-H100-NVL",
            "count": 2,
            "architecture": "arm64",
            "dtype": "bf16",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "resources": {"limits": {"memory": "100Gi"}},
            "tokensPerSecondPrior": 999,
        }
    )
    p = pod(s)
    assert p["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-H100-NVL",
        "kubernetes.io/arch": "arm64",
        "pool": "gpu",
    }
    assert p["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert p["affinity"] == {"nodeAffinity": {}}
    limits = p["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "100Gi", "nvidia.com/gpu": "2"}
    assert env(s)["DGEMMA_DTYPE"] == "bf16"
    assert children.tokens_per_second_prior(s) == 999


def test_worker_gets_the_contract_command_ports_and_environment() -> None:
    s = spec(
        worker={"maxActive": 3, "maxQueue": 17, "drainGraceSeconds": 40},
        generation={
            "maxDenoisingSteps": 24,
            "tMin": 0.1,
            "tMax": 1.5,
            "entropyBound": 2.0,
            "stabilityThreshold": 3,
            "confidenceThreshold": 0.9,
        },
        model={
            "huggingFace": {"id": "google/diffusiongemma-26B-A4B-it", "revision": "abc123"},
            "tokenSecret": {"name": "hf"},
        },
    )
    container = pod(s)["containers"][0]
    assert container["command"] == ["dgemma", "worker"]
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("grpc", 50051),
        ("metrics", 9090),
    }
    assert env(s) == {
        "DGEMMA_VARIANT": "ml/gemma",  # the gateway's name for the variant, the worker metrics' label
        "DGEMMA_MODEL": "google/diffusiongemma-26B-A4B-it",
        "DGEMMA_MODEL_REVISION": "abc123",
        "DGEMMA_SERVED_MODEL_NAME": "google/diffusiongemma-26B-A4B-it",
        "DGEMMA_PORT": "50051",
        "DGEMMA_METRICS_PORT": "9090",
        "DGEMMA_MAX_ACTIVE": "3",
        "DGEMMA_MAX_QUEUE": "17",
        "DGEMMA_DTYPE": "fp8",
        "DGEMMA_DEVICE": "cuda",
        "DGEMMA_DRAIN_GRACE_S": "40",
        "DGEMMA_LOG_FORMAT": "json",
        "DGEMMA_DEFAULT_MAX_DENOISING_STEPS": "24",
        "DGEMMA_DEFAULT_T_MIN": "0.1",
        "DGEMMA_DEFAULT_T_MAX": "1.5",
        "DGEMMA_DEFAULT_ENTROPY_BOUND": "2.0",
        "DGEMMA_DEFAULT_STABILITY_THRESHOLD": "3",
        "DGEMMA_DEFAULT_CONFIDENCE_THRESHOLD": "0.9",
        "HF_HOME": "/models/huggingface",
        "TORCHINDUCTOR_CACHE_DIR": "/models/torchinductor",
        "TRITON_CACHE_DIR": "/models/triton",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token", "optional": False}},
    }


def test_probes_use_grpc_health_and_allow_a_long_model_load() -> None:
    container = pod(spec(worker={"startupTimeoutSeconds": 1800}))["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def test_a_tls_secret_is_mounted_into_the_worker_which_serves_mutual_tls_and_answers_probes_in_plaintext() -> None:
    s = spec(worker={"tlsSecret": "gemma-worker-tls"})
    p = pod(s)
    worker, fetch = p["containers"][0], p["initContainers"][0]
    assert {"name": "tls", "secret": {"secretName": "gemma-worker-tls", "defaultMode": 0o440}} in p["volumes"]
    assert {"name": "tls", "mountPath": "/etc/dgemma/tls", "readOnly": True} in worker["volumeMounts"]
    assert all(m["name"] != "tls" for m in fetch["volumeMounts"])  # the downloader never sees the key
    assert {k: v for k, v in env(s).items() if k.startswith("DGEMMA_TLS") or k == "DGEMMA_HEALTH_PORT"} == {
        "DGEMMA_TLS_CERT_FILE": "/etc/dgemma/tls/tls.crt", "DGEMMA_TLS_KEY_FILE": "/etc/dgemma/tls/tls.key",
        "DGEMMA_TLS_CLIENT_CA_FILE": "/etc/dgemma/tls/ca.crt", "DGEMMA_HEALTH_PORT": "50052"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"] == {"port": 50052}
    assert {"name": "health", "containerPort": 50052, "protocol": "TCP"} in worker["ports"]
    plain = pod(spec())
    assert all(v["name"] != "tls" for v in plain["volumes"]) and "DGEMMA_TLS_CERT_FILE" not in env(spec())


def test_termination_lets_in_flight_requests_drain() -> None:
    p = pod(spec(worker={"drainGraceSeconds": 45}))
    sleep = p["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep <= 10
    assert p["terminationGracePeriodSeconds"] > sleep + 45


def test_pods_run_restricted() -> None:
    p = pod(spec())
    assert p["securityContext"]["runAsNonRoot"] is True
    assert p["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert p["automountServiceAccountToken"] is False
    for container in [*p["containers"], *p["initContainers"]]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True


def test_weights_are_fetched_once_into_the_shared_cache_by_an_init_container() -> None:
    p = pod(spec(cache={"claimName": "models-rwx"}))
    fetch = p["initContainers"][0]
    assert fetch["command"] == ["hf", "download", "google/diffusiongemma-26B-A4B-it", "--revision", "abc123"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "models-rwx"}} in p["volumes"]
    assert {"name": "model-cache", "mountPath": "/models"} in fetch["volumeMounts"]
    assert {"name": "model-cache", "mountPath": "/models"} in p["containers"][0]["volumeMounts"]


def test_a_pvc_source_is_mounted_read_only_and_needs_no_fetch() -> None:
    s = spec(model={"pvc": {"claimName": "weights", "path": "/gemma"}})
    p = pod(s)
    assert "initContainers" not in p
    assert env(s)["DGEMMA_MODEL"] == "/model-source/gemma"
    assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in (
        p["volumes"]
    )


def test_a_url_source_is_downloaded_into_the_cache() -> None:
    s = spec(model={"url": "https://example.com/gemma.tar"})
    fetch = pod(s)["initContainers"][0]
    fetch_env = {e["name"]: e["value"] for e in fetch["env"]}
    assert fetch_env["DGEMMA_MODEL_URL"] == "https://example.com/gemma.tar"
    assert fetch_env["DGEMMA_MODEL"] == env(s)["DGEMMA_MODEL"] == "/models/url/gemma"


def test_labels_let_the_gateway_find_workers_and_owner_references_collect_them() -> None:
    for child in children.children(OWNER, spec(servedModelName="google/gemma:it")):
        assert child["metadata"]["labels"] == {
            "app.kubernetes.io/name": "dgemma-worker",
            "app.kubernetes.io/instance": "gemma",
            "app.kubernetes.io/component": "worker",
            "app.kubernetes.io/managed-by": "dgemma-operator",
            "dgemma.io/variant": "gemma",
            "dgemma.io/model": "google-gemma-it",
        }
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "dgemma.io/v1alpha1",
                "kind": "DiffusionGemma",
                "name": "gemma",
                "uid": "1234",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    deployment = children.deployment(OWNER, spec())
    assert deployment["spec"]["template"]["metadata"]["labels"]["dgemma.io/variant"] == "gemma"
    assert children.endpoint("gemma", "ml", spec()) == "gemma-worker.ml.svc:50051"


def test_the_service_is_headless_with_named_ports_and_the_pdb_allows_one_disruption() -> None:
    svc = children.service(OWNER, spec())
    assert svc["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("grpc", 50051), ("metrics", 9090)]
    pdb = children.pod_disruption_budget(OWNER, spec())
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": children.selector_labels("gemma")},
    }


@pytest.mark.parametrize("profile", ["h100", "rtx-pro-6000", "dgx-spark", "dgx-station"])
@pytest.mark.parametrize(
    "source",
    [
        {"huggingFace": {"id": "a/b"}, "tokenSecret": {"name": "hf"}},
        {"pvc": {"claimName": "w"}},
        {"url": "s3://bucket/model.tar"},
    ],
)
def test_children_are_valid_kubernetes_objects(profile: str, source: dict[str, Any]) -> None:
    s = spec(gpu={"profile": profile}, model=source, cache={"claimName": "cache"})
    for child in children.children(OWNER, s):
        kubernetes_validate.validate(child, "1.33", strict=True)


def test_offline_validation_is_not_vacuous() -> None:
    broken = children.service(OWNER, spec())
    broken["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33", strict=True)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"gpu": {"profile": "custom"}}, "custom"),
        ({"gpu": {"count": 2, "resources": {"limits": {"nvidia.com/gpu": 1}}}}, "contradicts"),
        ({"model": {"pvc": {"claimName": "w"}}, "cache": {"claimName": "w"}}, "must differ"),
        ({"gpu": {"profile": "h100", "dtype": "nvfp4"}},
         "gpu.dtype: dtype nvfp4 needs an NVIDIA GPU of compute capability 10.0 or newer; "
         "profile h100 (NVIDIA-H100-80GB-HBM3) has 9.0"),
    ],
)
def test_semantic_problems_are_reported(overrides: dict[str, Any], problem: str) -> None:
    assert problem in " ".join(children.semantic_problems("gemma", spec(**overrides)))


def test_every_profile_can_run_its_own_default_dtype() -> None:
    for name in ("h100", "rtx-pro-6000", "dgx-spark", "dgx-station"):
        assert children.semantic_problems("gemma", spec(gpu={"profile": name})) == [], name


def test_a_name_too_long_for_a_service_is_a_semantic_problem() -> None:
    assert "too long" in children.semantic_problems("x" * 60, spec())[0]
    assert children.semantic_problems("x" * 56, spec()) == []


def test_status_reports_ready_only_from_observed_replicas() -> None:
    s = spec(replicas=2, minReplicas=1, maxReplicas=4)
    owner = {**OWNER, "metadata": {**OWNER["metadata"], "generation": 3}}
    missing = status.as_patch(status.observed(owner, s, None, "t0"))
    assert [c["status"] for c in missing["conditions"]] == ["False", "True", "False"]
    dep = {
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1},
    }
    partial = status.as_patch(status.observed(owner, s, dep, "t1"))
    assert partial["conditions"][0]["reason"] == "PartiallyReady" and partial["readyReplicas"] == 1
    dep["status"]["readyReplicas"] = 2
    ready = status.as_patch(status.observed({**owner, "status": partial}, s, dep, "t2"))
    assert ready["conditions"][0] == {
        "type": "Ready",
        "status": "True",
        "reason": "AllReplicasReady",
        "message": "2/2 replicas ready",
        "lastTransitionTime": "t1",
        "observedGeneration": 3,
    }
    assert ready["conditions"][1]["status"] == "False"
    assert ready["endpoint"] == "gemma-worker.ml.svc:50051" and ready["observedGeneration"] == 3
    assert ready["selector"] == "app.kubernetes.io/name=dgemma-worker,app.kubernetes.io/instance=gemma"


def test_the_reconciler_keeps_the_autoscalers_condition_and_the_autoscaler_the_reconcilers() -> None:
    """Both write status.conditions whole (a merge patch replaces a list): each carries the other's over."""
    s = spec()
    scaling = status.condition("ScalingActive", False, "GatewayUnreachable", "no answer", 3, [], "t0")
    owner = {**OWNER, "status": status.as_patch(models.DiffusionGemmaStatus(conditions=[scaling]))}
    observed = status.observed(owner, s, None, "t1")
    assert [c.type for c in observed.conditions or []] == ["Ready", "Progressing", "Degraded", "ScalingActive"]
    assert (observed.conditions or [])[-1] == scaling
    invalid = status.invalid(owner, "InvalidSpec", "bad", "t1")
    assert [c.type for c in invalid.conditions or []][-1] == "ScalingActive"
    active = status.condition("ScalingActive", True, "ValidMeasurements", "ok", 3, [scaling], "t2")
    mixed = status.with_conditions(observed.conditions or [], active)
    assert [c.type for c in mixed] == ["ScalingActive", "Ready", "Progressing", "Degraded"]
    assert mixed[0].last_transition_time == "t2" and mixed[1] == (observed.conditions or [])[0]
