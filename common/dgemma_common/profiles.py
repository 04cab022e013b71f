"""GPU profiles: what each named profile means for scheduling, resources, dtype and capacity.

The operator schedules and sizes workers by them; the operator's autoscaler and the gateway's router both use
the tokens/s prior (`tokens_per_second_prior`, which also knows the vLLM recipe's and an external API's) until a
variant's replicas have measured their own rate."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dgemma_common import vllm

ProfileName = Literal["rtx-pro-6000", "h100", "dgx-spark", "dgx-station", "custom"]
Dtype = Literal["bf16", "fp16", "fp32", "fp8", "nvfp4"]
Architecture = Literal["amd64", "arm64"]

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
# Until measured, an external API is assumed as fast as a good GPU (its own latencies replace this).
EXTERNAL_TOKENS_PER_SECOND_PRIOR = 1000.0


@dataclasses.dataclass(frozen=True)
class GpuProfile:
    """Defaults a profile brings; every field can be overridden in the resource spec."""

    name: ProfileName
    gpu_product: str | None  # the GPU Feature Discovery product label; None: no product pinning
    architecture: Architecture
    dtype: Dtype
    tokens_per_second_prior: float  # per replica, used until measurements exist
    memory: str  # container memory request/limit: host RAM for loading and the tokenizer
    cpu: str


PROFILES: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", "NVIDIA-H100-80GB-HBM3", "amd64", "fp8", 1100.0, "64Gi", "8"),
    "rtx-pro-6000": GpuProfile(
        "rtx-pro-6000", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "amd64", "bf16", 700.0, "96Gi", "8"
    ),
    "dgx-spark": GpuProfile("dgx-spark", "NVIDIA-GB10", "arm64", "nvfp4", 150.0, "32Gi", "4"),
    "dgx-station": GpuProfile("dgx-station", "NVIDIA-GB300", "arm64", "bf16", 800.0, "128Gi", "16"),
    # A custom profile pins nothing: the spec must say which GPU it wants (see validation).
    "custom": GpuProfile("custom", None, "amd64", "bf16", 500.0, "64Gi", "8"),
}


def profile(name: str) -> GpuProfile:
    """The profile of that name; the schema's enum guarantees it exists."""
    return PROFILES[name]


def tokens_per_second_prior(name: str, override: float | None = None, runtime: str = "dgemma") -> float:
    """Expected tokens/s per replica until measured: the resource's own figure, else its runtime's (an external
    API's assumed rate; the vLLM recipe's for that GPU where it publishes one), else its profile's."""
    if override:
        return override
    if runtime == "external":
        return EXTERNAL_TOKENS_PER_SECOND_PRIOR
    if runtime == "vllm":
        recipe = vllm.RECIPE.get(name, vllm.RECIPE["custom"])
        return recipe.tokens_per_second_prior or profile(name).tokens_per_second_prior
    return profile(name).tokens_per_second_prior
