"""What a finished canvas adds to a request's output: cut at EOS, a stop string or the token budget.

Pure bookkeeping on host lists and strings; no tensors. The engine calls `commit_canvas` once per row
and finished canvas and turns the result into a `CommitEvent` (and a `FinalEvent` when it ends the row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dgemma_common.types import StopReason

from .textstream import TextAssembler


def cut_canvas(canvas_ids: list[int], room: int, eos_ids: Sequence[int]) -> tuple[list[int], StopReason | None]:
    """The part of a committed canvas to keep: up to the first EOS (excluded) and within `room` tokens."""
    eos = set(eos_ids)
    for i, tok in enumerate(canvas_ids[:room]):
        if tok in eos:
            return canvas_ids[:i], StopReason.EOS
    if room <= len(canvas_ids):
        return canvas_ids[:room], StopReason.LENGTH
    return canvas_ids, None


@dataclass(frozen=True)
class Commit:
    """One canvas's contribution: the tokens kept, the text to append, and why the row ends (if it does)."""

    kept: list[int]
    text: str
    reason: StopReason | None


def commit_canvas(
    generated: list[int],
    text: TextAssembler,
    canvas_ids: list[int],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
) -> Commit:
    """Append the kept part of `canvas_ids` to `generated` (in place) and advance the text assembler."""
    kept, reason = cut_canvas(canvas_ids, max_new_tokens - len(generated), eos_ids)
    generated.extend(kept)
    delta, hit_stop = text.push(generated, final=reason is not None)
    return Commit(kept, delta, StopReason.STOP_STRING if hit_stop else reason)
