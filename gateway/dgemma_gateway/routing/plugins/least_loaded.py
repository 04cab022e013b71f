"""Scorer `least-loaded`: fewer requests queued or active per slot scores higher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """No parameters."""


@plugin("scorer", "least-loaded", Params)
class LeastLoaded:
    """1 / (1 + requests in the system / capacity)."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def score(self, ctx: Context, candidates: Sequence[Candidate]) -> list[float]:
        """Idleness in (0, 1]."""
        out = []
        for c in candidates:
            capacity = max(1, c.load.capacity if c.load is not None else 1)
            out.append(1.0 / (1.0 + c.in_system / capacity))
        return out
