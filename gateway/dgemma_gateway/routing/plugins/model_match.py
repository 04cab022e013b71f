"""Filter `model-match`: endpoints whose variant serves the requested model name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_gateway.routing.framework import Context, plugin
from dgemma_gateway.types import Candidate


@dataclass(frozen=True)
class Params:
    """No parameters."""


@plugin("filter", "model-match", Params)
class ModelMatch:
    """Keeps endpoints serving `request.model`."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def filter(self, ctx: Context, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Endpoints of the requested model."""
        kept = [c for c in candidates if c.variant.model == ctx.request.model]
        if not kept:
            ctx.reason = f"no endpoint serves model {ctx.request.model!r}"
        return kept
