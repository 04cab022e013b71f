"""The gateway's vocabulary: variants, the canonical load of an endpoint, and what routing sees.

Everything here is an immutable value; the decision functions in `routing` read only these.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgemma_common import variants
from dgemma_common.images import VisionSpec
from dgemma_common.variants import RUNTIMES as RUNTIMES  # what serves a variant: one definition, re-exported
from dgemma_common.variants import Runtime as Runtime

DEFAULT_LATENCY_TARGET_MS = float(variants.DEFAULT_LATENCY_TARGET_MS)  # the resource's default


@dataclass(frozen=True)
class Variant:
    """One DiffusionGemma resource: a served model on one GPU profile, with a cost and a default target."""

    name: str
    model: str
    gpu_profile: str = "custom"
    cost_weight: float = 1.0
    latency_target_ms: float = DEFAULT_LATENCY_TARGET_MS
    canvas_length: int = variants.DEFAULT_CANVAS_LENGTH
    max_denoising_steps: int = variants.DEFAULT_MAX_DENOISING_STEPS
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
    encoder_token_latency_s: float = 0.0  # encoder seconds per prompt token; 0 = not measured yet
    vision: VisionSpec | None = None  # the model's image geometry; None: it takes no images
    # The worker's busy wall time per decoder step (the step plus the work between steps); 0 = not reported.
    busy_step_s: float = 0.0


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
    prompt_tokens: int = 0  # the prompt's length, image tokens included; 0: unknown
    allow_overflow: bool = True  # False: the caller (its API key) forbids sending this request out
