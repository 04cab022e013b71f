"""Measured speed for load reports: tokens per second over a sliding window, step latency averages.

The engine thread writes; the gRPC event loop (load reports) and the metrics thread read. Every access
holds one lock, so a reader never iterates the window while the engine appends to it.
"""

from __future__ import annotations

import threading
from collections import deque


class RateMeter:
    """Tokens per second over a sliding window, plus an exponential moving average of step latency."""

    def __init__(self, window_s: float, alpha: float = 0.2) -> None:
        self.window_s = window_s
        self.alpha = alpha
        self._lock = threading.Lock()
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0  # tokens in the window, kept so a read is O(expired) instead of O(window)
        self._ema: dict[str, float] = {}

    def add_tokens(self, now: float, tokens: int) -> None:
        """Record `tokens` produced at `now` (monotonic seconds)."""
        with self._lock:
            self._events.append((now, tokens))
            self._total += tokens
            self._trim(now)

    def rate(self, now: float) -> float:
        """Tokens per second over the last `window_s` seconds."""
        with self._lock:
            self._trim(now)
            return self._total / self.window_s

    def observe(self, kind: str, seconds: float) -> None:
        """Fold one step's latency into the moving average of its kind ("encoder", "decoder")."""
        with self._lock:
            prev = self._ema.get(kind)
            self._ema[kind] = seconds if prev is None else prev + self.alpha * (seconds - prev)

    def latency(self, kind: str) -> float:
        """The moving average of that kind of step, 0.0 before the first one."""
        with self._lock:
            return self._ema.get(kind, 0.0)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]
