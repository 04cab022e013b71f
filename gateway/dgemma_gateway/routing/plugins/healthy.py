"""Filter `healthy`: ready, not draining, not ejected, and reported recently."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """How old a load report may be before the endpoint drops out."""

    stale_after_s: float = 5.0


@plugin("filter", "healthy", Params)
class Healthy:
    """Drops endpoints that are not ready, draining, ejected after failures, or silent for too long."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, ctx: Context, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Endpoints that can take a request now."""
        kept = [
            c for c in candidates
            if c.load is not None and c.load.ready and not c.load.draining and not c.ejected
            and ctx.now - c.load.observed_at <= self.params.stale_after_s
        ]
        if not kept:
            ctx.reason = f"no ready endpoint for model {ctx.request.model!r}"
        return kept
