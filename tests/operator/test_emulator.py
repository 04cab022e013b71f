"""The Kubernetes API emulator behaves like an API server where kopf and kubectl depend on it."""

from __future__ import annotations

import json
import pathlib
import subprocess
import threading
import time
import urllib.request
from typing import Any

import kmock
import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from dgemma_serve.lifetime import die_with_parent
from tests.k8s_emulator import EmulatorThread, KubernetesEmulator
from tests.operator.helpers import CRD_PATH, apply, get, sample


def client(k8s: EmulatorThread) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=k8s.kubeconfig, client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def configmap(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    }


async def test_serves_on_an_ephemeral_localhost_port_as_an_async_context_manager(tmp_path: Any) -> None:
    async with KubernetesEmulator(tmp_path) as k8s:
        assert k8s.url.startswith("http://127.0.0.1:") and not k8s.url.endswith(":0")
        config = yaml.safe_load(pathlib.Path(k8s.kubeconfig).read_text())
        assert config["clusters"][0]["cluster"]["server"] == k8s.url


def test_objects_get_uid_resource_version_generation_and_lists_carry_kind(k8s: EmulatorThread) -> None:
    apply(k8s, configmap("a"))
    obj = get(k8s, "configmap", "a")
    assert (
        obj["metadata"]["uid"] and obj["metadata"]["resourceVersion"] and obj["metadata"]["generation"] == 1
    )
    listed = json.loads(k8s.kubectl("get", "configmaps", "-o", "json").stdout)
    assert listed["kind"] == "List" and listed["items"][0]["kind"] == "ConfigMap"
    raw = json.load(urllib.request.urlopen(f"{k8s.url}/api/v1/namespaces/default/configmaps"))
    assert raw["kind"] == "ConfigMapList" and raw["apiVersion"] == "v1"


def test_namespaces_can_be_listed_and_created(k8s: EmulatorThread) -> None:
    apply(k8s, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    names = k8s.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert names == ["namespace/default", "namespace/kube-system", "namespace/team-a"]


def test_a_stale_resource_version_is_a_409_conflict(k8s: EmulatorThread) -> None:
    core = kubernetes.client.CoreV1Api(client(k8s))
    created = core.create_namespaced_config_map("default", configmap("a"))
    stale = created.metadata.resource_version
    core.patch_namespaced_config_map("a", "default", {"data": {"k": "v2"}})
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map(
            "a", "default", {**configmap("a"), "metadata": {"name": "a", "resourceVersion": stale}}
        )
    assert e.value.status == 409


def test_a_failed_json_patch_test_is_422_and_a_matching_one_applies(k8s: EmulatorThread) -> None:
    apply(k8s, configmap("a"))
    rv = get(k8s, "configmap", "a")["metadata"]["resourceVersion"]
    bad = k8s.kubectl(
        "patch",
        "configmap",
        "a",
        "--type=json",
        "-p",
        json.dumps(
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
            ]
        ),
        check=False,
    )
    assert bad.returncode != 0 and "test operation" in bad.stderr
    k8s.kubectl(
        "patch",
        "configmap",
        "a",
        "--type=json",
        "-p",
        json.dumps(
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
            ]
        ),
    )
    assert get(k8s, "configmap", "a")["metadata"]["finalizers"] == ["x/y"]


def test_status_writes_stay_in_status_and_spec_writes_keep_status(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    apply(k8s, sample("g"))
    k8s.kubectl(
        "patch",
        "dgm",
        "g",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"replicas": 5}, "spec": {"replicas": 3}}),
    )
    obj = get(k8s, "dgm", "g")
    assert obj["status"] == {"replicas": 5} and obj["spec"]["replicas"] == 1
    k8s.kubectl("patch", "dgm", "g", "--type=merge", "-p", json.dumps({"status": {"replicas": 9}}))
    assert get(k8s, "dgm", "g")["status"] == {"replicas": 5}


def test_generation_moves_on_spec_changes_only(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    apply(k8s, sample("g"))
    k8s.kubectl("label", "dgm", "g", "team=a")
    assert get(k8s, "dgm", "g")["metadata"]["generation"] == 1
    k8s.kubectl("patch", "dgm", "g", "--type=merge", "-p", json.dumps({"spec": {"costWeight": 2}}))
    assert get(k8s, "dgm", "g")["metadata"]["generation"] == 2


def test_created_crds_are_discoverable_with_short_names_and_printer_columns(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    resources = k8s.kubectl("api-resources", "--api-group=dgemma.io").stdout
    assert "diffusiongemmas" in resources and "dgm" in resources
    apply(k8s, sample("g"))
    table = k8s.kubectl("get", "dgm").stdout
    assert table.split("\n")[0].split() == [
        "NAME",
        "MODEL",
        "RUNTIME",
        "PROFILE",
        "READY",
        "DESIRED",
        "TOKENS/S",
        "P95-MS",
        "STATUS",
        "AGE",
    ]
    assert "google/diffusiongemma-26B-A4B-it" in table and "h100" in table and "dgemma" in table
    assert "g" in k8s.kubectl("get", "dgemma", "-o", "name").stdout  # the category


def test_the_scale_subresource_maps_to_spec_replicas(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    apply(k8s, sample("g", maxReplicas=4))
    k8s.kubectl("scale", "dgm/g", "--replicas=3")
    assert get(k8s, "dgm", "g")["spec"]["replicas"] == 3
    scale = kubernetes.client.CustomObjectsApi(client(k8s)).get_namespaced_custom_object_scale(
        "dgemma.io", "v1alpha1", "default", "diffusiongemmas", "g"
    )
    assert scale["spec"]["replicas"] == 3 and scale["kind"] == "Scale"


def test_server_side_apply_creates_then_removes_fields_the_manager_stopped_applying(
    k8s: EmulatorThread,
) -> None:
    k8s.kubectl(
        "apply",
        "--server-side",
        "--field-manager=t",
        "-f",
        "-",
        input=yaml.safe_dump(configmap("a", x="1", y="2")),
    )
    k8s.kubectl(
        "apply", "--server-side", "--field-manager=t", "-f", "-", input=yaml.safe_dump(configmap("a", x="1"))
    )
    assert get(k8s, "configmap", "a")["metadata"]["labels"] == {"x": "1"}


def test_dry_run_changes_nothing(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(configmap("a")))
    assert k8s.kubectl("get", "configmap", "a", check=False).returncode != 0


def test_put_replaces_the_object(k8s: EmulatorThread) -> None:
    apply(k8s, configmap("a"))
    obj = get(k8s, "configmap", "a")
    obj["data"] = {"new": "1"}
    k8s.kubectl("replace", "-f", "-", input=json.dumps(obj))
    assert get(k8s, "configmap", "a")["data"] == {"new": "1"}


def test_deleting_an_owner_collects_its_dependents_after_finalizers_are_released(k8s: EmulatorThread) -> None:
    apply(k8s, {**configmap("owner"), "metadata": {"name": "owner", "finalizers": ["x/y"]}})
    uid = get(k8s, "configmap", "owner")["metadata"]["uid"]
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    apply(k8s, {**configmap("child"), "metadata": {"name": "child", "ownerReferences": [ref]}})
    k8s.kubectl("delete", "configmap", "owner", "--wait=false")
    assert get(k8s, "configmap", "owner")["metadata"]["deletionTimestamp"]
    assert get(k8s, "configmap", "child")
    k8s.kubectl("patch", "configmap", "owner", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    assert k8s.kubectl("get", "configmap", "owner", "child", check=False).stderr.count("NotFound") == 2


def test_watches_resume_from_a_resource_version_and_honour_selectors(k8s: EmulatorThread) -> None:
    core = kubernetes.client.CoreV1Api(client(k8s))
    core.create_namespaced_config_map("default", configmap("before", app="x"))
    rv = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", configmap("other", app="y"))
    core.create_namespaced_config_map("default", configmap("after", app="x"))
    events = [
        (e["type"], e["object"].metadata.name)
        for e in kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map,
            "default",
            label_selector="app=x",
            resource_version=rv,
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "after")]


def test_kubectl_get_watch_streams_changes(k8s: EmulatorThread) -> None:
    apply(k8s, configmap("a"))
    env_args = [
        "kubectl",
        f"--kubeconfig={k8s.kubeconfig}",
        "get",
        "configmaps",
        "-w",
        "-o",
        "name",
        "--request-timeout=5s",
    ]
    proc = subprocess.Popen(env_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    time.sleep(1)
    apply(k8s, configmap("b"))
    deadline = time.monotonic() + 10
    while "configmap/b\n" not in lines and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    reader.join(5)
    assert lines[:2] == ["configmap/a\n", "configmap/b\n"]


def test_injected_faults_take_precedence_over_the_stateful_api(k8s: EmulatorThread) -> None:
    k8s.handler["post", kmock.resource("", "v1", "configmaps")][:1] << 503
    core = kubernetes.client.CoreV1Api(client(k8s))
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("default", configmap("a"))
    assert e.value.status == 503
    assert k8s.kubectl("get", "configmap", "a", check=False).returncode != 0
    core.create_namespaced_config_map("default", configmap("a"))
    assert get(k8s, "configmap", "a")["data"] == {"k": "v"}


@pytest.mark.parametrize(
    ("api_version", "kind", "plural", "extra"),
    [
        (
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "endpointslices.discovery.k8s.io",
            {
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
                "ports": [{"name": "grpc", "port": 50051}],
            },
        ),
        ("v1", "Pod", "pods", {"spec": {"containers": [{"name": "c", "image": "i"}]}}),
        ("coordination.k8s.io/v1", "Lease", "leases", {"spec": {"holderIdentity": "me"}}),
        (
            "events.k8s.io/v1",
            "Event",
            "events.events.k8s.io",
            {"reason": "Test", "eventTime": "2025-01-01T00:00:00Z"},
        ),
        ("v1", "Event", "events", {"reason": "Test", "involvedObject": {"kind": "Pod", "name": "x"}}),
        ("policy/v1", "PodDisruptionBudget", "pdb", {"spec": {"maxUnavailable": 1}}),
    ],
)
def test_the_kinds_other_components_need_are_served(
    k8s: EmulatorThread, api_version: str, kind: str, plural: str, extra: dict[str, Any]
) -> None:
    apply(
        k8s,
        {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "labels": {"app": "a"}}, **extra},
    )
    listed = json.loads(k8s.kubectl("get", plural, "-l", "app=a", "-o", "json").stdout)
    assert [item["metadata"]["name"] for item in listed["items"]] == ["x"]
    assert listed["items"][0]["apiVersion"] == api_version and listed["items"][0]["kind"] == kind
