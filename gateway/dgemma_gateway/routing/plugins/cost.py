"""Scorer `cost`: cheaper variants score higher (the cheapest scores 1).

With `per_work` (the default) the cost of serving this request is compared: the variant's cost weight
(per replica-second) x the seconds of worker time the request needs there (canvases x steps x step
latency). A pricier but much faster GPU can be the cheaper place for a request. Without it, only the
cost weights are compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.routing.predict import predict
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """per_work: compare cost weight x work seconds (True) or cost weights alone (False)."""

    per_work: bool = True


@plugin("scorer", "cost", Params)
class Cost:
    """min cost / cost."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, ctx: Context, candidates: Sequence[Candidate]) -> list[float]:
        """Relative cheapness in (0, 1]."""
        costs = []
        for c in candidates:
            weight = max(1e-9, c.variant.cost_weight)
            if self.params.per_work:
                # The work alone (no queueing): what the replica-seconds of this request cost.
                weight *= predict(c.alone(), ctx.request).service_s
            costs.append(weight)
        cheapest = min(costs)
        return [cheapest / c for c in costs]
