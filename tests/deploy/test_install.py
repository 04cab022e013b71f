"""`helm install / upgrade / uninstall` of the chart into the Kubernetes API emulator, through Helm's Go SDK.

Releases are kept by Helm's memory storage driver; objects go to the emulator over real HTTP, so Helm's
discovery, REST mapping, server-side apply, `lookup` and deletion all run for real.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.deploy.helpers import CHART, EVERYTHING, NAMESPACE, RELEASE, Body
from tests.k8s_emulator import EmulatorThread
from tests.k8s_emulator.resources import ResourceType

TIMEOUT_S = 60
# Built-in kinds the emulator does not serve by default, and the CRDs of the Prometheus Operator and the
# Gateway API that a cluster using those features has installed.
EXTRA_TYPES = (
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=("ing",), status=True),
    ResourceType(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        "HorizontalPodAutoscaler",
        short_names=("hpa",),
        status=True,
    ),
    ResourceType("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
    ResourceType("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule"),
    ResourceType("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", status=True),
)


@pytest.fixture
def cluster(k8s: EmulatorThread) -> Iterator[EmulatorThread]:
    """The emulator with the kinds a cluster running this chart serves, and the release namespace."""
    for rtype in EXTRA_TYPES:
        k8s.call(lambda rtype=rtype: k8s.store.register(rtype))
    create_namespace(k8s, NAMESPACE)
    yield k8s


def create_namespace(cluster: EmulatorThread, name: str) -> None:
    """A namespace (kubectl create speaks protobuf, which the emulator does not)."""
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )


@pytest.fixture
def helm_config(cluster: EmulatorThread) -> Iterator[helm.Config]:
    """Helm's client for the emulator, releases in memory."""
    with helm.Config(
        kubeconfig_path=cluster.kubeconfig, namespace=NAMESPACE, storage_driver="memory"
    ) as config:
        yield config


def get(cluster: EmulatorThread, kind: str, name: str, namespace: str = NAMESPACE) -> Body | None:
    """An object from the API, or None."""
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(result.stdout) if result.stdout.strip() else None


def names(cluster: EmulatorThread, kind: str) -> set[str]:
    """Names of the objects of a kind in every namespace."""
    listed = json.loads(cluster.kubectl("get", kind, "-A", "-o", "json").stdout)
    return {item["metadata"]["name"] for item in listed["items"]}


def test_install_upgrade_uninstall_keeps_the_crd_and_the_api_key(
    cluster: EmulatorThread, helm_config: helm.Config
) -> None:
    release = helm_config.install(CHART, RELEASE, {}, timeout=TIMEOUT_S)
    assert release["status"] == "deployed" and release["revision"] == 1

    assert get(cluster, "crd", "diffusiongemmas.dgemma.io", namespace="") is not None
    for kind, name in [
        ("deployment", "dgemma-operator"),
        ("deployment", "dgemma-gateway"),
        ("service", "dgemma-gateway"),
        ("serviceaccount", "dgemma-operator"),
        ("serviceaccount", "dgemma-gateway"),
        ("pdb", "dgemma-gateway"),
        ("networkpolicy", "dgemma-workers"),
        ("configmap", "dgemma-dashboard"),
    ]:
        assert get(cluster, kind, name) is not None, f"{kind}/{name} was not created"
    assert {"dgemma-operator", "dgemma-operator-discovery", "dgemma-gateway"} <= names(cluster, "clusterrole")
    secret = get(cluster, "secret", "dgemma-api-keys")
    assert secret is not None
    key = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert key.startswith("dgm-") and len(key) == 44
    worker_secret = get(cluster, "secret", "dgemma-worker-api-key")
    assert worker_secret is not None
    worker_key = base64.b64decode(worker_secret["data"]["keys"]).decode()
    assert worker_key.startswith("dgw-") and worker_key != key

    # The CRD the chart installed serves DiffusionGemmas, with the schema enforced.
    variant = {
        "apiVersion": "dgemma.io/v1alpha1",
        "kind": "DiffusionGemma",
        "metadata": {"name": "gemma"},
        "spec": {"servedModelName": "m", "model": {"huggingFace": {"id": "a/b"}}, "image": "w:1"},
    }
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(variant))
    bad = {**variant, "spec": {**variant["spec"], "costWeight": 0}}
    refused = cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "costWeight" in refused.stderr

    upgraded = helm_config.upgrade(CHART, RELEASE, {"gateway": {"replicas": 3}}, timeout=TIMEOUT_S)
    assert upgraded["revision"] == 2 and upgraded["status"] == "deployed"
    gateway = get(cluster, "deployment", "dgemma-gateway")
    assert gateway is not None and gateway["spec"]["replicas"] == 3
    secret = get(cluster, "secret", "dgemma-api-keys")
    assert secret is not None
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == key, "lookup keeps the generated key"
    worker_secret = get(cluster, "secret", "dgemma-worker-api-key")
    assert worker_secret is not None
    assert base64.b64decode(worker_secret["data"]["keys"]).decode() == worker_key, "and the workers' key"

    helm_config.uninstall(RELEASE, timeout=TIMEOUT_S)
    for kind, name in [
        ("deployment", "dgemma-operator"),
        ("deployment", "dgemma-gateway"),
        ("secret", "dgemma-api-keys"),
        ("networkpolicy", "dgemma-workers"),
    ]:
        assert get(cluster, kind, name) is None, f"{kind}/{name} outlived the release"
    assert not {"dgemma-operator", "dgemma-gateway"} & names(cluster, "clusterrole")
    assert get(cluster, "crd", "diffusiongemmas.dgemma.io", namespace="") is not None, "the CRD is kept"
    assert get(cluster, "dgm", "gemma") is not None, "and with it the user's resources"
    # Resources outside the release may name the workers' key: it stays, and a new install takes it over.
    worker_secret = get(cluster, "secret", "dgemma-worker-api-key")
    assert worker_secret is not None and base64.b64decode(worker_secret["data"]["keys"]).decode() == worker_key
    assert helm_config.list() == []
    assert helm_config.install(CHART, RELEASE, {}, timeout=TIMEOUT_S)["status"] == "deployed"
    worker_secret = get(cluster, "secret", "dgemma-worker-api-key")
    assert worker_secret is not None and base64.b64decode(worker_secret["data"]["keys"]).decode() == worker_key
    helm_config.uninstall(RELEASE, timeout=TIMEOUT_S)


def test_every_optional_feature_installs_and_upgrades_away(
    cluster: EmulatorThread, helm_config: helm.Config
) -> None:
    helm_config.install(CHART, RELEASE, EVERYTHING, timeout=TIMEOUT_S)
    for kind, name in [
        ("hpa", "dgemma-gateway"),
        ("ingress", "dgemma-gateway"),
        ("httproute", "dgemma-gateway"),
        ("servicemonitor", "dgemma-gateway"),
        ("servicemonitor", "dgemma-workers"),
        ("prometheusrule", "dgemma"),
        ("configmap", "dgemma-routing"),
    ]:
        assert get(cluster, kind, name) is not None, f"{kind}/{name} was not created"
    assert get(cluster, "dgm", "gemma-h100-fp8") is None, "examples wait for the CRD this install created"

    helm_config.upgrade(CHART, RELEASE, EVERYTHING, timeout=TIMEOUT_S)
    example = get(cluster, "dgm", "gemma-h100-fp8")
    assert example is not None and get(cluster, "dgm", "gemma-rtx-pro-6000") is not None
    assert example["spec"]["gpu"]["count"] == 1, "the API server applied the CRD's defaults"

    # Empty values on upgrade would mean "reuse the last ones"; reset_values means the chart's defaults.
    helm_config.upgrade(CHART, RELEASE, {}, reset_values=True, timeout=TIMEOUT_S)
    for kind, name in [
        ("hpa", "dgemma-gateway"),
        ("ingress", "dgemma-gateway"),
        ("httproute", "dgemma-gateway"),
        ("prometheusrule", "dgemma"),
        ("servicemonitor", "dgemma-workers"),
        ("configmap", "dgemma-routing"),
        ("dgm", "gemma-h100-fp8"),
    ]:
        assert get(cluster, kind, name) is None, f"{kind}/{name} survived turning its feature off"


def test_namespaced_install_binds_roles_in_the_watched_namespaces(
    cluster: EmulatorThread, helm_config: helm.Config
) -> None:
    create_namespace(cluster, "team-a")
    helm_config.install(
        CHART, RELEASE, {"watchNamespaces": ["team-a"], "crds": {"keep": False}}, timeout=TIMEOUT_S
    )
    for kind in ("role", "rolebinding"):
        assert get(cluster, kind, "dgemma-operator", namespace="team-a") is not None
        assert get(cluster, kind, "dgemma-gateway", namespace="team-a") is not None
    assert get(cluster, "networkpolicy", "dgemma-workers", namespace="team-a") is not None
    helm_config.uninstall(RELEASE, timeout=TIMEOUT_S)
    assert get(cluster, "role", "dgemma-operator", namespace="team-a") is None
    assert get(cluster, "crd", "diffusiongemmas.dgemma.io", namespace="") is None, (
        "crds.keep=false removes it"
    )


def test_an_invalid_value_fails_before_anything_is_created(
    cluster: EmulatorThread, helm_config: helm.Config
) -> None:
    with pytest.raises(helm.HelmError, match="replicas"):
        helm_config.install(CHART, RELEASE, {"gateway": {"replicas": 0}}, timeout=TIMEOUT_S)
    assert get(cluster, "deployment", "dgemma-gateway") is None
    assert helm_config.list() == []
