"""The Helm chart renders valid, least-privilege, restricted Kubernetes objects for every supported setup."""

from __future__ import annotations

import base64
import copy
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from dgemma_common.auth import first_key
from tests.deploy.helpers import (
    CHART,
    CRD_FILE,
    EVERYTHING,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    Body,
    find,
    grants,
    load_yaml_documents,
    notes,
    one,
    pod_specs,
    render,
)

# Kinds kubernetes-validate has no schema for; each is checked another way below.
CUSTOM_KINDS = {"DiffusionGemma", "ServiceMonitor", "PrometheusRule", "HTTPRoute", "Certificate", "Issuer"}
TLS: Body = {"tls": {"gateway": {"enabled": True}, "internal": {"enabled": True}}}
SETUPS: dict[str, Body] = {
    "defaults": {},
    "tls": {**TLS, "examples": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
    "everything": EVERYTHING,
    "namespaced": {
        "watchNamespaces": ["team-a", "team-b"],
        "networkPolicy": {"workerNamespaces": ["team-a"]},
    },
    "minimal": {
        "crds": {"install": False},
        "gateway": {"apiKeys": {"enabled": False}, "grpc": {"enabled": False}, "pdb": {"enabled": False}},
        "networkPolicy": {"enabled": False, "metricsFrom": []},
        "metrics": {"dashboard": {"enabled": False}},
    },
    "operator-only": {"gateway": {"enabled": False}},
    "gateway-only": {"operator": {"enabled": False}, "crds": {"install": False}},
}


@pytest.mark.parametrize("upgrade", [False, True], ids=["install", "upgrade"])
@pytest.mark.parametrize("setup", SETUPS)
def test_every_rendered_object_is_valid_for_kubernetes(setup: str, upgrade: bool) -> None:
    objects = render(SETUPS[setup], upgrade=upgrade)
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_crd_is_valid_for_the_apiextensions_schema_and_equals_the_operators_file() -> None:
    crd = one(render(), "CustomResourceDefinition", "diffusiongemmas.dgemma.io")
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    source = load_yaml_documents(CRD_FILE)[0]
    assert crd["spec"] == source["spec"], "the chart must install exactly the operator's CRD"
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crd_installation_and_keeping_are_switches() -> None:
    assert not find(render({"crds": {"install": False}}), "CustomResourceDefinition")
    crd = one(render({"crds": {"keep": False}}), "CustomResourceDefinition", "diffusiongemmas.dgemma.io")
    assert "annotations" not in crd["metadata"]


def test_the_chart_lints_clean() -> None:
    for values in ({}, EVERYTHING):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report.get("errors"), report


def test_every_object_carries_the_standard_labels_from_one_helper() -> None:
    for obj in render(EVERYTHING):
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "dgemma", obj["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "dgemma"
        assert labels["helm.sh/chart"] == "dgemma-0.1.0"
        assert labels["app.kubernetes.io/component"]
        assert labels["team"] == "ml", "global.commonLabels reach every object"


def test_every_pod_runs_under_the_restricted_pod_security_standard() -> None:
    pods = [spec for obj in render(EVERYTHING) for spec in pod_specs(obj)]
    assert len(pods) == 3, "operator, gateway and the `helm test` pod"
    for spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["runAsNonRoot"] is True
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "limits" in container["resources"] and "requests" in container["resources"]
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume


def test_image_tags_default_to_the_app_version_and_digests_pin() -> None:
    objects = render({"worker": {"image": {"tag": "0.2.0"}}, "examples": {"enabled": True}}, upgrade=True)
    assert (
        one(objects, "Deployment", "dgemma-operator")["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/dgemma/dgemma-control:0.1.0"
    )
    assert {v["spec"]["image"] for v in find(objects, "DiffusionGemma")} == {
        "ghcr.io/dgemma/dgemma-worker:0.2.0"
    }
    digest = "sha256:" + "a" * 64
    pinned = render({"gateway": {"image": {"digest": digest}}})
    image = one(pinned, "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/dgemma/dgemma-control:0.1.0@{digest}"


def test_the_operator_is_one_standalone_instance_with_a_liveness_probe() -> None:
    deployment = one(render(), "Deployment", "dgemma-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["dgemma", "operator"]
    assert "--standalone" in container["args"] and "--all-namespaces" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "dgemma-operator"
    namespaced = one(render({"watchNamespaces": ["a", "b"]}), "Deployment", "dgemma-operator")
    args = namespaced["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args and "--all-namespaces" not in args


def _operator_rules(objects: list[Body], namespaced: bool) -> set[tuple[str, str, str]]:
    kinds = ("ClusterRole", "Role") if namespaced else ("ClusterRole",)
    rules = [
        rule
        for obj in objects
        if obj["kind"] in kinds and obj["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        for rule in obj["rules"]
    ]
    return grants(rules)


# Beyond what deploy/rbac grants: update on the owner's finalizers, which OwnerReferencesPermissionEnforcement
# (OpenShift) requires for the children's blockOwnerDeletion.
FINALIZERS = {("dgemma.io", "diffusiongemmas/finalizers", "update")}


@pytest.mark.parametrize(
    ("setup", "source"),
    [({}, "operator-clusterwide.yaml"), ({"watchNamespaces": ["dgemma"]}, "operator-namespaced.yaml")],
)
def test_operator_rbac_grants_what_the_operator_tests_proved_it_needs(setup: Body, source: str) -> None:
    from tests.deploy.helpers import ROOT

    reference = load_yaml_documents(ROOT / "deploy" / "rbac" / source)
    expected = grants(
        [rule for d in reference if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]
    )
    peering = {g for g in expected if g[0] == "kopf.dev"}  # the chart runs one standalone instance
    assert _operator_rules(render(setup), namespaced=bool(setup)) == (expected - peering) | FINALIZERS


def test_namespaced_mode_binds_roles_only_in_the_watched_namespaces() -> None:
    objects = render({"watchNamespaces": ["team-a", "team-b"]})
    cluster_roles = {o["metadata"]["name"] for o in find(objects, "ClusterRole")}
    assert cluster_roles == {"dgemma-operator-discovery"}, "only kopf's cluster-wide reads stay cluster-wide"
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in find(objects, "Role")}
    assert roles == {
        (ns, name) for ns in ("team-a", "team-b") for name in ("dgemma-operator", "dgemma-gateway")
    }
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        (subject,) = binding["subjects"]
        assert subject["namespace"] == NAMESPACE and subject["kind"] == "ServiceAccount"


def test_no_rbac_rule_uses_a_wildcard_or_touches_secrets() -> None:
    for setup in ({}, {"watchNamespaces": ["a"]}):
        objects = render(setup)
        for obj in find(objects, "ClusterRole") + find(objects, "Role"):
            for rule in obj["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
                assert "delete" not in rule["verbs"], rule
                if "secrets" in rule["resources"]:  # only the gateway, only `get`, only the workers' key by name
                    assert obj["metadata"]["name"] == "dgemma-gateway", rule
                    assert rule["verbs"] == ["get"] and rule["resourceNames"] == ["dgemma-worker-api-key"], rule


def test_gateway_rbac_is_read_only_discovery() -> None:
    role = one(render({"worker": {"apiKey": {"enabled": False}}}), "ClusterRole", "dgemma-gateway")
    assert grants(role["rules"]) == {
        (group, resource, verb)
        for group, resource in (("dgemma.io", "diffusiongemmas"), ("discovery.k8s.io", "endpointslices"))
        for verb in ("get", "list", "watch")
    }


@pytest.mark.parametrize("secrets", [
    {"apiKeySecrets": ["worker-key", "hosted-key"]},
    {"externalApiKeySecrets": ["worker-key", "hosted-key"]},  # the former name still works
    {"apiKeySecrets": ["worker-key"], "externalApiKeySecrets": ["hosted-key", "worker-key"]},  # both: the union
])
def test_the_gateway_may_read_exactly_the_secrets_named_for_api_keys(secrets: dict[str, list[str]]) -> None:
    for setup in ({}, {"watchNamespaces": ["a"]}):
        objects = render({**setup, "gateway": secrets, "worker": {"apiKey": {"enabled": False}}})
        role = one(objects, "ClusterRole" if not setup else "Role", "dgemma-gateway")
        (rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert rule == {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["worker-key", "hosted-key"],
                        "verbs": ["get"]}


def test_gateway_runs_several_replicas_with_keys_from_a_secret_and_discovery_on() -> None:
    objects = render()
    deployment = one(objects, "Deployment", "dgemma-gateway")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DGEMMA_KUBERNETES"] == "true"
    assert env["DGEMMA_GATEWAY_PORT"] == "8000" and env["DGEMMA_GATEWAY_GRPC_PORT"] == "8001"
    assert env["DGEMMA_API_KEYS_FILE"] == "/etc/dgemma/api-keys/api-keys"
    assert "DGEMMA_NAMESPACE" not in env, "all namespaces by default"
    keys_volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys_volume["secret"]["secretName"] == "dgemma-api-keys"
    secret = one(objects, "Secret", "dgemma-api-keys")
    assert secret["data"]["api-keys"]
    service = one(objects, "Service", "dgemma-gateway")
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("http", 8000), ("grpc", 8001)}
    assert one(objects, "PodDisruptionBudget", "dgemma-gateway")["spec"]["maxUnavailable"] == 1
    assert not find(objects, "HorizontalPodAutoscaler") and not find(objects, "Ingress")


def test_an_existing_api_key_secret_replaces_the_generated_one() -> None:
    objects = render({"gateway": {"apiKeys": {"existingSecret": "my-keys", "secretKey": "keys.txt"}}})
    assert [s["metadata"]["name"] for s in find(objects, "Secret")] == ["dgemma-worker-api-key"]  # the workers' own
    pod = one(objects, "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "my-keys"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DGEMMA_API_KEYS_FILE"] == "/etc/dgemma/api-keys/keys.txt"


def test_optional_gateway_exposure_and_autoscaling() -> None:
    objects = render(EVERYTHING)
    assert "replicas" not in one(objects, "Deployment", "dgemma-gateway")["spec"], "the HPA owns the count"
    hpa = one(objects, "HorizontalPodAutoscaler", "dgemma-gateway")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    ingress = one(objects, "Ingress", "dgemma-gateway")
    assert ingress["spec"]["rules"][0]["host"] == "dgemma.example.com"
    route = one(objects, "HTTPRoute", "dgemma-gateway")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "dgemma-gateway", "port": 8000}]
    profile = one(objects, "ConfigMap", "dgemma-routing")
    assert yaml.safe_load(profile["data"]["profile.yaml"])["name"] == "custom"
    env = {
        e["name"]: e.get("value")
        for e in one(objects, "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert env["DGEMMA_ROUTING_PROFILE"] == "/etc/dgemma/routing/profile.yaml"


def _ports(rule: Body) -> set[int]:
    return {p["port"] for p in rule["ports"]}


def _admitted(policies: list[Body], namespace: str, pod: dict[str, str], port: int) -> list[Body]:
    """The peers the policies admit to a pod's port (NetworkPolicy ingress semantics: a union of the rules of every
    policy selecting the pod)."""
    return [peer for p in policies if p["metadata"]["namespace"] == namespace
            and p["spec"]["podSelector"]["matchLabels"].items() <= pod.items()
            for rule in p["spec"]["ingress"] if port in _ports(rule) for peer in rule.get("from", [{}])]


def test_only_the_gateway_reaches_the_workers_grpc_port_and_vllm_pods_api_port() -> None:
    from dgemma_operator import children

    gateway_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "dgemma",
                                                    "app.kubernetes.io/instance": RELEASE,
                                                    "app.kubernetes.io/component": "gateway"}}}
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for values, vllm_peers in (({}, [gateway_peer]),
                               ({"networkPolicy": {"vllmMetricsFrom": prometheus}}, [gateway_peer, *prometheus])):
        objects = render({"watchNamespaces": ["team-a", "team-b"], **values})
        policies = find(objects, "NetworkPolicy")
        assert {p["metadata"]["namespace"] for p in policies if p["metadata"]["name"] == "dgemma-workers"} == {
            "team-a", "team-b"}
        assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
        for runtime in ({"image": "i"}, {"runtime": "vllm"}):
            spec = children.models.DiffusionGemmaSpec.model_validate(
                {"servedModelName": "m", "model": {"huggingFace": {"id": "a/b"}}, **runtime})
            pod = children.worker_labels("x", spec)
            for namespace in ("team-a", "team-b"):
                # A dgemma worker's gRPC port: the gateway only; its metrics: `metricsFrom` (default any pod).
                assert _admitted(policies, namespace, pod, 50051) == [gateway_peer]
                assert _admitted(policies, namespace, pod, 9090) == [{"namespaceSelector": {}}]
                # A vLLM pod's API port (vLLM 0.24.0 serves POST /invocations without its key): the gateway only,
                # unless scrapers are let in by name for vLLM's /metrics.
                assert _admitted(policies, namespace, pod, 8000) == vllm_peers
                assert _admitted(policies, namespace, pod, 8080) == []


def test_worker_pod_labels_match_what_the_operator_sets() -> None:
    from dgemma_operator import children

    policy = one(render(), "NetworkPolicy", "dgemma-workers")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for runtime in ({"image": "i"}, {"runtime": "vllm"}):
        spec = children.models.DiffusionGemmaSpec.model_validate(
            {"servedModelName": "m", "model": {"huggingFace": {"id": "a/b"}}, **runtime}
        )
        assert selector.items() <= children.worker_labels("x", spec).items()


def test_without_metrics_peers_nothing_may_scrape_and_without_gateway_peers_anyone_may_call() -> None:
    objects = render({"networkPolicy": {"metricsFrom": []}})
    assert [_ports(r) for r in one(objects, "NetworkPolicy", "dgemma-workers")["spec"]["ingress"]] == [
        {50051, 8000}
    ]
    (rule,) = one(objects, "NetworkPolicy", "dgemma-gateway")["spec"]["ingress"]
    assert "from" not in rule and _ports(rule) == {8000, 8001}


def test_service_monitors_select_the_gateway_and_the_operators_worker_services() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    gateway = one(objects, "ServiceMonitor", "dgemma-gateway")
    assert gateway["spec"]["endpoints"][0]["port"] == "http"
    assert gateway["metadata"]["labels"]["release"] == "prom"
    workers = one(objects, "ServiceMonitor", "dgemma-workers")
    assert workers["spec"]["namespaceSelector"] == {"any": True}
    assert workers["spec"]["endpoints"][0]["port"] == "metrics"
    namespaced = one(
        render({"watchNamespaces": ["a"], "metrics": {"serviceMonitor": {"enabled": True}}}),
        "ServiceMonitor",
        "dgemma-workers",
    )
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["a"]}


def test_examples_wait_for_an_upgrade_when_the_same_install_creates_their_crd() -> None:
    examples = {"examples": {"enabled": True}}
    assert not find(render(examples), "DiffusionGemma")
    assert "--reuse-values" in notes(examples)
    assert find(render(examples, upgrade=True), "DiffusionGemma")
    assert "kubectl -n dgemma-system get dgm" in notes(examples, upgrade=True)
    assert find(render({**examples, "crds": {"install": False}}), "DiffusionGemma"), "CRD applied beforehand"


def test_example_variants_merge_the_common_spec_and_take_the_worker_image() -> None:
    variants = find(render({"examples": {"enabled": True}}, upgrade=True), "DiffusionGemma")
    assert {v["metadata"]["name"] for v in variants} == {"gemma-h100-fp8", "gemma-rtx-pro-6000"}
    for variant in variants:
        assert variant["spec"]["servedModelName"] == "google/diffusiongemma-26B-A4B-it"
        assert variant["spec"]["image"] == "ghcr.io/dgemma/dgemma-worker:0.1.0"


def test_notes_tell_the_next_steps() -> None:
    text = notes()
    assert "kind: DiffusionGemma" in text and "kubectl get dgm" in text
    assert "port-forward svc/dgemma-gateway 8000:8000" in text
    assert "/v1/chat/completions" in text and "Authorization: Bearer" in text
    assert "Authorization" not in notes({"gateway": {"apiKeys": {"enabled": False}}})
    assert "https://dgemma.example.com/v1/models" in notes(EVERYTHING)


def test_template_failures_name_the_value_to_fix() -> None:
    with helm.Chart.load(CHART) as chart:
        values: dict[str, Any] = copy.deepcopy(chart.values)
        values["gateway"]["ingress"]["enabled"] = True
        with pytest.raises(helm.HelmError, match=r"gateway[./]ingress[./]hosts"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_operators_autoscaler_reads_this_releases_gateway_even_behind_a_network_policy() -> None:
    objects = render({"networkPolicy": {"gatewayFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}]}})
    (container,) = one(objects, "Deployment", "dgemma-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DGEMMA_GATEWAY_URL"] == f"http://dgemma-gateway-pods.{NAMESPACE}.svc:8000"
    headless = one(objects, "Service", "dgemma-gateway-pods")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"] == one(objects, "Service", "dgemma-gateway")["spec"]["selector"]
    rules = one(objects, "NetworkPolicy", "dgemma-gateway")["spec"]["ingress"]
    operator_pods = [r for r in rules if any("podSelector" in p and p["podSelector"]["matchLabels"].get(
        "app.kubernetes.io/component") == "operator" for p in r.get("from", []))]
    assert len(operator_pods) == 1 and _ports(operator_pods[0]) == {8000}


def _env(container: Body) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_tls_issues_the_gateways_certificate_and_mutual_tls_to_the_workers_with_cert_manager() -> None:
    objects = render({**TLS, "examples": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
                     upgrade=True)
    certificates = {c["metadata"]["name"]: c["spec"] for c in find(objects, "Certificate")}
    ca_issuer = {"name": "dgemma-internal-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert certificates["dgemma-internal-ca"]["isCA"] is True
    assert one(objects, "Issuer", "dgemma-internal-ca")["spec"] == {"ca": {"secretName": "dgemma-internal-ca"}}
    gateway = certificates["dgemma-gateway-tls"]
    assert gateway["issuerRef"] == ca_issuer and gateway["usages"] == ["server auth", "digital signature"]
    # The operator dials the headless Service's pods, Prometheus the Service: both names are in the certificate.
    assert {f"dgemma-gateway-pods.{NAMESPACE}.svc", f"dgemma-gateway.{NAMESPACE}.svc"} <= set(gateway["dnsNames"])
    client = certificates["dgemma-gateway-client-tls"]
    assert client["usages"] == ["client auth", "digital signature"] and client["issuerRef"] == ca_issuer
    worker = certificates["dgemma-worker-tls"]
    assert worker["secretName"] == "dgemma-worker-tls" and worker["dnsNames"] == ["dgemma-worker"]

    pod = one(objects, "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert env["DGEMMA_TLS_CERT_FILE"] == "/etc/dgemma/tls/tls.crt" and env["DGEMMA_TLS_KEY_FILE"]
    assert env["DGEMMA_WORKER_TLS_CA_FILE"] == "/etc/dgemma/worker-tls/ca.crt"
    assert env["DGEMMA_WORKER_TLS_SERVER_NAME"] == "dgemma-worker"
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
    assert volumes["tls"] == "dgemma-gateway-tls" and volumes["worker-tls"] == "dgemma-gateway-client-tls"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"

    operator = one(objects, "Deployment", "dgemma-operator")["spec"]["template"]["spec"]
    assert _env(operator["containers"][0])["DGEMMA_GATEWAY_URL"].startswith("https://dgemma-gateway-pods.")
    ca_volume = next(v for v in operator["volumes"] if v["name"] == "gateway-ca")["secret"]
    assert ca_volume["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "the operator never mounts the key"
    for variant in find(objects, "DiffusionGemma"):
        assert variant["spec"]["worker"]["tlsSecret"] == "dgemma-worker-tls"
    monitor = one(objects, "ServiceMonitor", "dgemma-gateway")["spec"]["endpoints"][0]
    assert monitor["scheme"] == "https" and monitor["tlsConfig"]["ca"]["secret"]["name"] == "dgemma-gateway-tls"


def test_tls_takes_an_existing_secret_or_an_issuer_and_names_what_is_missing() -> None:
    objects = render({"tls": {"gateway": {"enabled": True, "existingSecret": "my-cert"}}})
    assert not find(objects, "Certificate") and not find(objects, "Issuer")
    pod = one(objects, "Deployment", "dgemma-gateway")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "my-cert"
    issued = render({"tls": {"gateway": {"enabled": True, "certManager": {
        "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}, "dnsNames": ["api.example.com"]}}}})
    cert = one(issued, "Certificate", "dgemma-gateway-tls")["spec"]
    assert cert["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert "api.example.com" in cert["dnsNames"]
    with helm.Chart.load(CHART) as chart:
        values: dict[str, Any] = copy.deepcopy(chart.values)
        values["tls"]["gateway"]["enabled"] = True
        with pytest.raises(helm.HelmError, match=r"tls.gateway.certManager.issuerRef"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        values = copy.deepcopy(chart.values)
        values["tls"]["internal"]["enabled"] = True
        values["watchNamespaces"] = ["team-a"]
        with pytest.raises(helm.HelmError, match=r"tls.internal.issuerRef.*team-a"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def _worker_key(secret: Body) -> str:
    return base64.b64decode(secret["data"]["keys"]).decode()


def test_the_chart_generates_the_workers_key_in_every_worker_namespace_for_the_gateway_and_the_examples() -> None:
    objects = render({"watchNamespaces": ["team-a", "team-b"], "examples": {"enabled": True}}, upgrade=True)
    secrets = [s for s in find(objects, "Secret") if s["metadata"]["name"] == "dgemma-worker-api-key"]
    assert {s["metadata"]["namespace"] for s in secrets} == {"team-a", "team-b"}
    keys = {_worker_key(s) for s in secrets}
    (key,) = keys  # one key for every namespace: the gateway presents one
    assert key.startswith("dgw-") and len(key) == 44 and first_key(key) == key
    assert all(s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for s in secrets)
    roles = find(objects, "Role", "dgemma-gateway")
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "team-b"}
    for role in roles:
        (rule,) = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert rule["resourceNames"] == ["dgemma-worker-api-key"] and rule["verbs"] == ["get"]
    for variant in find(objects, "DiffusionGemma"):
        assert variant["spec"]["worker"]["apiKeySecret"] == {"name": "dgemma-worker-api-key", "key": "keys"}
    assert "apiKeySecret:" in notes() and "name: dgemma-worker-api-key" in notes()


def test_an_existing_worker_key_secret_or_none_replaces_the_generated_one() -> None:
    objects = render({"examples": {"enabled": True}, "tls": {"internal": {"enabled": True}},
                      "worker": {"apiKey": {"existingSecret": "my-worker-key", "secretKey": "k"}}}, upgrade=True)
    assert not [s for s in find(objects, "Secret") if "worker-api-key" in s["metadata"]["name"]]
    (rule,) = [r for r in one(objects, "ClusterRole", "dgemma-gateway")["rules"] if "secrets" in r["resources"]]
    assert rule["resourceNames"] == ["my-worker-key"]
    for variant in find(objects, "DiffusionGemma"):  # beside the internal TLS Secret
        assert variant["spec"]["worker"] == {"apiKeySecret": {"name": "my-worker-key", "key": "k"},
                                             "tlsSecret": "dgemma-worker-tls"}
    off = render({"examples": {"enabled": True}, "worker": {"apiKey": {"enabled": False}}}, upgrade=True)
    assert not [s for s in find(off, "Secret") if "worker-api-key" in s["metadata"]["name"]]
    assert all("worker" not in v["spec"] for v in find(off, "DiffusionGemma"))
    assert "apiKeySecret" not in notes({"worker": {"apiKey": {"enabled": False}}})
