"""The rate meter is read from the gRPC loop and the metrics thread while the engine thread writes."""

from __future__ import annotations

import sys
import threading

from dgemma_worker.meter import RateMeter


def test_tokens_per_second_over_the_window_and_latency_averages() -> None:
    meter = RateMeter(window_s=10.0, alpha=0.5)
    meter.add_tokens(0.0, 100)
    meter.add_tokens(5.0, 50)
    assert meter.rate(5.0) == 15.0
    assert meter.rate(12.0) == 5.0  # the first 100 left the window
    assert meter.latency("decoder") == 0.0
    meter.observe("decoder", 1.0)
    meter.observe("decoder", 2.0)
    assert meter.latency("decoder") == 1.5


def test_readers_on_other_threads_never_see_the_window_change_under_them() -> None:
    """Fails on a meter without a lock: 'deque mutated during iteration' or a pop from an empty deque."""
    meter = RateMeter(window_s=1e9)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        t = 0.0
        while not stop.is_set():
            t += 1.0
            meter.add_tokens(t, 1)

    def read() -> None:
        try:
            for _ in range(300):
                meter.rate(0.0)
        except BaseException as exc:
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        writer = threading.Thread(target=write)
        readers = [threading.Thread(target=read) for _ in range(2)]
        writer.start()
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        stop.set()
        writer.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:1]
