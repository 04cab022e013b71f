"""The vLLM contract dgemma relies on, pinned to one vLLM release: what the operator runs, what the gateway
probes and scrapes, and which generation settings vLLM takes per request.

Pinned to vLLM 0.24.0, the first release with `vllm/model_executor/models/diffusion_gemma.py` and the minimum
the vLLM recipe for DiffusionGemma 26B-A4B names (recipes repository, models/Google/diffusiongemma-26B-A4B-it.yaml).
Read from the 0.24.0 source distribution (sha256 0862453adc1f3339f1a0c9dca1179c34d6ed6e118f87b6e5bddd120af614ac66):
- metric names: `vllm/v1/metrics/loggers.py` (`PrometheusStatLogger`) and `vllm/v1/spec_decode/metrics.py`,
  labels `model_name`, `engine`;
- `GET /health`: 200, or 503 once the engine is dead (`vllm/entrypoints/serve/instrumentator/health.py`);
  `/metrics` is prometheus_client's exposition of the same registry (`.../instrumentator/metrics.py`);
- diffusion settings are per server, not per request: `--diffusion-config` takes `canvas_length` and
  `max_denoising_steps` (`vllm/config/diffusion.py`); t_min, t_max, entropy_bound, stability_threshold and
  confidence_threshold come from the checkpoint's generation_config.json (`DiffusionGemmaModelState`), and the
  sampler draws from one engine-wide RNG, so a per-request `seed` cannot be honoured;
- `--shutdown-timeout N` drains in-flight requests for up to N seconds on SIGTERM (`vllm/entrypoints/launcher.py`).
A change of version is a change of this module and of the fixture `tests/fixtures/vllm-0.24.0-metrics-*.txt`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

VERSION = "0.24.0"
IMAGE = f"vllm/vllm-openai:v{VERSION}"
PORT = 8000
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
API_PREFIX = "/v1"

# Scheduler gauges (one series per engine; summed across data-parallel engines).
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# Counters (exposed with the `_total` suffix). A diffusion model reuses the speculative-decoding counters under
# diffusion names (`vllm/v1/spec_decode/metrics.py`, `SpecDecodingProm` with is_diffusion): one denoising step
# is one decoder pass of one request over its canvas.
GENERATION_TOKENS = "vllm:generation_tokens"
DENOISING_STEPS = "vllm:diffusion_num_denoising_steps"
# Per-request histograms, observed when a request finishes: tokens it generated, and its time in the RUNNING
# phase (scheduled to last token: prompt encoding plus every canvas; `stats.py` computes it as
# last_token_ts - scheduled_ts, i.e. prefill + decode time).
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
INFERENCE_TIME = "vllm:request_inference_time_seconds"

# dgemma generation settings a vLLM server takes per request, by the OpenAI field it takes them in.
PER_REQUEST = {"max_new_tokens": "max_tokens", "stop": "stop", "ignore_eos": "ignore_eos"}
# Settings that only shape how the gateway streams (drafts): a vLLM stream has none, so they are moot.
STREAM_ONLY = frozenset({"stream_drafts", "draft_interval_s"})
# Why each other setting is refused for a vLLM upstream (the 400 says it).
SERVER_LEVEL = {
    "max_denoising_steps": "set per server with --diffusion-config (the resource's generation.maxDenoisingSteps)",
    "t_min": "read from the checkpoint's generation_config.json",
    "t_max": "read from the checkpoint's generation_config.json",
    "entropy_bound": "read from the checkpoint's generation_config.json",
    "stability_threshold": "read from the checkpoint's generation_config.json",
    "confidence_threshold": "read from the checkpoint's generation_config.json",
    "seed": "its DiffusionGemma sampler draws from one engine-wide random generator",
}



@dataclass(frozen=True)
class RecipeSettings:
    """What vLLM's DiffusionGemma recipe sets for one GPU (vllm-project/recipes,
    models/Google/diffusiongemma-26B-A4B-it.yaml)."""

    dtype: str  # a GPU profile dtype: bf16 runs the checkpoint as is; nvfp4 needs an NVFP4 checkpoint
    max_num_seqs: int
    gpu_memory_utilization: float
    extra_args: tuple[str, ...] = ()
    tokens_per_second_prior: float | None = None  # per-request generation tokens/s at concurrency 1, if published


# One 80 GB H100/H200 runs the bf16 checkpoint with `--max-num-seqs 4` (required: the diffusion state buffers
# grow with sequences x canvas x vocabulary) at 0.85 of GPU memory, and measured 1282 tokens/s per request at
# concurrency 1 (SPEED-Bench); DGX Spark (GB10) runs nvidia/diffusiongemma-26B-A4B-it-NVFP4 with 8 sequences at
# 0.8 and Triton attention. Other GPUs: the 80 GB settings.
_DEFAULT = RecipeSettings("bf16", 4, 0.85)
RECIPE: dict[str, RecipeSettings] = {
    "h100": replace(_DEFAULT, tokens_per_second_prior=1282.0),
    "rtx-pro-6000": _DEFAULT,
    "dgx-spark": RecipeSettings("nvfp4", 8, 0.8, ("--attention-backend", "TRITON_ATTN")),
    "dgx-station": _DEFAULT,
    "custom": _DEFAULT,
}
DEFAULT_MAX_NUM_SEQS = _DEFAULT.max_num_seqs
