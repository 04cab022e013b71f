"""The CustomResourceDefinition, generated from the typed models (`python -m dgemma_operator.crd`)."""

from __future__ import annotations

import sys
from typing import Any

import yaml
from pydantic import BaseModel

from dgemma_operator import models

CRD_PATH = "deploy/crds/dgemma.io_diffusiongemmas.yaml"

_DROPPED_KEYS = {"title"}
_EXCLUSIVE_BOUNDS = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn pydantic's JSON schema into a Kubernetes structural schema: no $ref, no anyOf-null, no titles."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:  # Optional[X] -> X; absence is how the API says "not set"
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        merged = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        return _structural(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "additionalProperties" and value is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "items" and value == {}:
            out[key] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        elif key in _EXCLUSIVE_BOUNDS and not isinstance(value, bool):
            # JSON Schema's numeric form (pydantic gt/lt); apiextensions/v1 (OpenAPI 3.0) wants the bound
            # in minimum/maximum and exclusiveMinimum/exclusiveMaximum as a boolean, or rejects the CRD.
            out[_EXCLUSIVE_BOUNDS[key]] = value
            out[key] = True
        else:
            out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The openAPIV3Schema of one model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return dict(_structural(raw, defs))


def printer_columns() -> list[dict[str, Any]]:
    """Columns `kubectl get dgm` shows."""
    return [
        {"name": "Model", "type": "string", "jsonPath": ".spec.servedModelName"},
        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
        {"name": "Profile", "type": "string", "jsonPath": ".spec.gpu.profile"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.measured.tokensPerSecond"},
        {"name": "P95-ms", "type": "number", "jsonPath": ".status.measured.latencyP95Ms"},
        # Shown by default: "why is it not ready" is the first question (AllReplicasReady, NoReplicasReady, ...).
        {"name": "Status", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def custom_resource_definition() -> dict[str, Any]:
    """The DiffusionGemma CRD as a dict."""
    schema = openapi_schema(models.DiffusionGemma)
    schema["description"] = ("A DiffusionGemma variant: a model on one GPU profile, served by dgemma workers or "
                             "vLLM, or an external API that takes overflow.")
    schema["properties"] = {
        "apiVersion": {"type": "string", "description": "API version of this object."},
        "kind": {"type": "string", "description": "Kind of this object."},
        "metadata": {"type": "object"},
        **schema["properties"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": models.CATEGORIES,
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": printer_columns(),
                }
            ],
        },
    }


def render_yaml() -> str:
    """The CRD file's exact text."""
    header = (
        "# Generated by `python -m dgemma_operator.crd` from operator/dgemma_operator/models.py.\n"
        "# Do not edit; a test fails when this file and the models differ.\n"
    )
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
