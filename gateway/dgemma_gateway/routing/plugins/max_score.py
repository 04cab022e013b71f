"""Picker `max-score`: the highest score; ties rotate with the request counter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """Scores within `tie` of the best count as ties."""

    tie: float = 1e-9


@plugin("picker", "max-score", Params)
class MaxScore:
    """Best score; among ties, request `seq` picks, so equal endpoints share the load."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def pick(self, ctx: Context, scored: Sequence[tuple[Candidate, float]]) -> Candidate | None:
        """The best-scored candidate."""
        if not scored:
            return None
        best = max(s for _, s in scored)
        ties = [c for c, s in scored if s >= best - self.params.tie]
        return ties[ctx.request.seq % len(ties)]
