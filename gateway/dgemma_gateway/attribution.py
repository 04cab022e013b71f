"""Demand attribution: which variant a request's demand belongs to, for the autoscaler.

Counting demand only where requests were *routed* scales the wrong variant: when the cheap variant is
full, the router sends the overflow to a pricier one, that one's demand rises and the autoscaler adds
capacity there, where it is not cheapest. So each request is also attributed to its *preferred*
variant: the one the gateway's own routing would choose if every variant had an idle replica (the
`latency-target` profile: the cheapest variant predicted to meet the request's target, else the
fastest), predicted with the step latencies its replicas measured, or its GPU profile's prior when it
has none (a variant scaled to zero is still a candidate), and with what the gateway learned of the model's
steps per canvas and reply lengths. A request counts the canvases its reply is expected to run on the variant
it is attributed to (at most all that max_tokens allows there), the unit capacity is measured in.

A variant is asked to carry what it is preferred for plus the overflow it takes in (routed to it,
preferred elsewhere): the cheap variant grows to take its share, and the variant carrying the overflow
keeps the capacity for it until the cheap one has caught up (or for good, when the cheap one is at
its maximum). The overflow is therefore counted twice while it lasts, which errs towards meeting
targets. Requests overflowed to an external API are attributed the same way, to a local variant.

Pure functions of request shapes, variants and candidates.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from dgemma_gateway.routing import Pipeline, load_profile_file, route
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant


@dataclass(frozen=True)
class Shape:
    """What attribution needs of a request: the routing request without its counter."""

    model: str
    max_tokens: int
    max_denoising_steps: int | None
    latency_target_ms: float | None

    @classmethod
    def of(cls, request: RouteRequest) -> Shape:
        """The shape of a routing request."""
        return cls(request.model, request.max_tokens, request.max_denoising_steps, request.latency_target_ms)


@dataclass(frozen=True)
class Preference:
    """Where a request shape should be served: its variant and the canvases it is expected to run there."""

    variant: str
    canvases: float


@dataclass
class Attributed:
    """Per variant, rates of requests, max_tokens and canvases."""

    requests: float = 0.0
    tokens: float = 0.0
    canvases: float = 0.0

    def add(self, requests: float, tokens: float, canvases: float) -> None:
        self.requests += requests
        self.tokens += tokens
        self.canvases += canvases


@cache
def default_pipeline() -> Pipeline:
    """The shipped `latency-target` profile: attribution asks what it would choose, whatever routes live."""
    return load_profile_file("latency-target")


def idle_candidates(variants: Sequence[Variant], candidates: Sequence[Candidate], now: float) -> list[Candidate]:
    """One idle replica per variant as the router would see it.

    Its step and encoder latencies are the median of what the variant's ready replicas report; with none
    measured, the load carries no latency and routing falls back to the variant's tokens/s prior. What the
    gateway learned per variant (step shares, reply lengths) is the variant's own, else another variant's of
    the same model (a variant scaled to zero has no candidate to carry it).
    """
    out = []
    for variant in variants:
        mine = [c for c in candidates if c.variant.name == variant.name]
        measured = [c for c in mine if c.load is not None and c.load.ready and not c.load.draining
                    and c.load.step_latency_s > 0]
        same_model = [c.step_fraction for c in candidates if c.variant.model == variant.model]
        fraction = (statistics.median(c.step_fraction for c in mine) if mine
                    else statistics.median(same_model) if same_model else 1.0)
        step_s = statistics.median(c.load.step_latency_s for c in measured if c.load) if measured else 0.0
        encoder_s = statistics.median(c.load.encoder_latency_s for c in measured if c.load) if measured else 0.0
        capacity = max((c.load.capacity for c in measured if c.load), default=1)
        learned = next(iter(mine), None) or next((c for c in candidates if c.variant.model == variant.model), None)
        load = EndpointLoad(
            queue_depth=0, active=0, capacity=capacity, max_queue=0, step_latency_s=step_s,
            encoder_latency_s=encoder_s, tokens_per_s=0.0, canvas_length=variant.canvas_length,
            model_name=variant.model, ready=True, draining=False, observed_at=now)
        out.append(Candidate(f"{variant.name}/idle", variant, load, step_fraction=fraction,
                             step_shares=learned.step_shares if learned else (),
                             reply_survival=learned.reply_survival if learned else ()))
    return out


def preferred(
    shape: Shape, idle: Sequence[Candidate], now: float, pipeline: Pipeline | None = None
) -> Preference | None:
    """The variant routing would pick for this shape among idle replicas (None: no variant serves it)."""
    request = RouteRequest(shape.model, shape.max_tokens, shape.max_denoising_steps, shape.latency_target_ms,
                           strict=False)
    decision = route(pipeline or default_pipeline(), request, idle, now)
    if decision.endpoint is None or decision.prediction is None:
        return None
    return Preference(decision.endpoint.variant.name, decision.prediction.expected_canvases)


def attribute(
    routed: Iterable[tuple[str, Shape | None, int, float]],
    variants: Sequence[Variant],
    candidates: Sequence[Candidate],
    now: float,
    window_s: float,
    pipeline: Pipeline | None = None,
) -> tuple[dict[str, Attributed], dict[str, Attributed]]:
    """Rates per variant from routed requests `(variant routed to, shape, max_tokens, canvases expected there)`.

    Returns (preferred, overflow_in): what each variant is preferred for, and what it took in that was
    preferred elsewhere. A request without a shape (its caller did not say its target) stays where it
    was routed.
    """
    # Only local variants can be preferred: a request sent to an external API counts as demand for the local
    # variant it would have gone to, so that the fleet grows and the overflow shrinks.
    idle = idle_candidates([v for v in variants if not v.overflow], candidates, now)
    cache_: dict[Shape, Preference | None] = {}
    pref: dict[str, Attributed] = {v.name: Attributed() for v in variants}
    overflow: dict[str, Attributed] = {v.name: Attributed() for v in variants}
    rate = 1.0 / window_s
    for variant, shape, tokens, canvases in routed:
        choice: Preference | None = None
        if shape is not None:
            if shape not in cache_:
                cache_[shape] = preferred(shape, idle, now, pipeline)
            choice = cache_[shape]
        if choice is None or choice.variant not in pref:
            choice = Preference(variant, canvases)
        pref[choice.variant].add(rate, tokens * rate, choice.canvases * rate)
        if choice.variant != variant and variant in overflow:
            overflow[variant].add(rate, tokens * rate, canvases * rate)
    return pref, overflow


def demand_fields(preferred_: Mapping[str, Attributed], overflow: Mapping[str, Attributed], name: str
                  ) -> dict[str, float]:
    """The attributed demand of one variant, as the snapshot reports it: preferred plus overflow taken in."""
    p, o = preferred_.get(name, Attributed()), overflow.get(name, Attributed())
    return {
        "requests_per_s": p.requests + o.requests,
        "tokens_per_s": p.tokens + o.tokens,
        "canvases_per_s": p.canvases + o.canvases,
        "preferred_requests_per_s": p.requests,
        "preferred_tokens_per_s": p.tokens,
        "preferred_canvases_per_s": p.canvases,
        "overflow_in_canvases_per_s": o.canvases,
    }
