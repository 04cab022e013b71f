"""Generated files (chart CRD copy, Kustomize tree, dashboard, CRD reference) match their generators."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import CHART, CRD_FILE, KUBE_VERSION, ROOT, Body

GENERATORS = ["sync_crd.py", "render_kustomize.py", "gen_dashboard.py", "gen_crd_reference.py", "gen_chart_readme.py"]
KUSTOMIZATIONS = [
    "deploy/kustomize/base",
    "deploy/kustomize/overlays/monitoring",
    "deploy/kustomize/overlays/autoscaling",
    "deploy/examples",
    "deploy/crds",
]
CUSTOM_KINDS = {"DiffusionGemma", "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("generator", GENERATORS)
def test_generated_files_are_up_to_date(generator: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / generator), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_the_charts_crd_is_byte_identical_to_the_operators() -> None:
    assert (CHART / "files" / "crds" / CRD_FILE.name).read_bytes() == CRD_FILE.read_bytes()


def kustomize(directory: str) -> list[Body]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_builds_valid_objects(directory: str) -> None:
    objects = kustomize(directory)
    assert objects
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_base_installs_the_operator_gateway_crd_and_a_restricted_namespace() -> None:
    objects = kustomize("deploy/kustomize/base")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Deployment", "dgemma-operator"),
        ("Deployment", "dgemma-gateway"),
        ("CustomResourceDefinition", "diffusiongemmas.dgemma.io"),
        ("Namespace", "dgemma-system"),
    } <= kinds
    assert ("Secret", "dgemma-api-keys") not in kinds, "no generated secret in git: created by hand"
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") in (None, "kustomize"), obj["metadata"]["name"]


def test_the_autoscaling_overlay_leaves_the_replica_count_to_the_hpa() -> None:
    objects = kustomize("deploy/kustomize/overlays/autoscaling")
    gateway = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "dgemma-gateway"
    )
    assert "replicas" not in gateway["spec"]
    assert any(o["kind"] == "HorizontalPodAutoscaler" for o in objects)
