"""Rendering the chart offline (Helm's Go SDK through helm-python-sdk) and walking what it renders."""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dgemma"
CRD_FILE = ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"
RELEASE = "dgemma"
NAMESPACE = "dgemma-system"
KUBE_VERSION = "1.33"  # what kubernetes-validate checks against (the chart needs >= 1.30)

Body = dict[str, Any]

# Every optional feature on: the widest render.
EVERYTHING: Body = {
    "examples": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    "gateway": {
        "autoscaling": {"enabled": True},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": ["dgemma.example.com"],
            "tls": [{"hosts": ["dgemma.example.com"], "secretName": "dgemma-tls"}],
        },
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["dgemma.example.com"],
        },
        "routingProfile": "custom",
        "customRoutingProfile": "name: custom\npicker: {type: max-score}\n",
        "extraArgs": ["--max-n=2"],
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    },
    "networkPolicy": {"gatewayFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]},
    "global": {"imagePullSecrets": [{"name": "regcred"}], "commonLabels": {"team": "ml"}},
}


@functools.cache
def _render(values_json: str, namespace: str, upgrade: bool) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(
            json.loads(values_json),
            name=RELEASE,
            namespace=namespace,
            is_install=not upgrade,
            is_upgrade=upgrade,
        )


def render_templates(
    values: Body | None = None, namespace: str = NAMESPACE, upgrade: bool = False
) -> dict[str, str]:
    """Rendered text by template path (`dgemma/templates/...`), as for an install (or an upgrade)."""
    return _render(json.dumps(values or {}, sort_keys=True), namespace, upgrade)


def render(values: Body | None = None, namespace: str = NAMESPACE, upgrade: bool = False) -> list[Body]:
    """Every object the chart renders, NOTES left out (as for an install, or an upgrade)."""
    objects: list[Body] = []
    for path, text in sorted(render_templates(values, namespace, upgrade).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: Body | None = None, upgrade: bool = False) -> str:
    """The rendered NOTES.txt."""
    return render_templates(values, upgrade=upgrade)["dgemma/templates/NOTES.txt"]


def find(objects: list[Body], kind: str, name: str | None = None) -> list[Body]:
    """Objects of a kind (and name)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[Body], kind: str, name: str) -> Body:
    """The single object of that kind and name."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(obj: Body) -> Iterator[Body]:
    """The pod spec of a Pod or of a workload's template."""
    if obj["kind"] == "Pod":
        yield obj["spec"]
    elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield obj["spec"]["template"]["spec"]


def grants(rules: list[Body]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples of RBAC rules."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def load_yaml_documents(path: pathlib.Path) -> list[Body]:
    """The non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
