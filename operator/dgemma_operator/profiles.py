"""GPU profiles: what each named profile means for scheduling, resources, dtype and capacity."""

from __future__ import annotations

import dataclasses
from typing import Literal

ProfileName = Literal["rtx-pro-6000", "h100", "dgx-spark", "dgx-station", "custom"]
Dtype = Literal["bf16", "fp16", "fp32", "fp8", "nvfp4"]
Architecture = Literal["amd64", "arm64"]

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclasses.dataclass(frozen=True)
class GpuProfile:
    """Defaults a profile brings; every field can be overridden in the resource spec."""

    name: ProfileName
    gpu_product: str | None  # the GPU Feature Discovery product label; None: no product pinning
    architecture: Architecture
    dtype: Dtype
    tokens_per_second_prior: float  # per replica, used until measurements exist
    memory: str  # container memory request/limit: host RAM for loading and the tokenizer (see below)
    cpu: str
    compute_capability: tuple[int, int] | None  # of the profile's GPU; None: unknown (custom)


# Host memory a worker needs, derived from how it loads (model.load_model): weights go straight to the GPU
# (`device_map`), tensor by tensor from the memory-mapped safetensors files, so host RAM holds the process
# (Python, torch, the CUDA context, the 262k-entry tokenizer, gRPC: ~6 GiB measured as the CPU worker's RSS
# plus the CUDA context), and at most a couple of tensors in flight: the largest in the 26B checkpoint is the
# embedding, 262144 x 2816 bf16 = 1.4 GiB; staged twice (read, then quantized on the GPU at load) ~3 GiB.
# The page cache of the mapped files is reclaimable and does not need to fit. 6 + 3, with headroom: 16 GiB.
# Before loading went straight to the GPU the whole bf16 checkpoint (~52 GB) passed through host memory.
LOADING_MEMORY = "16Gi"


PROFILES: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", "NVIDIA-H100-80GB-HBM3", "amd64", "fp8", 1100.0, LOADING_MEMORY, "8", (9, 0)),
    "rtx-pro-6000": GpuProfile(
        "rtx-pro-6000", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "amd64", "bf16", 700.0, LOADING_MEMORY, "8",
        (12, 0),
    ),
    "dgx-spark": GpuProfile("dgx-spark", "NVIDIA-GB10", "arm64", "nvfp4", 150.0, LOADING_MEMORY, "4", (12, 1)),
    "dgx-station": GpuProfile("dgx-station", "NVIDIA-GB300", "arm64", "bf16", 800.0, LOADING_MEMORY, "16", (10, 3)),
    # A custom profile pins nothing: the spec must say which GPU it wants (see validation).
    "custom": GpuProfile("custom", None, "amd64", "bf16", 500.0, LOADING_MEMORY, "8", None),
}


def profile(name: str) -> GpuProfile:
    """The profile of that name; the schema's enum guarantees it exists."""
    return PROFILES[name]
