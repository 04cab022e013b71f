"""The variant read from a DiffusionGemma resource (dgemma_common.variants): the gateway routes by it, the
operator builds the same resource's children; both must agree on every name, port and default."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from dgemma_common import naming
from dgemma_common.variants import read_variant, variant_name
from dgemma_operator import children, models
from tests.k8s_emulator import EmulatorThread

CRD = "deploy/crds/dgemma.io_diffusiongemmas.yaml"


def resource(name: str = "gemma", namespace: str | None = "ml", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": f"{naming.GROUP}/{naming.VERSION}", "kind": naming.KIND, "metadata": meta,
            "spec": {"servedModelName": "m", "image": "x", "model": {"pvc": {"claimName": "c"}}, **spec}}


def test_a_variant_is_named_namespace_slash_name() -> None:
    assert read_variant(resource("gemma", "team-a")).name == "team-a/gemma" == variant_name("team-a", "gemma")
    assert read_variant(resource("gemma", None)).name == "gemma"


def test_a_field_of_the_wrong_type_is_an_error_naming_it_not_a_default() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"spec\.costWeight"):
        read_variant(resource(costWeight="cheap"))
    with pytest.raises(pydantic.ValidationError, match=r"spec\.generation\.canvasLength"):
        read_variant(resource(generation={"canvasLength": "256"}))  # a string is not a number here
    with pytest.raises(pydantic.ValidationError, match=r"spec\.gpu\.profile"):
        read_variant(resource(gpu={"profile": "a100"}))
    with pytest.raises(pydantic.ValidationError, match="servedModelName"):
        read_variant({"metadata": {"name": "x"}, "spec": {}})


def test_the_operator_and_the_read_agree_on_the_workers_names_port_and_prior() -> None:
    body = resource(gpu={"profile": "dgx-spark"})
    v = read_variant(body)
    spec = models.DiffusionGemmaSpec.model_validate(body["spec"])
    owner = {**body, "metadata": {**body["metadata"], "uid": "u"}}
    service = children.service(owner, spec)
    assert service["metadata"]["name"] == v.worker_service == "gemma-worker"
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == naming.GRPC_PORT_NAME]
    assert grpc["port"] == naming.WORKER_GRPC_PORT
    assert children.endpoint("gemma", "ml", spec) == f"gemma-worker.ml.svc:{naming.WORKER_GRPC_PORT}"
    assert v.tokens_per_second_prior == children.tokens_per_second_prior(spec) == 150.0
    assert read_variant(resource(gpu={"profile": "h100", "tokensPerSecondPrior": 900})).tokens_per_second_prior == 900


def test_a_resource_reads_the_same_before_and_after_the_api_server_fills_in_the_crds_defaults(
    k8s: EmulatorThread,
) -> None:
    """The read's defaults are the CRD's: a minimal resource, as written and as the API server serves it back
    defaulted from the schema the operator's models generate, is one variant."""
    k8s.kubectl("apply", "-f", CRD)
    k8s.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": "ml"}}))
    minimal = resource()
    k8s.kubectl("apply", "-f", "-", input=json.dumps(minimal))
    served = json.loads(k8s.kubectl("get", "-n", "ml", "dgm", "gemma", "-o", "json").stdout)
    assert served["spec"]["gpu"]["profile"] and served["spec"]["generation"]["canvasLength"]  # defaulted
    assert read_variant(served) == read_variant(minimal)
