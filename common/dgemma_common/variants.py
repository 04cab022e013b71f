"""One DiffusionGemma resource as the processes around the operator read it: a *variant*, named
`namespace/name`, serving a model on one GPU profile with a cost, a default latency target and a canvas.

The operator's pydantic models (`dgemma_operator.models`) are the source of the CRD and validate the whole spec;
this is the small, torch-free and kopf-free read of the fields the gateway routes by, typed (a field of the
wrong type is an error, not a silent default), with the defaults the CRD itself declares (the operator's models
take them from here). The gateway builds its routing variants from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from dgemma_common import naming
from dgemma_common.profiles import ProfileName, tokens_per_second_prior

# What serves a variant: dgemma workers (gRPC), vLLM's OpenAI server (HTTP), or an external OpenAI-compatible
# API that only takes overflow (HTTP). The runtime decides the endpoint kind and which settings it honours.
Runtime = Literal["dgemma", "vllm", "external"]
RUNTIMES: tuple[Runtime, ...] = ("dgemma", "vllm", "external")

# Defaults of the CRD (the API server fills them in; a resource read from elsewhere may lack them).
DEFAULT_RUNTIME: Runtime = "dgemma"
DEFAULT_ALLOW_OVERFLOW = False
DEFAULT_GPU_PROFILE: ProfileName = "h100"
DEFAULT_COST_WEIGHT = 1.0
DEFAULT_LATENCY_TARGET_MS = 2000
DEFAULT_CANVAS_LENGTH = 256
DEFAULT_MAX_DENOISING_STEPS = 48
DEFAULT_REPLICAS = 1
DEFAULT_MIN_REPLICAS = 1


def variant_name(namespace: str | None, name: str) -> str:
    """`namespace/name` of a DiffusionGemma resource, as kubectl writes it (just `name` outside a namespace).

    The gateway routes by it, the autoscaler reads a variant's demand by it, and every component's metrics
    carry it as their `variant` label, so one dashboard filter selects them all; two teams' `gemma` in two
    namespaces stay apart."""
    return f"{namespace}/{name}" if namespace else name


class _Read(BaseModel):
    # Strict: a number where a string belongs (or "2" where a number does) is an error. Unknown fields are
    # the operator's business.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True,
                              strict=True)


class _Metadata(_Read):
    name: str = Field(min_length=1)
    namespace: str | None = None


class _Gpu(_Read):
    profile: ProfileName = DEFAULT_GPU_PROFILE
    tokens_per_second_prior: float | None = None


class _Generation(_Read):
    canvas_length: int = DEFAULT_CANVAS_LENGTH
    max_denoising_steps: int = DEFAULT_MAX_DENOISING_STEPS


class _Autoscaling(_Read):
    enabled: bool = False


class _Spec(_Read):
    served_model_name: str = Field(min_length=1)
    runtime: Runtime = DEFAULT_RUNTIME
    allow_overflow: bool = DEFAULT_ALLOW_OVERFLOW
    gpu: _Gpu = _Gpu()
    cost_weight: float = DEFAULT_COST_WEIGHT
    latency_target_ms: float = DEFAULT_LATENCY_TARGET_MS
    generation: _Generation = _Generation()
    replicas: int = DEFAULT_REPLICAS
    min_replicas: int = DEFAULT_MIN_REPLICAS
    autoscaling: _Autoscaling = _Autoscaling()


class _Resource(_Read):
    metadata: _Metadata
    spec: _Spec


@dataclass(frozen=True)
class VariantSpec:
    """What a DiffusionGemma resource says about its variant."""

    namespace: str | None
    resource_name: str
    served_model_name: str
    gpu_profile: ProfileName
    cost_weight: float
    latency_target_ms: float
    canvas_length: int
    max_denoising_steps: int
    tokens_per_second_prior: float  # the resource's own, else its runtime's or GPU profile's
    scale_from_zero: bool  # it may have no replica: the gateway holds requests while one starts
    runtime: Runtime = "dgemma"
    allow_overflow: bool = False  # its requests may overflow to an external variant

    @property
    def name(self) -> str:
        """The variant's name: `namespace/name`."""
        return variant_name(self.namespace, self.resource_name)

    @property
    def worker_service(self) -> str:
        """The Service whose EndpointSlices list the variant's worker pods."""
        return naming.worker_service(self.resource_name)


def read_variant(obj: Mapping[str, Any]) -> VariantSpec:
    """The variant of a DiffusionGemma resource (its JSON, as the API serves it); pydantic's ValidationError
    (a ValueError) names each field that is missing or of the wrong type."""
    r = _Resource.model_validate(obj)
    spec = r.spec
    # Zero replicas is a normal state when the autoscaler may go there, or when minReplicas allows it.
    from_zero = spec.min_replicas == 0 and (spec.autoscaling.enabled or spec.replicas == 0)
    return VariantSpec(
        namespace=r.metadata.namespace or None,
        resource_name=r.metadata.name,
        served_model_name=spec.served_model_name,
        gpu_profile=spec.gpu.profile,
        cost_weight=spec.cost_weight,
        latency_target_ms=spec.latency_target_ms,
        canvas_length=spec.generation.canvas_length,
        max_denoising_steps=spec.generation.max_denoising_steps,
        tokens_per_second_prior=tokens_per_second_prior(spec.gpu.profile, spec.gpu.tokens_per_second_prior,
                                                        spec.runtime),
        scale_from_zero=from_zero,
        runtime=spec.runtime,
        allow_overflow=spec.allow_overflow,
    )
