"""Measured speed for load reports: tokens per second over a sliding window, step latency averages, and the
engine's busy time per step (what capacity is charged).

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


class BusyMeter:
    """Engine wall time per decoder step while it has work, over its last `turns` turns with work.

    A step's own latency leaves out what the step thread does between steps: committing canvases, scheduling,
    handing events to the server, waiting for the interpreter lock the server's threads hold. A replica's
    capacity is what its busy time buys, so capacity is charged this instead: (busy seconds - encoder seconds)
    / decoder steps. Encoder passes are left out because they are charged per canvas. Counted in turns, not
    seconds, so an idle replica keeps its last measurement. Written by the step thread, read by the server's.
    """

    def __init__(self, turns: int = 512) -> None:
        self._lock = threading.Lock()
        self._turns: deque[tuple[float, float, int]] = deque(maxlen=turns)  # (busy s, encoder s, steps)

    def turn(self, busy_s: float, encoder_s: float, steps: int) -> None:
        """One turn with work: its wall time (and the wait-free gap before it), its encoder pass, its steps."""
        with self._lock:
            self._turns.append((busy_s, encoder_s, steps))

    def per_step(self) -> float:
        """Busy seconds per decoder step, encoder passes excluded; 0.0 before the first step."""
        with self._lock:
            steps = sum(s for _, _, s in self._turns)
            busy = sum(b - e for b, e, _ in self._turns)
        return max(0.0, busy) / steps if steps else 0.0
