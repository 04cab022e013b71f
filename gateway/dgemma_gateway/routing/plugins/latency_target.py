"""Filter `latency-target`: endpoints predicted to finish the request within its latency target.

If none can: the endpoint(s) predicted to finish first (the request is recorded as an expected miss),
or nothing in strict mode (a 429 whose Retry-After says when the fastest one could take it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.routing.predict import Mode, predict, target_s
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """slack: predicted finish must be within slack x target; strict: refuse instead of missing;
    mode and ahead_share: how the prediction models the worker (see predict.py)."""

    slack: float = 1.0
    strict: bool = False
    mode: Mode = "interleaved"
    ahead_share: float = 1.0


@plugin("filter", "latency-target", Params)
class LatencyTarget:
    """Keeps the endpoints that meet the target; falls back to the fastest unless strict."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, ctx: Context, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Endpoints predicted to meet the target (or the fastest)."""
        if not candidates:
            return []
        preds = {c.endpoint_id: predict(c, ctx.request, self.params.mode, self.params.ahead_share)
                 for c in candidates}
        ctx.predictions.update(preds)
        meeting = [
            c for c in candidates
            if preds[c.endpoint_id].total_s <= self.params.slack * target_s(ctx.request, c.variant)
        ]
        if meeting:
            ctx.expect_met = True
            return meeting
        ctx.expect_met = False
        best = min(preds[c.endpoint_id].total_s for c in candidates)
        strict = self.params.strict if ctx.request.strict is None else ctx.request.strict
        if strict:
            fastest = min(candidates, key=lambda c: preds[c.endpoint_id].total_s)
            target = target_s(ctx.request, fastest.variant)
            ctx.reason = (
                f"no endpoint can meet the latency target of {target * 1000:.0f} ms "
                f"(fastest predicted: {best * 1000:.0f} ms)"
            )
            ctx.retry_after_s = max(1.0, best - target)
            return []
        return [c for c in candidates if preds[c.endpoint_id].total_s <= best * (1 + 1e-9)]
