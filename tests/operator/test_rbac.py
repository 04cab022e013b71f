"""The RBAC in deploy/rbac is least-privilege and covers every call the operator makes."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import yaml
from kopf.testing import KopfRunner

from tests.k8s_emulator import EmulatorThread
from tests.operator.conftest import OPERATOR_ARGS
from tests.operator.helpers import DemandStub, apply, eventually, exists, get, mark_ready, sample

RBAC = pathlib.Path("deploy/rbac")


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((RBAC / name).read_text()) if d]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def rules_of(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in kinds for rule in d["rules"]]


def verb(method: str, name: str | None, params: dict[str, str]) -> str:
    if method == "GET":
        return "watch" if params.get("watch") in ("true", "1") else ("get" if name else "list")
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


def test_no_rule_uses_a_wildcard() -> None:
    for path in RBAC.glob("*.yaml"):
        for d in yaml.safe_load_all(path.read_text()):
            for rule in (d or {}).get("rules", []):
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], (path, rule)


def test_namespaced_and_clusterwide_rbac_grant_the_same_namespaced_rights() -> None:
    cluster = grants(rules_of(documents("operator-clusterwide.yaml"), "ClusterRole"))
    namespaced = grants(rules_of(documents("operator-namespaced.yaml"), "ClusterRole", "Role"))
    assert cluster - namespaced == {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")
    }
    assert namespaced <= cluster


def test_every_call_of_a_full_lifecycle_is_granted(k8s: EmulatorThread, crd: None, demand: DemandStub) -> None:
    k8s.kubectl("apply", "-f", "deploy/crds/kopf-peering.yaml")
    apply(k8s, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "dgemma"}})
    args = [a for a in OPERATOR_ARGS if a != "--standalone"] + ["--peering", "dgemma"]
    with KopfRunner(args, timeout=30):
        apply(k8s, sample())
        eventually(lambda: exists(k8s, "deployment", "gemma-worker"))
        k8s.kubectl("scale", "dgm/gemma", "--replicas=2")
        eventually(
            lambda: (
                k8s.kubectl("get", "deploy", "gemma-worker", "-o", "jsonpath={.spec.replicas}").stdout == "2"
            )
        )
        mark_ready(k8s, "gemma-worker", 2)
        demand.demand("default/scaled", canvases_per_s=2.0)  # the autoscaler: demand wants more than one replica
        apply(k8s, sample("scaled", autoscaling={"enabled": True}))
        eventually(lambda: get(k8s, "dgm", "scaled")["spec"]["replicas"] > 1, timeout=20)
        k8s.kubectl("delete", "dgm", "scaled", "--timeout=20s")
        k8s.kubectl("delete", "service", "gemma-worker")
        eventually(lambda: exists(k8s, "service", "gemma-worker"))
        k8s.kubectl("delete", "dgm", "gemma", "--timeout=20s")
        peering = json.loads(k8s.kubectl("get", "kopfpeering", "dgemma", "-o", "json").stdout)
        assert peering.get("status"), "the operator announced itself in the peering object"

    allowed = grants(rules_of(documents("operator-clusterwide.yaml"), "ClusterRole"))
    made = set()
    for request in k8s.handler:
        agent = request.headers.get("User-Agent", "")
        if request.resource is None or not agent.startswith(("kopf/", "dgemma-operator/")):
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        made.add(
            (request.resource.group, resource, verb(request.method.value, request.name, dict(request.params)))
        )
        if request.headers.get("Content-Type", "").startswith("application/apply-patch"):
            made.add((request.resource.group, resource, "create"))  # server-side apply may create
    assert made, "the operator made no calls"
    assert made <= allowed, f"not granted: {sorted(made - allowed)}"
    unused = {g for g in allowed if g[1] != "clusterkopfpeerings" and g not in made}
    assert unused == set(), f"granted but never needed: {unused}"
