"""Optional batching: requests admitted together share forward passes, each with its own settings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from dgemma_common.params import GenerationParams
from dgemma_common.types import CommitEvent, Event, FinalEvent, Prompt, StopReason
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import LoadedModel
from dgemma_worker.runner import Batch, EncodeReport, StepRunner


@pytest.fixture
def batching(loaded: LoadedModel) -> Iterator[Engine]:
    eng = Engine(loaded, EngineConfig(max_active=4, max_queue=8, max_batch=4))
    eng.start(warmup=False)
    yield eng
    eng.shutdown()


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, FinalEvent):
            self.done.set()

    @property
    def final(self) -> FinalEvent:
        assert self.done.wait(30)
        last = self.events[-1]
        assert isinstance(last, FinalEvent)
        return last

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, CommitEvent) for t in e.token_ids]


def submit_together(engine: Engine, jobs: list[tuple[Prompt, GenerationParams]]) -> list[Collector]:
    """Queue all jobs before the step thread can admit any, so they are admitted as one batch."""
    collectors = [Collector() for _ in jobs]
    with engine.scheduler.cond:  # the step thread admits under this lock; holding it makes the arrival simultaneous
        handles = [engine.submit(p, params, c) for (p, params), c in zip(jobs, collectors, strict=True)]
    assert len(handles) == len(jobs)
    return collectors


def test_requests_admitted_together_share_forwards_and_keep_their_own_settings(batching: Engine) -> None:
    jobs = [
        (Prompt.of_tokens([2, 40, 41]), GenerationParams(max_new_tokens=16, max_denoising_steps=2, seed=1,
                                                         ignore_eos=True)),
        (Prompt.of_tokens([2, 50, 51, 52, 53, 54, 55]), GenerationParams(max_new_tokens=40, max_denoising_steps=3,
                                                                         seed=2, ignore_eos=True)),
        (Prompt.of_text("a longer prompt than the others"), GenerationParams(max_new_tokens=70, max_denoising_steps=4,
                                                                             seed=3, ignore_eos=True, t_max=1.5)),
    ]
    collectors = submit_together(batching, jobs)
    finals = [c.final for c in collectors]
    assert [f.stop_reason for f in finals] == [StopReason.LENGTH] * 3
    assert [len(c.tokens) for c in collectors] == [16, 40, 70]
    assert [f.stats.canvases for f in finals] == [1, 3, 5]
    assert [f.stats.decoder_passes for f in finals] == [2, 9, 20]
    # Shared: a forward serves every row still in the batch, so there are fewer forwards than row-steps.
    assert batching.counters.decoder_passes < sum(f.stats.decoder_passes for f in finals)
    assert batching.counters.decoder_passes == 20  # the longest row sets the pace
    assert batching.load_snapshot().active == 0


def test_identical_requests_in_one_batch_produce_identical_output(batching: Engine) -> None:
    params = GenerationParams(max_new_tokens=48, max_denoising_steps=3, seed=5, ignore_eos=True)
    prompt = Prompt.of_tokens([2, 60, 61, 62])
    a, b = submit_together(batching, [(prompt, params), (prompt, params)])
    assert a.final.stop_reason is StopReason.LENGTH and b.final.stop_reason is StopReason.LENGTH
    assert a.tokens == b.tokens and len(a.tokens) == 48


def test_cancelling_one_row_leaves_the_rest_of_the_batch_running(batching: Engine) -> None:
    long = GenerationParams(max_new_tokens=16 * 30, max_denoising_steps=32, seed=1, ignore_eos=True)
    short = GenerationParams(max_new_tokens=64, max_denoising_steps=4, seed=2, ignore_eos=True)
    prompt = Prompt.of_tokens([2, 70, 71])
    collectors = [Collector(), Collector()]
    with batching.scheduler.cond:
        victim = batching.submit(prompt, long, collectors[0])
        batching.submit(prompt, short, collectors[1])
    victim.cancel()
    assert collectors[0].final.stop_reason is StopReason.CANCELLED
    assert collectors[1].final.stop_reason is StopReason.LENGTH
    assert len(collectors[1].tokens) == 64


def test_batching_is_off_by_default(loaded: LoadedModel) -> None:
    assert EngineConfig().max_batch == 1
    with pytest.raises(ValueError, match="max_batch"):
        Engine(loaded, EngineConfig(max_batch=0))


def test_requests_arriving_within_the_batch_window_are_batched(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_active=4, max_queue=4, max_batch=3, batch_window_s=0.5))
    engine.start(warmup=False)
    try:
        params = GenerationParams(max_new_tokens=16, max_denoising_steps=4, seed=1, ignore_eos=True)
        collectors = [Collector() for _ in range(3)]
        for c in collectors:
            engine.submit(Prompt.of_tokens([2, 40, 41]), params, c)
        assert [c.final.stop_reason for c in collectors] == [StopReason.LENGTH] * 3
        assert engine.counters.decoder_passes == 4  # one batch of three: four shared forwards
    finally:
        engine.shutdown()


@dataclass(eq=False)
class ReportingRunner(StepRunner):
    """The engine's own runner, keeping what each encoder pass reported."""

    encoded: list[EncodeReport] = field(default_factory=list)

    def encode(self, batch: Batch) -> EncodeReport:
        report = super().encode(batch)
        self.encoded.append(report)
        return report


def test_each_row_of_a_batch_is_charged_every_encoder_pass_as_the_runner_timed_it(loaded: LoadedModel) -> None:
    """The engine takes the pass's time from the runner, which times it as the device runs it (on CUDA with
    events: the wall clock around a queued pass would be its launches only), and charges it to each row."""
    runner = ReportingRunner(loaded, max_batch=2)
    engine = Engine(loaded, EngineConfig(max_active=2, max_queue=2, max_batch=2, batch_window_s=0.5), runner=runner)
    engine.start(warmup=False)
    try:
        params = GenerationParams(max_new_tokens=2 * loaded.canvas_length, max_denoising_steps=2, seed=1,
                                  ignore_eos=True)
        collectors = [Collector() for _ in range(2)]
        for c in collectors:
            engine.submit(Prompt.of_tokens([2, 40, 41]), params, c)
        finals = [c.final for c in collectors]
        # One batch: the prompts, then the first canvas, each in one pass shared by both rows.
        assert [r.tokens for r in runner.encoded] == [3, loaded.canvas_length]
        assert all(r.seconds > 0 for r in runner.encoded)
        for final in finals:
            assert final.stats.encoder_passes == 2
            assert final.stats.encoder_s == sum(r.seconds for r in runner.encoded)
    finally:
        engine.shutdown()
