"""Who runs next: admission into a bounded queue, batching windows, round-robin fairness, cancellation
and deadlines. No tensors and no model: the engine's step thread asks `next_turn` for work and gets a
group of requests to advance by one unit, plus the queued requests that ended while waiting.

The clock is injected (monotonic seconds), so admission windows and deadlines are tested without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from dgemma_common.types import OverloadedError, StopReason

Clock = Callable[[], float]


class Schedulable(Protocol):
    """What the scheduler reads of a request."""

    cancelled: threading.Event
    deadline: float | None
    submitted_at: float
    started_at: float | None


R = TypeVar("R", bound=Schedulable)


@dataclass(frozen=True)
class SchedulerLimits:
    """How many requests run at once, how many may wait, and how they are batched."""

    max_active: int = 4
    max_queue: int = 16
    # Requests admitted together share forward passes, up to this many per batch (1 = no batching).
    max_batch: int = 1
    # With batching, how long the first queued request may wait for others to fill its batch.
    batch_window_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_active < 1 or self.max_queue < 0:
            raise ValueError("max_batch and max_active must be >= 1 and max_queue >= 0")


@dataclass(eq=False)
class Group(Generic[R]):
    """Requests admitted together: they share forward passes. `batch` is the step runner's state for them."""

    rows: list[R]
    batch: Any = None


@dataclass
class Turn(Generic[R]):
    """The next unit of work (if any), the queued requests that ended while waiting, and whether to stop."""

    group: Group[R] | None
    ended: list[tuple[R, StopReason]] = field(default_factory=list)
    stopping: bool = False
    waited: bool = False  # the step thread sat idle before this turn (the engine's busy time stops there)


def interrupt_reason(req: Schedulable, now: float) -> StopReason | None:
    """Why a request must end before its next step: cancelled or past its deadline; None to go on."""
    if req.cancelled.is_set():
        return StopReason.CANCELLED
    if req.deadline is not None and now >= req.deadline:
        return StopReason.DEADLINE
    return None


class Scheduler(Generic[R]):
    """A bounded queue in front of `max_active` slots, served one group per turn, round robin."""

    def __init__(self, limits: SchedulerLimits, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        # Re-entrant: the engine frees a slot (`release`) from callbacks that may run under the lock.
        self.cond = threading.Condition(threading.RLock())
        self._queue: deque[R] = deque()
        self._active: list[R] = []
        self._groups: list[Group[R]] = []
        self._rr = 0
        self._stopping = False

    # ---- called from any thread -----------------------------------------------------------------

    def offer(self, req: R) -> None:
        """Queue a request, or raise OverloadedError when active + queued are at their bound."""
        with self.cond:
            # Counted together: a request may sit in the queue for a moment before a free slot takes it.
            if len(self._active) + len(self._queue) >= self.limits.max_active + self.limits.max_queue:
                raise OverloadedError(
                    f"overloaded: {len(self._active)} active and {len(self._queue)} queued requests "
                    f"(max_active={self.limits.max_active}, max_queue={self.limits.max_queue})"
                )
            self._queue.append(req)
            self.cond.notify_all()

    def wake(self) -> None:
        """Make the step thread look again (a request was cancelled)."""
        with self.cond:
            self.cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(queued, active) right now."""
        with self.cond:
            return len(self._queue), len(self._active)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or active; False if `timeout` passed first."""
        end = time.monotonic() + timeout
        with self.cond:
            while self._queue or self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.05))
        return True

    def stop(self) -> list[R]:
        """Stop handing out turns; returns every queued and active request (the caller cancels them)."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
            return [*self._queue, *self._active]

    def abandon(self) -> list[R]:
        """Forget everything (the step thread died); returns what was queued or active."""
        with self.cond:
            pending = [*self._queue, *self._active]
            self._queue.clear()
            self._groups.clear()
            return pending

    def release(self, req: R) -> None:
        """Free a finished request's slot."""
        with self.cond:
            if req in self._active:
                self._active.remove(req)
            self.cond.notify_all()

    # ---- called from the step thread ------------------------------------------------------------

    def next_turn(self, idle_wait_s: float = 0.5) -> Turn[R]:
        """The next turn, waiting while there is nothing to do."""
        with self.cond:
            waited = False
            while True:
                turn = self.poll()
                if turn is not None:
                    turn.waited = waited
                    return turn
                self.cond.wait(self._batch_wait_left() or idle_wait_s)
                waited = True

    def poll(self) -> Turn[R] | None:
        """End waiting requests that were cancelled or timed out, admit queued ones, and pick a group;
        None when there is nothing to do yet."""
        with self.cond:
            ended = self._reap_locked()
            self._admit_locked()
            if self._groups or ended:
                return Turn(self._pick_locked(), ended)
            if self._stopping:
                return Turn(None, stopping=True)
            return None

    def retire(self, group: Group[R]) -> None:
        """Drop a group that has no rows left."""
        with self.cond:
            if group in self._groups:
                self._groups.remove(group)

    # ---- decisions, under the lock --------------------------------------------------------------

    def _pick_locked(self) -> Group[R] | None:
        if not self._groups:
            return None
        self._rr %= len(self._groups)
        group = self._groups[self._rr]
        self._rr += 1
        return group

    def _reap_locked(self) -> list[tuple[R, StopReason]]:
        now = self.clock()
        ended = [(req, reason) for req in self._queue if (reason := interrupt_reason(req, now)) is not None]
        for req, _ in ended:
            self._queue.remove(req)
        return ended

    def _batch_wait_left(self) -> float:
        """Seconds the oldest queued request may still wait for its batch to fill (0 = admit now)."""
        free = self.limits.max_active - len(self._active)
        want = min(self.limits.max_batch, free)
        if not self._queue or free <= 0 or len(self._queue) >= want:
            return 0.0
        return max(0.0, self._queue[0].submitted_at + self.limits.batch_window_s - self.clock())

    def _admit_locked(self) -> None:
        limits = self.limits
        while self._queue and len(self._active) < limits.max_active:
            if limits.max_batch > 1 and self._batch_wait_left() > 0:
                return  # give the batch a moment to fill, as Triton's max_queue_delay does
            size = min(limits.max_batch, limits.max_active - len(self._active), len(self._queue))
            rows = [self._queue.popleft() for _ in range(size)]
            now = self.clock()
            for req in rows:
                req.started_at = now
            self._active.extend(rows)
            self._groups.append(Group(rows))
