"""Overflow: local endpoints first, an external API only for a request none of them can serve in time.

The profile routes among the local endpoints as if the external ones did not exist. Only when that finds no
endpoint (none ready: scaling from zero; all full) or predicts a missed target does an external endpoint
compete, and it wins only if it is predicted to finish sooner. A request may overflow only if its caller
allows it and so does the local variant that would serve it (or, with none able to, every local variant of
its model): sending prompts out of the cluster is each variant's explicit choice (`allow_overflow`).

A pure function of the pipeline, the request, the candidates, the model's local variants and the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dgemma_gateway.routing.framework import Decision, Pipeline, route
from dgemma_gateway.types import Candidate, RouteRequest, Variant


def may_overflow(request: RouteRequest, local: Decision, variants: Iterable[Variant]) -> bool:
    """Whether this request may leave the cluster, given where it would be served locally."""
    if not request.allow_overflow:
        return False
    if local.endpoint is not None:
        return local.endpoint.variant.allow_overflow
    # No local endpoint could take it: every local variant of the model must allow it (none known: the
    # external variant alone serves the model, which is itself the opt-in).
    return all(v.allow_overflow for v in variants if v.model == request.model and not v.overflow)


def route_with_overflow(
    pipeline: Pipeline, request: RouteRequest, candidates: Sequence[Candidate], now: float,
    variants: Iterable[Variant] = (),
) -> Decision:
    """The local decision, unless an external endpoint is allowed and predicted to serve the request sooner."""
    local = route(pipeline, request, [c for c in candidates if not c.variant.overflow], now)
    external = [c for c in candidates if c.variant.overflow]
    if not external or local.expect_met is True or not may_overflow(request, local, variants):
        return local
    spill = route(pipeline, request, external, now)
    if spill.endpoint is None:
        return local
    if local.endpoint is None:
        return spill
    if local.expect_met is False and spill.prediction is not None and local.prediction is not None \
            and spill.prediction.total_s < local.prediction.total_s:
        return spill
    return local
