"""The gateway's vocabulary: variants, the canonical load of an endpoint, and what routing sees.

Everything here is an immutable value; the decision functions in `routing` read only these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_LATENCY_TARGET_MS = 2000.0

# What serves a variant: dgemma workers (gRPC), vLLM's OpenAI server (HTTP), or an external OpenAI-compatible
# API that only takes overflow (HTTP). The runtime decides the endpoint kind and which settings it honours.
Runtime = Literal["dgemma", "vllm", "external"]
RUNTIMES: tuple[Runtime, ...] = ("dgemma", "vllm", "external")


@dataclass(frozen=True)
class Variant:
    """One DiffusionGemma resource: a served model on one GPU profile, with a cost and a default target."""

    name: str
    model: str
    gpu_profile: str = "custom"
    cost_weight: float = 1.0
    latency_target_ms: float = DEFAULT_LATENCY_TARGET_MS
    canvas_length: int = 256
    max_denoising_steps: int = 48
    tokens_per_s_prior: float = 500.0
    scale_from_zero: bool = False  # may have no replica: the gateway holds its requests while one starts
    runtime: Runtime = "dgemma"
    # A local variant whose requests may overflow to an external variant when it cannot meet their target.
    # Off by default: sending prompts out of the cluster is an explicit choice.
    allow_overflow: bool = False

    @property
    def overflow(self) -> bool:
        """An external API: used only for requests no local endpoint can serve in time."""
        return self.runtime == "external"


@dataclass(frozen=True)
class EndpointLoad:
    """Canonical load of one worker, whatever reported it (the extractor maps reports to this)."""

    queue_depth: int
    active: int
    capacity: int
    max_queue: int
    step_latency_s: float  # one decoder step of one request; 0 = not measured yet
    encoder_latency_s: float
    tokens_per_s: float
    canvas_length: int
    model_name: str
    ready: bool
    draining: bool
    observed_at: float  # gateway monotonic clock when the report arrived


@dataclass(frozen=True)
class Candidate:
    """An endpoint as the router sees it at one moment."""

    endpoint_id: str
    variant: Variant
    load: EndpointLoad | None
    inflight: int = 0  # requests this gateway has in flight there (exact, unlike the lagging report)
    ejected: bool = False
    step_fraction: float = 1.0  # measured share of the variant's max_denoising_steps a canvas takes
    # Measured share of the cap a canvas takes, per step cap requests ran with: (cap, share), sorted by cap.
    step_shares: tuple[tuple[int, float], ...] = ()
    # Measured decoder steps per canvas of the traffic this variant served, whatever caps it asked for.
    steps_per_canvas: float | None = None
    # P(a reply needs at least k canvases), k = 1, 2, ..., from the variant's finished replies (Kaplan-Meier).
    reply_survival: tuple[float, ...] = ()

    @property
    def in_system(self) -> int:
        """Requests queued or active there: the larger of the report and this gateway's own count."""
        reported = 0 if self.load is None else self.load.active + self.load.queue_depth
        return max(reported, self.inflight)


@dataclass(frozen=True)
class RouteRequest:
    """What routing needs to know about one request."""

    model: str
    max_tokens: int
    max_denoising_steps: int | None = None  # None: the variant's default
    latency_target_ms: float | None = None  # None: the variant's default
    strict: bool | None = None  # None: the profile decides
    seq: int = 0  # a request counter, so round-robin and tie-breaks stay pure functions
    allow_overflow: bool = True  # False: the caller (its API key) forbids sending this request out
