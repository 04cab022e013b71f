"""Generate docs/reference.md, the DiffusionGemma reference, from the CRD schema (so it cannot drift).

Every field of spec and status, with its type, default, bounds and description, comes from
deploy/crds/dgemma.io_diffusiongemmas.yaml; the GPU profile table comes from dgemma_common.profiles.
Usage: python hack/gen_crd_reference.py [--check]
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import yaml
from _files import ROOT, write_or_check

from dgemma_common.vllm import VERSION as VLLM_VERSION

CRD = ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"
OUTPUT = ROOT / "docs" / "reference.md"


def _type(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '≥'} {low}")
    if high is not None:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '≤'} {high}")
    if "minLength" in node or "maxLength" in node:
        parts.append(f"length {node.get('minLength', 0)}..{node.get('maxLength', '')}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(f"rule: {rule['message']}")
    return "; ".join(parts)


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node["default"] == {}:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(node: dict[str, Any], path: str, required: set[str]) -> list[str]:
    rows = []
    for name, sub in node.get("properties", {}).items():
        field = f"{path}.{name}" if path else name
        mark = " (required)" if name in required else ""
        rows.append(
            f"| `{field}`{mark} | {_cell(_type(sub))} | {_default(sub)} | {_cell(_constraints(sub))} "
            f"| {_cell(sub.get('description', ''))} |"
        )
        if sub.get("type", "object") == "object" and "properties" in sub:
            rows.extend(_rows(sub, field, set(sub.get("required", []))))
        items = sub.get("items", {})
        if sub.get("type") == "array" and "properties" in items:
            rows.extend(_rows(items, f"{field}[]", set(items.get("required", []))))
    return rows


def _table(node: dict[str, Any], path: str) -> str:
    header = "| field | type | default | constraints | description |\n|---|---|---|---|---|\n"
    return header + "\n".join(_rows(node, path, set(node.get("required", [])))) + "\n"


def _profiles() -> str:
    from dgemma_common.profiles import PROFILES, worker_memory_gib
    from dgemma_operator.models import GenerationDefaults, WorkerSpec

    lines = [
        "| profile | `nvidia.com/gpu.product` | arch | default dtype | tokens/s prior | memory | cpu |",
        "|---|---|---|---|---|---|---|",
    ]
    active, canvas = WorkerSpec().max_active, GenerationDefaults().canvas_length
    for p in PROFILES.values():
        product = f"`{p.gpu_product}`" if p.gpu_product else "(set `gpu.product` or `gpu.nodeSelector`)"
        memory = f"{worker_memory_gib(p, p.dtype, active, canvas)}Gi"
        if p.unified_memory:
            memory += f" (unified memory: with the weights; at maxActive {active}, canvas {canvas})"
        lines.append(
            f"| `{p.name}` | {product} | {p.architecture} | {p.dtype} | {p.tokens_per_second_prior:g} "
            f"| {memory} | {p.cpu} |"
        )
    return "\n".join(lines) + "\n"


def _vllm_defaults() -> str:
    from dgemma_common.profiles import PROFILES, vllm_memory_gib
    from dgemma_common.vllm import RECIPE

    lines = [
        "| profile | dtype | `--max-num-seqs` | `--gpu-memory-utilization` | more arguments | tokens/s prior "
        "| memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in RECIPE.items():
        extra = " ".join(f"`{a}`" for a in d.extra_args) or ""
        prior = f"{d.tokens_per_second_prior:g}" if d.tokens_per_second_prior else "the profile's"
        memory = f"{vllm_memory_gib(PROFILES[name], d.gpu_memory_utilization)}Gi"
        if PROFILES[name].unified_memory:
            memory += " (unified memory: with vLLM's share of the node)"
        lines.append(f"| `{name}` | {d.dtype} | {d.max_num_seqs} | {d.gpu_memory_utilization:g} | {extra} | {prior} "
                     f"| {memory} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The reference page's exact text."""
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]
    (version,) = spec["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    names = spec["names"]
    columns = "\n".join(
        f"| {c['name']} | `{c['jsonPath']}` |" + (" wide only |" if c.get("priority") else " |")
        for c in version.get("additionalPrinterColumns", [])
    )
    scale = version["subresources"]["scale"]
    return f"""<!-- Generated by hack/gen_crd_reference.py from deploy/crds/{CRD.name}; do not edit. -->
# DiffusionGemma reference

`{spec["group"]}/{version["name"]}`, kind `{names["kind"]}` (plural `{names["plural"]}`, short name
`{", ".join(names.get("shortNames", []))}`, categories
`{", ".join(names.get("categories", []))}`), namespaced.
{schema.get("description", "")}

One resource is one *variant*: a model on one GPU profile with one set of serving settings and a cost.
The operator turns it into a worker Deployment, a headless Service (`<name>-worker`) and a
PodDisruptionBudget: `dgemma worker` pods (gRPC 50051, metrics 9090) for `runtime: dgemma`, `vllm serve`
pods (HTTP 8000: the OpenAI API, `/health`, `/metrics`) for `runtime: vllm`, and nothing for
`runtime: external`, an OpenAI-compatible API outside the cluster that takes only overflow (see
docs/runtimes.md). Several variants may serve the same `servedModelName`; the gateway routes among them.

Subresources: `status`, and `scale` (`{scale["specReplicasPath"]}` / `{scale["statusReplicasPath"]}`, selector
`{scale["labelSelectorPath"]}`), so `kubectl scale dgm/NAME --replicas=N`, HPA and KEDA work.

Examples for each GPU profile: [deploy/examples](../deploy/examples).

## GPU profiles

A profile gives node selection (GPU Feature Discovery's `nvidia.com/gpu.product` label and
`kubernetes.io/arch`), the `nvidia.com/gpu` toleration, resources, the default dtype and a tokens/s prior used
until measurements exist. Every value can be overridden under `spec.gpu`.

{_profiles()}
With `runtime: vllm`, the defaults are those of vLLM's DiffusionGemma recipe (vllm-project/recipes,
`models/Google/diffusiongemma-26B-A4B-it.yaml`, for vLLM {VLLM_VERSION}); `spec.gpu.dtype` and `spec.vllm`
override them.
`fp8` is vLLM's online FP8 of a bf16 checkpoint (`--quantization fp8`); `nvfp4` needs an NVFP4 checkpoint as the
model (such as `nvidia/diffusiongemma-26B-A4B-it-NVFP4`), whose own quantization config vLLM reads.

{_vllm_defaults()}
## spec

{_table(schema["properties"]["spec"], "spec")}
## status

Written by the operator (and `measured`/`autoscaling` by the autoscaler) through the status subresource.

{_table(schema["properties"]["status"], "status")}
## kubectl get dgm

| column | from |
|---|---|
{columns}
"""


def outputs() -> dict[pathlib.Path, str]:
    """The reference page."""
    return {OUTPUT: render()}


if __name__ == "__main__":
    sys.exit(write_or_check(outputs()))
