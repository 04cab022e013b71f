"""The CRD is generated from the typed models, and the API server enforces its schema."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from dgemma_operator import crd
from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import CRD_PATH, apply, get, sample


def test_the_crd_file_is_what_the_models_generate() -> None:
    assert pathlib.Path(CRD_PATH).read_text() == crd.render_yaml(), (
        f"deploy/crds is stale: run `python -m dgemma_operator.crd > {CRD_PATH}`"
    )


def test_the_crd_has_status_scale_printer_columns_and_descriptions() -> None:
    version = yaml.safe_load(pathlib.Path(CRD_PATH).read_text())["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert (
        columns[:7] == ["Model", "Runtime", "Profile", "Ready", "Desired", "Tokens/s", "P95-ms"]
        and columns[-1] == "Age"
    )

    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        missing = []
        for name, prop in (node.get("properties") or {}).items():
            if "description" not in prop and name not in ("metadata",):
                missing.append(f"{path}.{name}")
            missing += undescribed(prop, f"{path}.{name}")
            if isinstance(prop.get("items"), dict):
                missing += undescribed(prop["items"], f"{path}.{name}[]")
        return missing

    assert undescribed(version["schema"]["openAPIV3Schema"], "") == []


def test_defaults_are_applied_by_the_api_server(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    apply(k8s, sample("g"))
    spec = get(k8s, "dgm", "g")["spec"]
    assert spec["replicas"] == 1 and spec["minReplicas"] == 1 and spec["maxReplicas"] == 4
    assert spec["generation"] == {"canvasLength": 256, "maxDenoisingSteps": 48}
    assert spec["worker"]["maxActive"] == 4 and spec["cache"]["mountPath"] == "/models"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpu": {"profile": "a100"}}, "Unsupported value: 'a100'"),
        ({"replicas": -1}, "spec.replicas: Invalid value"),
        ({"minReplicas": 3, "maxReplicas": 2, "replicas": 2}, "minReplicas must not exceed maxReplicas"),
        ({"replicas": 9, "maxReplicas": 4}, "replicas must lie between minReplicas and maxReplicas"),
        (
            {"model": {"huggingFace": {"id": "a/b"}, "url": "https://x/y.tar"}},
            "only one of huggingFace, pvc or url",
        ),
        ({"model": {}}, "one of huggingFace, pvc or url is required"),
        ({"generation": {"tMin": 2.0, "tMax": 1.0}}, "tMin must not exceed tMax"),
        ({"costWeight": 0}, "spec.costWeight: Invalid value"),
        ({"image": ""}, "spec.image: Invalid value"),
    ],
)
def test_the_schema_rejects_invalid_resources(
    k8s: EmulatorThread, change: dict[str, Any], message: str
) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    body = sample("bad")
    body["spec"].update(change)
    output = apply(k8s, body, check=False)
    assert "is invalid" in output and message in output, output
    assert k8s.kubectl("get", "dgm", "bad", check=False).returncode != 0


def test_a_spec_without_required_fields_is_rejected(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    body = sample("bad")
    del body["spec"]["servedModelName"]
    assert "Required value" in apply(k8s, body, check=False)
    # What a runtime requires is a rule on the spec: a dgemma variant needs its worker image.
    body = sample("bad")
    del body["spec"]["image"]
    assert "image is required for runtime dgemma" in apply(k8s, body, check=False)


def test_kubectl_explain_shows_the_descriptions_and_enums(k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD_PATH)
    k8s.kubectl("api-resources")  # refreshes kubectl's discovery cache, as it would after its TTL
    explained = k8s.kubectl("explain", "dgm.spec.gpu").stdout
    assert "GPU profile and overrides." in explained
    assert "enum: rtx-pro-6000, h100, dgx-spark, dgx-station" in explained
    assert "Override of the nvidia.com/gpu.product node label" in explained
