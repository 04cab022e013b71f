"""Turning committed token ids into appended text, with stop strings that may span canvases."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextAssembler:
    """Emits only text that can no longer change: no half-decoded characters, no partial stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = tuple(stops)
        self.emitted = ""

    def push(self, generated_ids: Sequence[int], final: bool) -> tuple[str, bool]:
        """The new text to append for all tokens so far, and whether a stop string ended it."""
        text = self._decode(generated_ids)
        start = len(self.emitted)
        hits = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in self._stops) if i >= 0]
        if hits:
            end = max(min(hits), start)
            delta = text[start:end]
            self.emitted += delta
            return delta, True
        end = len(text)
        if not final:
            end -= len(text) - len(text.rstrip(REPLACEMENT_CHAR))
            end -= held_back(text[:end], self._stops)
        delta = text[start : max(end, start)]
        self.emitted += delta
        return delta, False
