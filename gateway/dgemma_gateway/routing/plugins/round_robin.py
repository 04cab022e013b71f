"""Picker `round-robin`: the candidates in turn, by request counter (scores are ignored)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """No parameters."""


@plugin("picker", "round-robin", Params)
class RoundRobin:
    """candidates[seq mod n], in endpoint-id order so the rotation is stable."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def pick(self, ctx: Context, scored: Sequence[tuple[Candidate, float]]) -> Candidate | None:
        """The next candidate in turn."""
        if not scored:
            return None
        ordered = sorted((c for c, _ in scored), key=lambda c: c.endpoint_id)
        return ordered[ctx.request.seq % len(ordered)]
