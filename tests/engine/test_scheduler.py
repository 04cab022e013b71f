"""The scheduler alone: admission bounds, batching windows, round robin, cancellation and deadlines.

No model and no sleeping: requests are plain records and the clock is a number the test moves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from dgemma_common.types import OverloadedError, StopReason
from dgemma_worker.scheduler import Scheduler, SchedulerLimits, Turn


@dataclass(eq=False)
class Job:
    name: str
    submitted_at: float = 0.0
    deadline: float | None = None
    started_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler(clock: FakeClock, **limits: float) -> Scheduler[Job]:
    return Scheduler(SchedulerLimits(**limits), clock)  # type: ignore[arg-type]


def picked(turn: Turn[Job] | None) -> list[str]:
    assert turn is not None and turn.group is not None
    return [j.name for j in turn.group.rows]


def test_active_plus_queued_is_bounded_and_the_overflow_is_refused() -> None:
    s = scheduler(FakeClock(), max_active=2, max_queue=1)
    for name in "abc":
        s.offer(Job(name))
    with pytest.raises(OverloadedError, match="max_active=2, max_queue=1"):
        s.offer(Job("d"))


def test_active_requests_take_turns_round_robin_and_a_freed_slot_admits_the_next() -> None:
    s = scheduler(FakeClock(), max_active=2, max_queue=4)
    jobs = [Job(n) for n in "abc"]
    for j in jobs:
        s.offer(j)
    order = [picked(s.poll()) for _ in range(4)]
    assert order == [["a"], ["b"], ["a"], ["b"]]
    assert s.counts() == (1, 2)
    turn = s.poll()
    assert turn is not None and turn.group is not None
    s.release(jobs[0])
    s.retire(turn.group)  # "a" finished: its group goes, "c" takes the slot
    assert {tuple(picked(s.poll())) for _ in range(2)} == {("b",), ("c",)}


def test_a_request_cancelled_or_timed_out_in_the_queue_ends_without_a_slot() -> None:
    clock = FakeClock()
    s = scheduler(clock, max_active=1, max_queue=4)
    running, cancelled, late = Job("run"), Job("cancel"), Job("late", deadline=5.0)
    for j in (running, cancelled, late):
        s.offer(j)
    assert picked(s.poll()) == ["run"]
    cancelled.cancelled.set()
    clock.now = 5.0
    turn = s.poll()
    assert turn is not None
    assert [(j.name, r) for j, r in turn.ended] == [("cancel", StopReason.CANCELLED), ("late", StopReason.DEADLINE)]
    assert s.counts() == (0, 1)


def test_a_batch_waits_for_its_window_to_fill_then_runs_together() -> None:
    clock = FakeClock()
    s = scheduler(clock, max_active=4, max_queue=4, max_batch=3, batch_window_s=1.0)
    s.offer(Job("a"))
    s.offer(Job("b"))
    assert s.poll() is None  # two of three, the window is open
    clock.now = 1.0
    assert picked(s.poll()) == ["a", "b"]  # the window closed: the batch goes as it is
    for name in "cde":
        s.offer(Job(name, submitted_at=1.0))
    turns = {tuple(picked(s.poll())) for _ in range(2)}
    assert ("c", "d") in turns  # two free slots: a batch of two at once, "e" waits for a slot


def test_stop_hands_back_everything_and_ends_the_turns() -> None:
    s = scheduler(FakeClock(), max_active=1, max_queue=2)
    for name in "ab":
        s.offer(Job(name))
    assert picked(s.poll()) == ["a"]
    assert sorted(j.name for j in s.stop()) == ["a", "b"]
    s.abandon()
    turn = s.poll()
    assert turn is not None and turn.stopping and turn.group is None


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        SchedulerLimits(max_batch=0)
