"""values.yaml documents every value; values.schema.json validates them, so bad values fail up front."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.helpers import CHART

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)

BAD_VALUES: dict[str, dict[str, Any]] = {
    "unknown top-level key": {"gatewy": {}},
    "unknown nested key": {"gateway": {"replica": 3}},
    "zero gateway replicas": {"gateway": {"replicas": 0}},
    "replicas as a string": {"gateway": {"replicas": "2"}},
    "unknown routing profile": {"gateway": {"routingProfile": "fastest"}},
    "custom routing without a profile": {"gateway": {"routingProfile": "custom"}},
    "ingress without hosts": {"gateway": {"ingress": {"enabled": True}}},
    "httpRoute without parents": {"gateway": {"httpRoute": {"enabled": True}}},
    "port out of range": {"gateway": {"service": {"httpPort": 70000}}},
    "unknown service type": {"gateway": {"service": {"type": "ExternalName"}}},
    "bad pull policy": {"operator": {"image": {"pullPolicy": "Sometimes"}}},
    "malformed digest": {"worker": {"image": {"digest": "sha256:xyz"}}},
    "uppercase namespace": {"watchNamespaces": ["Team-A"]},
    "duplicate namespaces": {"watchNamespaces": ["a", "a"]},
    "ratio above one": {"metrics": {"prometheusRule": {"targetMissRatio": 1.5}}},
    "malformed duration": {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
    "cpu target above 100": {"gateway": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
    "crds.install as a string": {"crds": {"install": "yes"}},
    "example without a name": {"examples": {"variants": [{"spec": {}}]}},
    "label value too long": {"global": {"commonLabels": {"team": "x" * 64}}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_the_schema_rejects_bad_values(case: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(BAD_VALUES[case])


def test_the_defaults_and_realistic_overrides_pass() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        chart.validate_schema(
            {
                "watchNamespaces": ["team-a"],
                "gateway": {
                    "pdb": {"maxUnavailable": "50%"},
                    "apiKeys": {"existingSecret": "keys"},
                    "extraEnv": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                },
                "operator": {
                    "image": {"digest": "sha256:" + "0" * 64},
                    "resources": {"requests": {"cpu": 1}},
                },
            }
        )


# Kubernetes types validated loosely by the schema; their fields are documented by the type, not here.
FREE_FORM = {"#/$defs/resources"}


def _schema_node(path: list[str]) -> dict[str, Any] | None:
    """The schema of a value, or None inside a free-form value."""
    node: dict[str, Any] = SCHEMA
    for key in path:
        if node.get("$ref") in FREE_FORM:
            return None
        while "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        properties = node.get("properties")
        if properties is None or key not in properties:
            return None
        node = properties[key]
    if node.get("$ref") in FREE_FORM:
        return {"type": "object"}
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _value_keys() -> list[tuple[list[str], bool]]:
    """(path, documented) of every mapping key in values.yaml that is not inside a free-form value."""
    found: list[tuple[list[str], bool]] = []
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in VALUES_TEXT.splitlines():
        match = re.match(r"^( *)([A-Za-z0-9_.]+):", line)
        if match and not line.lstrip().startswith("#"):
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = [k for _, k in stack] + [key]
            stack.append((indent, key))
            found.append((path, previous.lstrip().startswith("#")))
        if line.strip():
            previous = line
    return found


def test_every_value_is_commented() -> None:
    undocumented = []
    for path, documented in _value_keys():
        node = _schema_node(path)
        if node is None:
            continue  # inside a free-form value (resources, labels, a security context): documented above it
        is_section = "properties" in node
        if not is_section and not documented:
            undocumented.append(".".join(path))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_every_value_is_in_the_schema_and_every_schema_property_has_a_default() -> None:
    def walk(values: dict[str, Any], path: list[str]) -> None:
        for key, value in values.items():
            node = _schema_node([*path, key])
            parent = _schema_node(path) if path else SCHEMA
            assert parent is not None
            if "properties" in parent:
                assert node is not None, f"{'.'.join([*path, key])} is missing from values.schema.json"
                if isinstance(value, dict) and "properties" in node:
                    walk(value, [*path, key])

    walk(VALUES, [])

    def defaults(node: dict[str, Any], values: dict[str, Any], path: list[str]) -> None:
        for key in node.get("properties", {}):
            assert key in values, (
                f"{'.'.join([*path, key])} is in the schema but has no default in values.yaml"
            )
            resolved = _schema_node([*path, key]) or {}
            if "properties" in resolved and isinstance(values[key], dict):
                defaults(resolved, values[key], [*path, key])

    defaults(SCHEMA, VALUES, [])
