"""The example DiffusionGemmas (one per GPU profile, and the chart's) are valid for the CRD and operator."""

from __future__ import annotations

import json
import pathlib

import pytest

from dgemma_operator import children, models
from tests.deploy.helpers import ROOT, find, load_yaml_documents, render
from tests.k8s_emulator import EmulatorThread

EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
PROFILES = {"rtx-pro-6000", "h100", "dgx-spark", "dgx-station"}


def example_resources() -> list[dict]:
    docs = [d for path in EXAMPLES if path.name != "kustomization.yaml" for d in load_yaml_documents(path)]
    return docs + find(render({"examples": {"enabled": True}}, upgrade=True), "DiffusionGemma")


def test_there_is_an_example_for_every_gpu_profile_and_runtime() -> None:
    docs = [d for path in EXAMPLES if path.name != "kustomization.yaml" for d in load_yaml_documents(path)]
    assert {d["spec"]["gpu"]["profile"] for d in docs if "gpu" in d["spec"]} == PROFILES
    assert {d["spec"].get("runtime", "dgemma") for d in docs} == {"dgemma", "vllm", "external"}


@pytest.mark.parametrize("resource", example_resources(), ids=lambda r: r["metadata"]["name"])
def test_an_example_is_a_valid_spec_for_the_operator(resource: dict) -> None:
    spec = models.DiffusionGemmaSpec.model_validate(resource["spec"])
    assert children.semantic_problems(resource["metadata"]["name"], spec) == []


def test_the_api_server_accepts_every_example_under_the_crd_schema(
    k8s: EmulatorThread, tmp_path: pathlib.Path
) -> None:
    k8s.kubectl("apply", "-f", str(ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"))
    for resource in example_resources():
        resource = {**resource, "metadata": {**resource["metadata"], "namespace": "default"}}
        k8s.kubectl("apply", "-f", "-", input=json.dumps(resource))
        stored = json.loads(k8s.kubectl("get", "dgm", resource["metadata"]["name"], "-o", "json").stdout)
        assert stored["spec"]["gpu"]["profile"] in PROFILES
    # The schema really is enforced: a spec the CRD forbids is refused.
    broken = {**example_resources()[0], "metadata": {"name": "broken", "namespace": "default"}}
    broken["spec"] = {**broken["spec"], "minReplicas": 5, "maxReplicas": 2}
    refused = k8s.kubectl("apply", "-f", "-", input=json.dumps(broken), check=False)
    assert refused.returncode != 0 and "minReplicas" in refused.stderr
