"""Scorer `predicted-latency`: endpoints predicted to finish sooner score higher (the soonest scores 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.routing.predict import Mode, predict
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """How the worker shares its time among requests (see predict.py)."""

    mode: Mode = "interleaved"


@plugin("scorer", "predicted-latency", Params)
class PredictedLatency:
    """soonest predicted finish / this one's predicted finish."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, ctx: Context, candidates: Sequence[Candidate]) -> list[float]:
        """Relative speed in (0, 1]."""
        totals = []
        for c in candidates:
            p = ctx.predictions.get(c.endpoint_id)
            if p is None:
                p = ctx.predictions[c.endpoint_id] = predict(c, ctx.request, self.params.mode)
            totals.append(max(1e-9, p.total_s))
        best = min(totals)
        return [best / t for t in totals]
