"""The example values under charts/dgemma/ci/ (what `ct lint` and Artifact Hub users start from) render valid
objects and lint clean; the extension hooks they use land where they should."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import CHART, KUBE_VERSION, NAMESPACE, Body, find, one, render

CUSTOM_KINDS = {"DiffusionGemma", "ServiceMonitor", "PrometheusRule", "HTTPRoute"}
CASES = sorted((CHART / "ci").glob("*-values.yaml"))


def _values(path: Path) -> Body:
    return dict(yaml.safe_load(path.read_text()))


def test_there_are_example_values_for_the_common_setups() -> None:
    assert {p.name for p in CASES} >= {"monitoring-values.yaml", "namespaced-values.yaml", "minimal-values.yaml",
                                        "extras-values.yaml"}


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_each_case_renders_valid_objects_and_lints_clean(case: Path) -> None:
    values = _values(case)
    objects = render(values)
    assert objects
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report.get("errors"), report


def test_extra_objects_volumes_and_mounts_are_rendered_where_asked() -> None:
    objects = render(_values(CHART / "ci" / "extras-values.yaml"))
    extra = one(objects, "ConfigMap", "dgemma-ca")
    assert extra["metadata"]["namespace"] == NAMESPACE  # strings of extra objects go through tpl
    for name in ("dgemma-gateway", "dgemma-operator"):
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        assert {"name": "ca", "configMap": {"name": "dgemma-ca"}} in pod["volumes"]
        assert {"name": "ca", "mountPath": "/etc/dgemma/ca", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]  # the chart's own stay


def test_without_extras_nothing_extra_is_rendered() -> None:
    assert not find(render(), "ConfigMap", "dgemma-ca")


def test_kubectl_get_shows_why_a_variant_is_not_ready_by_default() -> None:
    crd = one(render(), "CustomResourceDefinition", "diffusiongemmas.dgemma.io")
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert "Status" in columns and columns["Status"].get("priority", 0) == 0
