"""GPU profiles: what each named profile means for scheduling, resources, dtype and capacity.

The operator schedules and sizes workers by them (node selection, dtype, pod memory: `worker_memory_gib`,
`vllm_memory_gib`); the operator's autoscaler and the gateway's router both use the tokens/s prior
(`tokens_per_second_prior`, which also knows the vLLM recipe's and an external API's) until a variant's replicas
have measured their own rate."""

from __future__ import annotations

import dataclasses
import math
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
    cpu: str
    compute_capability: tuple[int, int] | None  # of the profile's GPU; None: unknown (custom)
    # The GPU allocates from the node's system memory (GB10's one LPDDR5x pool): the pod's memory request
    # must then hold the weights, KV cache and step buffers too, or the scheduler overpacks the node.
    unified_memory: bool = False
    node_memory_gib: int | None = None  # a unified-memory node's whole memory (what one worker may reserve)


PROFILES: dict[str, GpuProfile] = {
    "h100": GpuProfile("h100", "NVIDIA-H100-80GB-HBM3", "amd64", "fp8", 1100.0, "8", (9, 0)),
    "rtx-pro-6000": GpuProfile(
        "rtx-pro-6000", "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition", "amd64", "bf16", 700.0, "8", (12, 0)
    ),
    # bf16 by default: 52 GB of weights fit the Spark's 128 GB, and nvfp4's MoE kernels (MSLK) are not on
    # PyPI, so nvfp4 needs a worker image built with them (docs/engine.md).
    "dgx-spark": GpuProfile("dgx-spark", "NVIDIA-GB10", "arm64", "bf16", 150.0, "4", (12, 1),
                            unified_memory=True, node_memory_gib=119),  # 128 GB
    # GB300's Blackwell Ultra has its own HBM3e: coherent with the Grace memory over NVLink-C2C, but a
    # separate pool that cudaMalloc draws from, so it is sized like the discrete GPUs.
    "dgx-station": GpuProfile("dgx-station", "NVIDIA-GB300", "arm64", "bf16", 800.0, "16", (10, 3)),
    # A custom profile pins nothing: the spec must say which GPU it wants (see validation).
    "custom": GpuProfile("custom", None, "amd64", "bf16", 500.0, "8", None),
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


# Pod memory (request = limit). The derivation, with the transformers code path it rests on, is in
# docs/operator.md ("Pod memory"); tests/operator/test_memory.py checks these numbers and
# tests/engine/test_loading.py the loading facts they assume.
GIB = 2**30

# Host memory of a worker on a discrete GPU: the process (Python, torch, CUDA context, the 262k-entry
# tokenizer, gRPC; ~6 GiB) plus the weights in flight while loading. Weights go straight to the GPU
# (`device_map`): transformers reads each tensor from the memory-mapped safetensors file into host memory
# and copies it to the GPU, at most 4 at a time (its loader's thread pool; one at a time when quantizing at
# load); the largest is the 1.4 GiB embedding, so <= ~6 GiB in flight. The page cache of the mapped files
# is reclaimable and need not fit. 6 + 6, with headroom:
HOST_MEMORY_GIB = 16

# On unified memory the GPU's allocations come out of the same pool, so the pod also reserves them.
# google/diffusiongemma-26B-A4B-it: ~26e9 parameters, 52 GB in bf16; the embedding (262144 x 2816, tied
# LM head), the vision tower and the routers (~1.3e9) stay bf16 when the rest is quantized at load.
PARAMETERS = 26.0e9
KEPT_BF16_PARAMETERS = 1.3e9
BITS_PER_PARAMETER: dict[str, float] = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "nvfp4": 4.5}  # nvfp4: +1 byte/16
VOCABULARY = 262_144
# Per active request, with the compiled step (on by default with CUDA): its slot's KV cache at the largest
# bucket, LARGEST_BUCKET prefix tokens (5 full-attention layers x 2 KV heads x 512, 25 sliding layers x
# their 1023 kept tokens x 8 KV heads x 256, K and V in bf16: ~1.45 GiB; the dynamic step's at the longest
# context, 40960 tokens, is ~1.0 GiB) and its bf16 self-conditioning (half a canvas x vocabulary tensor),
# for the request's own slot and one idle slot kept for reuse (the worker keeps --max-active of them) ...
LARGEST_BUCKET = 65536  # dgemma_worker.static.BUCKETS[-1]
KV_CACHE_GIB_PER_SLOT = 1.5
SLOTS_PER_REQUEST = 2
# ... and the step's fp32 canvas x vocabulary tensors: two work buffers, and up to 2.5 more while the LM
# head's logits are cast and soft-capped.
STEP_TENSORS_PER_REQUEST = 4.5
# One encoder pass over a 32k-token prompt: attention mask, expert activations, hidden-state copies.
ENCODER_SCRATCH_GIB = 4.0


def weights_gib(dtype: str) -> float:
    """The checkpoint's weights in `dtype`, in GiB (quantized dtypes keep KEPT_BF16_PARAMETERS in bf16)."""
    if dtype in ("fp8", "nvfp4"):
        quantized = (PARAMETERS - KEPT_BF16_PARAMETERS) * BITS_PER_PARAMETER[dtype] / 8
        return (quantized + KEPT_BF16_PARAMETERS * 2) / GIB
    return PARAMETERS * BITS_PER_PARAMETER[dtype] / 8 / GIB


def worker_memory_gib(gpu: GpuProfile, dtype: str, max_active: int, canvas_length: int) -> int:
    """The worker container's memory request and limit, in whole GiB."""
    if not gpu.unified_memory:
        return HOST_MEMORY_GIB
    canvas = canvas_length * VOCABULARY * 4 / GIB  # one fp32 canvas x vocabulary tensor
    per_request = SLOTS_PER_REQUEST * (KV_CACHE_GIB_PER_SLOT + canvas / 2) + STEP_TENSORS_PER_REQUEST * canvas
    return math.ceil(HOST_MEMORY_GIB + weights_gib(dtype) + max_active * per_request + ENCODER_SCRATCH_GIB)


def vllm_memory_gib(gpu: GpuProfile, gpu_memory_utilization: float) -> int:
    """A vLLM server container's memory request and limit, in whole GiB: the host side taken as the worker's
    (HOST_MEMORY_GIB: an estimate, not measured for vLLM) and, on unified memory, the share of the node's memory
    vLLM takes for the GPU (`--gpu-memory-utilization` of it: weights, activations and KV cache)."""
    if not gpu.unified_memory or gpu.node_memory_gib is None:
        return HOST_MEMORY_GIB
    return math.ceil(HOST_MEMORY_GIB + gpu_memory_utilization * gpu.node_memory_gib)
