"""The meters are read from the gRPC loop and the metrics thread while the engine thread writes; the busy
meter charges a step what the engine really spends on it."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace

import pytest

from dgemma_common.params import GenerationParams
from dgemma_common.types import ChatMessage, CommitEvent, Event, FinalEvent, Prompt
from dgemma_gateway.demand import replica_canvases_per_s
from dgemma_gateway.types import EndpointLoad
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.meter import BusyMeter, RateMeter
from dgemma_worker.model import LoadedModel


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


def test_busy_time_per_step_leaves_out_encoder_passes_and_keeps_only_the_last_turns() -> None:
    meter = BusyMeter(turns=3)
    assert meter.per_step() == 0.0  # nothing measured yet
    meter.turn(0.5, 0.4, 0)  # an encoder pass of 0.4 s and 0.1 s around it
    meter.turn(0.2, 0.0, 1)
    meter.turn(0.1, 0.0, 0)  # a commit: no step, but its time is the steps'
    assert meter.per_step() == pytest.approx(0.4)
    meter.turn(0.3, 0.0, 1)  # the encoder turn leaves the window
    assert meter.per_step() == pytest.approx(0.3)


COMMIT_S = 0.05  # what a slow consumer of each committed canvas costs the step thread
STEPS = 4


def test_capacity_from_busy_time_is_what_the_engine_delivers_with_work_between_steps(loaded: LoadedModel) -> None:
    """A sink that takes 50 ms per committed canvas stands for the work between steps (committing,
    detokenizing, streaming) that a step's own latency leaves out. Capacity charged the busy time per step
    matches the canvases the engine delivered while busy; charged the step latency, it overstates them."""
    engine = Engine(loaded, EngineConfig(max_active=2, max_queue=2))
    engine.start(warmup=True)
    params = GenerationParams(max_new_tokens=engine.canvas_length * 6, max_denoising_steps=STEPS, seed=1,
                              ignore_eos=True)
    done = threading.Event()
    canvases: list[int] = []

    def sink(event: Event) -> None:  # called on the step thread
        if isinstance(event, CommitEvent):
            time.sleep(COMMIT_S)
        if isinstance(event, FinalEvent):
            canvases.append(event.stats.canvases)
            if len(canvases) == 2:
                done.set()

    try:
        started = time.perf_counter()
        for seed in (1, 2):  # two requests, so the engine always has a turn to run
            engine.submit(Prompt.of_messages([ChatMessage("user", f"Hello {seed}")]), params, sink)
        assert done.wait(timeout=120)
        wall = time.perf_counter() - started
        snap = engine.load_snapshot()
        steps, step_s = engine.counters.decoder_passes, engine.counters.decoder_step_s
    finally:
        engine.shutdown()
    delivered = sum(canvases) / wall
    assert sum(canvases) == 12 and steps == 12 * STEPS
    # Every step's own time and every commit's are in the busy time charged to the steps.
    assert snap.busy_step_s >= (step_s + COMMIT_S * 12) / steps
    assert 0.8 * wall <= snap.busy_s_total <= wall  # busy throughout, and never more than the wall clock
    load = EndpointLoad(0, 0, 2, 2, snap.step_latency_s, snap.encoder_latency_s, 0.0, engine.canvas_length,
                        "m", True, False, 0.0)
    charged_steps = replica_canvases_per_s(load, STEPS)
    charged_busy = replica_canvases_per_s(replace(load, busy_step_s=snap.busy_step_s), STEPS)
    assert charged_steps is not None and charged_busy is not None
    assert charged_steps > 1.5 * delivered  # the old estimate: the work between steps left out
    assert 0.9 * delivered <= charged_busy <= 1.3 * delivered
