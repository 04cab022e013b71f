"""The operator, run by kopf's KopfRunner against the emulator, with kubectl as the client."""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

import kmock
import pytest
import yaml
from kopf.testing import KopfRunner

from tests.k8s_emulator import EmulatorThread
from tests.operator.conftest import OPERATOR_ARGS
from tests.operator.helpers import apply, condition, eventually, exists, get, mark_ready, sample

CHILDREN = [("deployment", "gemma-worker"), ("service", "gemma-worker"), ("pdb", "gemma-worker")]


def children_present(k8s: EmulatorThread, name: str = "gemma") -> dict[str, dict[str, Any]]:
    found = {}
    for kind in ("deployment", "service", "pdb"):
        assert exists(k8s, kind, f"{name}-worker"), f"{kind} {name}-worker is missing"
        found[kind] = get(k8s, kind, f"{name}-worker")
    return found


def reason(k8s: EmulatorThread, kind: str, name: str = "gemma") -> str:
    return str(condition(get(k8s, "dgm", name), kind)["reason"])


def event_reasons(k8s: EmulatorThread, name: str = "gemma") -> list[str]:
    events = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
    return [e["reason"] for e in events if e["involvedObject"]["name"] == name]


@pytest.mark.parametrize(
    ("profile", "product", "arch"),
    [
        ("h100", "NVIDIA-H100-80GB-HBM3", "amd64"),
        ("rtx-pro-6000", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "amd64"),
        ("dgx-spark", "NVIDIA-GB10", "arm64"),
        ("dgx-station", "NVIDIA-GB300", "arm64"),
        ("custom", "NVIDIA-L40S", "amd64"),
    ],
)
def test_a_resource_of_each_profile_gets_its_children_and_becomes_ready(
    k8s: EmulatorThread, operator: KopfRunner, profile: str, product: str, arch: str
) -> None:
    gpu: dict[str, Any] = {"profile": profile, **({"product": product} if profile == "custom" else {})}
    apply(k8s, sample("gemma", gpu=gpu, replicas=2))
    found = eventually(lambda: children_present(k8s))
    owner = get(k8s, "dgm", "gemma")
    for child in found.values():
        assert child["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert child["metadata"]["labels"]["dgemma.io/variant"] == "gemma"
    pod = found["deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product, "kubernetes.io/arch": arch}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert found["deployment"]["spec"]["replicas"] == 2
    assert found["service"]["spec"]["ports"][0] == {
        "name": "grpc",
        "port": 50051,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "grpc",
    }

    eventually(lambda: reason(k8s, "Ready") == "NoReplicasReady")
    status = get(k8s, "dgm", "gemma")["status"]
    assert status["endpoint"] == "gemma-worker.default.svc:50051" and status["observedGeneration"] == 1
    assert condition(get(k8s, "dgm", "gemma"), "Ready")["status"] == "False"

    mark_ready(k8s, "gemma-worker", 2)

    def ready() -> None:
        resource = get(k8s, "dgm", "gemma")
        assert condition(resource, "Ready")["status"] == "True"
        assert resource["status"]["readyReplicas"] == 2
        assert condition(resource, "Progressing")["status"] == "False"
        assert condition(resource, "Degraded")["status"] == "False"

    eventually(ready)
    assert "CreatedWorkers" in event_reasons(k8s)


def test_a_spec_change_rolls_the_deployment(k8s: EmulatorThread, operator: KopfRunner) -> None:
    apply(k8s, sample())
    eventually(lambda: children_present(k8s))
    apply(k8s, sample(image="ghcr.io/example/dgemma:0.2.0", worker={"maxActive": 2}))

    def rolled() -> None:
        container = get(k8s, "deployment", "gemma-worker")["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "ghcr.io/example/dgemma:0.2.0"
        assert {"name": "DGEMMA_MAX_ACTIVE", "value": "2"} in container["env"]
        assert get(k8s, "dgm", "gemma")["status"]["observedGeneration"] == 2

    eventually(rolled)
    assert get(k8s, "deployment", "gemma-worker")["metadata"]["generation"] == 2


def test_kubectl_scale_changes_only_the_replica_count(k8s: EmulatorThread, operator: KopfRunner) -> None:
    apply(k8s, sample())
    before = eventually(lambda: children_present(k8s))["deployment"]
    k8s.kubectl("scale", "dgm/gemma", "--replicas=3")
    eventually(lambda: get(k8s, "deployment", "gemma-worker")["spec"]["replicas"] == 3)
    after = get(k8s, "deployment", "gemma-worker")
    assert after["spec"]["template"] == before["spec"]["template"]
    assert {k: v for k, v in after["spec"].items() if k != "replicas"} == {
        k: v for k, v in before["spec"].items() if k != "replicas"
    }
    mark_ready(k8s, "gemma-worker", 3)
    eventually(lambda: get(k8s, "dgm", "gemma")["status"]["replicas"] == 3)
    scale = json.loads(
        k8s.kubectl(
            "get", "--raw", "/apis/dgemma.io/v1alpha1/namespaces/default/diffusiongemmas/gemma/scale"
        ).stdout
    )
    assert (
        scale["status"]["selector"] == "app.kubernetes.io/name=dgemma-worker,app.kubernetes.io/instance=gemma"
    )


def test_deleting_the_resource_releases_the_finalizer_and_collects_the_children(
    k8s: EmulatorThread, operator: KopfRunner
) -> None:
    apply(k8s, sample())
    eventually(lambda: children_present(k8s))
    assert get(k8s, "dgm", "gemma")["metadata"]["finalizers"] == ["dgemma.io/finalizer"]
    k8s.kubectl("delete", "dgm", "gemma", "--timeout=20s")
    assert not exists(k8s, "dgm", "gemma")
    for kind, name in CHILDREN:
        assert not exists(k8s, kind, name)


def test_a_semantically_invalid_spec_is_degraded_with_a_reason_and_not_retried(
    k8s: EmulatorThread, operator: KopfRunner
) -> None:
    apply(k8s, sample(gpu={"profile": "custom"}))
    eventually(lambda: reason(k8s, "Degraded") == "InvalidSpec")
    degraded = condition(get(k8s, "dgm", "gemma"), "Degraded")
    assert degraded["status"] == "True" and "gpu.product" in degraded["message"]
    assert condition(get(k8s, "dgm", "gemma"), "Ready")["status"] == "False"
    assert not exists(k8s, "deployment", "gemma-worker")
    assert "InvalidSpec" in event_reasons(k8s)
    handled = len(k8s.handler["patch", kmock.resource("dgemma.io", "v1alpha1", "diffusiongemmas")])
    threading.Event().wait(2)  # no crash loop: nothing retries a permanent error
    assert len(k8s.handler["patch", kmock.resource("dgemma.io", "v1alpha1", "diffusiongemmas")]) == handled

    apply(k8s, sample(gpu={"profile": "custom", "product": "NVIDIA-L40S"}))
    eventually(lambda: children_present(k8s))
    eventually(lambda: reason(k8s, "Degraded") == "AsExpected")


def test_a_child_edited_by_hand_is_restored(k8s: EmulatorThread, operator: KopfRunner) -> None:
    apply(k8s, sample())
    eventually(lambda: children_present(k8s))
    k8s.kubectl(
        "patch",
        "deployment",
        "gemma-worker",
        "--type=merge",
        "-p",
        json.dumps(
            {"spec": {"replicas": 7, "template": {"spec": {"nodeSelector": {"kubernetes.io/arch": "s390x"}}}}}
        ),
    )

    def restored() -> None:
        dep = get(k8s, "deployment", "gemma-worker")
        assert dep["spec"]["replicas"] == 1
        assert dep["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"] == "amd64"

    eventually(restored)
    assert "DriftCorrected" in event_reasons(k8s)


def test_quantities_the_api_server_rewrites_in_canonical_form_are_no_drift(
    k8s: EmulatorThread, operator: KopfRunner
) -> None:
    """The API server stores `1024Mi` as `1Gi` and `0.5` CPU as `500m`: the Deployment then differs from what
    the operator applied as text only, and must not be 'restored' on every event."""
    resources = {"requests": {"memory": "1024Mi", "cpu": "0.5"}, "limits": {"memory": "1024Mi"}}
    apply(k8s, sample(gpu={"profile": "h100", "resources": resources}, cache={"sizeLimit": "1024Gi"}))
    eventually(lambda: children_present(k8s))
    pod = get(k8s, "deployment", "gemma-worker")["spec"]["template"]["spec"]
    stored = pod["containers"][0]["resources"]
    assert (stored["requests"]["memory"], stored["requests"]["cpu"], stored["limits"]["memory"]) == (
        "1Gi", "500m", "1Gi")  # as a real API server stores them
    assert next(v for v in pod["volumes"] if v["name"] == "model-cache")["emptyDir"]["sizeLimit"] == "1Ti"
    for ready in (0, 1):  # Deployment events, as the kubelet and the controller update its status
        mark_ready(k8s, "gemma-worker", ready)
    eventually(lambda: reason(k8s, "Ready") == "AllReplicasReady")
    assert "DriftCorrected" not in event_reasons(k8s)


@pytest.mark.parametrize("kind", ["deployment", "service", "pdb"])
def test_a_child_deleted_by_hand_is_recreated(k8s: EmulatorThread, operator: KopfRunner, kind: str) -> None:
    apply(k8s, sample())
    old = eventually(lambda: children_present(k8s))[kind]
    k8s.kubectl("delete", kind, "gemma-worker")
    new = eventually(lambda: exists(k8s, kind, "gemma-worker") and get(k8s, kind, "gemma-worker"))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]


def test_conflicts_from_the_api_are_retried_with_backoff(k8s: EmulatorThread, operator: KopfRunner) -> None:
    deployments = kmock.resource("apps", "v1", "deployments")
    k8s.handler["patch", deployments][:2] << 409 << {"kind": "Status", "code": 409, "reason": "Conflict"}
    apply(k8s, sample())
    eventually(lambda: children_present(k8s), timeout=20)
    assert len(k8s.handler["patch", deployments]) >= 3
    assert "ApiError" in event_reasons(k8s)


def test_an_operator_restarted_mid_reconcile_converges(k8s: EmulatorThread, crd: None) -> None:
    broken = threading.Event()
    broken.set()

    def deployments_unavailable(request: kmock.Request) -> object:
        if broken.is_set():
            return kmock.Response(
                status=503, payload={"kind": "Status", "code": 503, "reason": "ServiceUnavailable"}
            )
        return NotImplemented  # the outage is over: the request goes on to the API

    k8s.handler["patch", kmock.resource("apps", "v1", "deployments")] << deployments_unavailable
    with KopfRunner(OPERATOR_ARGS, timeout=30):
        apply(k8s, sample())
        eventually(lambda: exists(k8s, "service", "gemma-worker"))
    assert not exists(k8s, "deployment", "gemma-worker")  # stopped half-way

    broken.clear()
    with KopfRunner(OPERATOR_ARGS, timeout=30) as runner:
        eventually(lambda: children_present(k8s), timeout=20)
        mark_ready(k8s, "gemma-worker", 1)
        eventually(lambda: reason(k8s, "Ready") == "AllReplicasReady")
    assert runner.exit_code == 0


def test_resources_created_while_the_operator_was_down_are_handled_at_startup(
    k8s: EmulatorThread, crd: None
) -> None:
    apply(k8s, sample())
    with KopfRunner(OPERATOR_ARGS, timeout=30):
        eventually(lambda: children_present(k8s))


def test_kubectl_apply_of_the_sample_manifest_works(k8s: EmulatorThread, operator: KopfRunner) -> None:
    docs = list(yaml.safe_load_all(pathlib.Path("deploy/samples/diffusiongemma-h100.yaml").read_text()))
    k8s.kubectl("apply", "-f", "deploy/samples/diffusiongemma-h100.yaml")
    name = docs[0]["metadata"]["name"]
    eventually(lambda: children_present(k8s, name))
