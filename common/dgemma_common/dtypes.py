"""Weight formats and the GPUs that can run them (torch-free: the operator checks profiles with it, the
worker checks its own device).

fp8 runs on NVIDIA compute capability 8.9+ (Ada, Hopper, Blackwell); NVFP4 needs Blackwell's block-scaled
FP4 tensor cores, capability 10.0+. bf16/fp16/fp32 run anywhere the model fits.
"""

from __future__ import annotations

QUANTIZED = ("fp8", "nvfp4")
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp8": (8, 9), "nvfp4": (10, 0)}


def dtype_problem(dtype: str, capability: tuple[int, int] | None, where: str) -> str | None:
    """Why `where` (a profile or a device, with its CUDA capability or None) cannot run `dtype`; None if it can."""
    need = MIN_CAPABILITY.get(dtype)
    if need is None:
        return None
    wanted = f"dtype {dtype} needs an NVIDIA GPU of compute capability {need[0]}.{need[1]} or newer"
    if capability is None:
        return f"{wanted}; {where} has no CUDA GPU"
    if capability < need:
        return f"{wanted}; {where} has {capability[0]}.{capability[1]}"
    return None
