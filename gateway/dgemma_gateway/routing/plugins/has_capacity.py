"""Filter `has-capacity`: endpoints with a free active or queue slot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """Share of the worker's queue the gateway may fill (1.0: all of it)."""

    queue_share: float = 1.0


@plugin("filter", "has-capacity", Params)
class HasCapacity:
    """Drops endpoints whose active and waiting slots are all taken (they would refuse the request)."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, ctx: Context, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Endpoints with room."""
        kept = []
        for c in candidates:
            if c.load is None:
                continue
            room = c.load.capacity + int(c.load.max_queue * self.params.queue_share)
            if c.in_system < room:
                kept.append(c)
        if not kept:
            ctx.reason = "every endpoint is at capacity"
            ctx.retry_after_s = 1.0
        return kept
