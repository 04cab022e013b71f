"""Scorer `cost`: cheaper variants score higher (the cheapest scores 1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """No parameters."""


@plugin("scorer", "cost", Params)
class Cost:
    """min cost / cost, from the variants' cost weights."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, ctx: Context, candidates: Sequence[Candidate]) -> list[float]:
        """Relative cheapness in (0, 1]."""
        cheapest = min(c.variant.cost_weight for c in candidates)
        return [cheapest / c.variant.cost_weight if c.variant.cost_weight > 0 else 1.0 for c in candidates]
