"""The denoising engine: admits requests, interleaves them one denoising step at a time, streams events.

One thread owns the model. Each turn it asks the scheduler (`scheduler.py`: admission, fairness,
cancellation, deadlines) for the next group of requests and has the step runner (`runner.py`: tensors,
transformers' helpers, sampling) advance that group by one unit: an encoder pass over its uncached tokens,
or one denoising step of its current canvas. Finished canvases become text through `commits.py`; measured
speed goes to a `RateMeter`. Front ends talk to the engine through `submit` (a sink called with each
event) or the `stream` / `generate` wrappers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from dgemma_common.images import ImageLimits
from dgemma_common.params import GenerationParams, Limits, ParamError, params_from_mapping
from dgemma_common.types import (
    CommitEvent,
    Counters,
    DraftEvent,
    Event,
    FinalEvent,
    LoadSnapshot,
    NotReadyError,
    Prompt,
    PromptTooLongError,
    RequestStats,
    StopReason,
)

from . import prompts
from .commits import commit_canvas
from .meter import BusyMeter, RateMeter
from .model import LoadedModel
from .runner import RowSpec, StepRunner
from .scheduler import Clock, Group, Scheduler, SchedulerLimits, interrupt_reason
from .textstream import TextAssembler
from .vision import EncodedPrompt, VisionInputs, encode_image_prompt

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


@dataclass(frozen=True)
class EngineConfig:
    """Admission bounds, request limits and server-side defaults."""

    max_active: int = 4
    max_queue: int = 16
    # Requests admitted together share forward passes, up to this many per batch. 1 = no batching
    # (a request's output then does not depend on what else runs); see docs/engine.md before raising it.
    max_batch: int = 1
    # With batching, how long the first queued request may wait for others to fill its batch.
    batch_window_s: float = 0.01
    limits: Limits = field(default_factory=Limits)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # None: the checkpoint's own settings (its generation_config) over the published ones.
    defaults: GenerationParams | None = None
    rate_window_s: float = 10.0

    def scheduler_limits(self) -> SchedulerLimits:
        return SchedulerLimits(self.max_active, self.max_queue, self.max_batch, self.batch_window_s)


class EngineObserver(Protocol):
    """Metrics hooks, called from the engine thread: keep them cheap."""

    def on_step(self, kind: str, seconds: float) -> None: ...

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None: ...


@dataclass(frozen=True)
class Work:
    """What one turn did: an encoder pass (its timed seconds), a decoder step, or neither (a commit)."""

    encoder_s: float = 0.0
    steps: int = 0


class _NullObserver:
    def on_step(self, kind: str, seconds: float) -> None:
        pass

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None:
        pass


@dataclass(eq=False)
class _Request:
    """One request: its settings, its generator, what it has produced so far."""

    id: str
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    deadline: float | None
    generator: torch.Generator
    submitted_at: float
    text: TextAssembler
    stats: RequestStats
    vision: VisionInputs | None = None  # the images of the prompt, for its first encoder pass
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    generated: list[int] = field(default_factory=list)
    last_draft_at: float = 0.0
    done: bool = False


class RequestHandle:
    """What `submit` returns: the request's id and a way to cancel it."""

    def __init__(self, request: _Request, wake: Callable[[], None]) -> None:
        self._request = request
        self._wake = wake

    @property
    def id(self) -> str:
        return self._request.id

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    def cancel(self) -> None:
        """Ask the engine to drop this request before its next step (no-op once finished)."""
        if not self._request.done:
            self._request.cancelled.set()
            self._wake()


class Engine:
    """Runs DiffusionGemma requests concurrently, one denoising step at a time each."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        *,
        runner: StepRunner | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.observer: EngineObserver = observer or _NullObserver()
        # Request defaults: the config's, else the checkpoint's own settings over the published ones.
        self.defaults = self.config.defaults or checkpoint_params(loaded, {}, self.config.limits)
        self.defaults.validated(self.config.limits)
        self.scheduler: Scheduler[_Request] = Scheduler(self.config.scheduler_limits(), clock)
        self.runner = runner or StepRunner(loaded, self.config.max_batch)
        self.clock = clock
        self.counters = Counters()
        self._meter = RateMeter(self.config.rate_window_s)
        self._busy = BusyMeter()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fatal: BaseException | None = None
        self._ready = False
        self._draining = False
        self._ids = itertools.count(1)
        self._steps_total = 0

    # ---- identity -------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def model_revision(self) -> str:
        return self.loaded.revision

    @property
    def canvas_length(self) -> int:
        return self.loaded.canvas_length

    @property
    def ready(self) -> bool:
        return self._ready and not self._draining and self._fatal is None

    @property
    def alive(self) -> bool:
        """False once the step thread has died; a server should then stop itself."""
        return self._fatal is None and (self._thread is None or self._thread.is_alive() or self._stopping)

    @property
    def draining(self) -> bool:
        return self._draining

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        """Start the step thread, warm the model up, then report ready (blocking)."""
        if self._thread is None:
            threads = torch.get_num_threads()
            self._thread = threading.Thread(target=self._run, args=(threads,), name="dgemma-engine", daemon=True)
            self._thread.start()
        if warmup:
            self._warm_up()
        self._ready = True

    def drain(self) -> None:
        """Refuse new requests; the ones in flight go on."""
        self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or active; False if `timeout` passed first."""
        return self.scheduler.wait_idle(timeout)

    def shutdown(self) -> None:
        """Cancel everything and stop the step thread."""
        self._draining = True
        self._stopping = True
        for req in self.scheduler.stop():
            req.cancelled.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _warm_up(self) -> None:
        params = replace(self.defaults, max_new_tokens=self.canvas_length, max_denoising_steps=2, seed=0)
        for event in self._generate(Prompt.of_text("warm up"), params, None, admit_when_draining=True):
            if isinstance(event, FinalEvent) and event.stop_reason is StopReason.ERROR:
                raise RuntimeError(f"warm-up failed: {event.error}")
        self.counters = Counters()
        self._meter = RateMeter(self.config.rate_window_s)
        self._busy = BusyMeter()  # warm-up turns pay first-call costs no request will
        self._steps_total = 0

    # ---- admission ------------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt, max_tokens: int | None = None) -> list[int]:
        """Token ids for a prompt as the encoder sees it, image tokens included (text: prompts.py)."""
        return self._encode_prompt(prompt, max_tokens).ids

    def _encode_prompt(self, prompt: Prompt, max_tokens: int | None = None) -> EncodedPrompt:
        if prompt.all_images:
            return encode_image_prompt(self.loaded.processor, prompt, self.config.image_limits)
        return EncodedPrompt(prompts.encode(self.loaded.tokenizer, prompt, self.loaded.vocab_size, max_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        prompts.check_ids(ids, self.loaded.vocab_size)
        return str(self.loaded.tokenizer.decode(list(ids), skip_special_tokens=True))

    def submit(
        self,
        prompt: Prompt,
        params: GenerationParams,
        sink: Sink,
        *,
        deadline: float | None = None,
    ) -> RequestHandle:
        """Validate, tokenize and queue a request; its events go to `sink` from the engine thread."""
        return self._submit(prompt, params, sink, deadline, admit_when_draining=False)

    def _submit(
        self, prompt: Prompt, params: GenerationParams, sink: Sink, deadline: float | None, admit_when_draining: bool
    ) -> RequestHandle:
        if not admit_when_draining and not self.ready:
            state = "engine failed" if self._fatal else "draining" if self._draining else "model is loading"
            raise NotReadyError(state)
        req = self._make_request(prompt, params, sink, deadline)
        self.scheduler.offer(req)
        return RequestHandle(req, self.scheduler.wake)

    def _make_request(self, prompt: Prompt, params: GenerationParams, sink: Sink, deadline: float | None) -> _Request:
        """Validate and tokenize: everything that can refuse a request happens before it is queued."""
        limits = self.config.limits
        params.validated(limits)
        encoded = self._encode_prompt(prompt)
        ids = encoded.ids
        if len(ids) > limits.max_prompt_tokens:
            raise PromptTooLongError(len(ids), limits.max_prompt_tokens)
        self._check_context(len(ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        return _Request(
            id=f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            sink=sink,
            deadline=deadline,
            generator=torch.Generator(device=self.loaded.device).manual_seed(seed),
            submitted_at=self.clock(),
            text=TextAssembler(self.detokenize, params.stop),
            stats=RequestStats(prompt_tokens=len(ids)),
            vision=encoded.vision,
        )

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        canvas = self.canvas_length
        needed = prompt_tokens + -(-max_new_tokens // canvas) * canvas
        context = int(self.loaded.model.config.text_config.max_position_embeddings)
        if needed > context:
            raise ParamError(
                "max_new_tokens",
                f"prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens, in whole canvases of "
                f"{canvas}, needs {needed} positions; the model's context is {context}",
            )

    # ---- convenience front ends -----------------------------------------------------------------

    def generate(
        self, prompt: Prompt, params: GenerationParams, *, deadline: float | None = None
    ) -> Iterator[Event]:
        """Events of one request, synchronously; closing the iterator cancels the request."""
        return self._generate(prompt, params, deadline, admit_when_draining=False)

    def _generate(
        self, prompt: Prompt, params: GenerationParams, deadline: float | None, admit_when_draining: bool
    ) -> Iterator[Event]:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self._submit(prompt, params, events.put, deadline, admit_when_draining)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            handle.cancel()

    async def stream(
        self, prompt: Prompt, params: GenerationParams, *, deadline: float | None = None
    ) -> AsyncIterator[Event]:
        """Events of one request for asyncio; closing or cancelling the iterator cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                handle.cancel()

        if prompt.all_images:
            # Decoding and preprocessing images is CPU work of tens of milliseconds: not on the event loop.
            handle = await asyncio.to_thread(self.submit, prompt, params, sink, deadline=deadline)
        else:
            handle = self.submit(prompt, params, sink, deadline=deadline)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            handle.cancel()

    # ---- load -----------------------------------------------------------------------------------

    def load_snapshot(self) -> LoadSnapshot:
        """Queue, activity and measured speed, for routers and metrics."""
        queued, active = self.scheduler.counts()
        meter = self._meter
        return LoadSnapshot(
            queue_depth=queued,
            active=active,
            capacity=self.config.max_active,
            max_queue=self.config.max_queue,
            step_latency_s=meter.latency("decoder"),
            tokens_per_s=meter.rate(self.clock()),
            encoder_latency_s=meter.latency("encoder"),
            canvas_length=self.canvas_length,
            model_name=self.model_name,
            model_revision=self.model_revision,
            ready=self.ready,
            draining=self._draining,
            steps_total=self._steps_total,
            tokens_total=self.counters.tokens_generated,
            vision=self.loaded.vision,
            encoder_token_latency_s=meter.latency("encoder_token"),
            busy_step_s=self._busy.per_step(),
            busy_s_total=self.counters.busy_s,
        )

    # ---- the step thread ------------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        # OpenMP's thread count is per thread: without this the step thread would use every core,
        # whatever the process was configured with (oversubscribing a node shared with other work).
        torch.set_num_threads(threads)
        last_end: float | None = None  # when the previous turn with work ended
        try:
            while True:
                turn = self.scheduler.next_turn()
                # Busy time runs on from the previous turn unless the thread sat idle in between.
                started = last_end if last_end is not None and not turn.waited else time.perf_counter()
                for req, reason in turn.ended:
                    self._finish(req, reason)
                if turn.stopping:
                    return
                if turn.group is None:
                    last_end = None
                    continue
                work = self._turn(turn.group)
                last_end = time.perf_counter()
                self._busy.turn(last_end - started, work.encoder_s, work.steps)
                self.counters.busy_s += last_end - started
        except BaseException as exc:  # the scheduler itself broke: nothing more will be served
            log.critical("engine step thread died", exc_info=exc)
            self._fatal = exc
            for req in self.scheduler.abandon():
                self._finish(req, StopReason.ERROR, "engine failure", "internal")

    def _turn(self, group: Group[_Request]) -> Work:
        """One unit of work for one group, with every failure contained to that group."""
        work = Work()
        now = self.clock()
        for req in group.rows:
            reason = interrupt_reason(req, now)
            if reason is not None:
                self._finish(req, reason)
        try:
            with torch.inference_mode():
                self._drop_ended_rows(group)
                if group.rows:
                    work = self._advance(group)
        except torch.OutOfMemoryError:
            log.error("out of memory in requests %s", [r.id for r in group.rows])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for req in group.rows:
                self._finish(req, StopReason.ERROR, "out of memory", "oom")
            group.rows = []
        except Exception:
            log.exception("requests %s failed", [r.id for r in group.rows])
            for req in group.rows:
                self._finish(req, StopReason.ERROR, "internal error", "internal")
            group.rows = []
        if not group.rows:
            self.scheduler.retire(group)
        return work

    def _drop_ended_rows(self, group: Group[_Request]) -> None:
        """Remove ended requests from the group and from its batch."""
        keep = [i for i, r in enumerate(group.rows) if not r.done]
        if len(keep) == len(group.rows):
            return
        group.rows = [group.rows[i] for i in keep]
        if group.batch is not None:
            self.runner.keep_rows(group.batch, keep)

    def _advance(self, group: Group[_Request]) -> Work:
        """An encoder pass when the group has uncached tokens, else one denoising step (or the commit of
        canvases that stopped at the previous one)."""
        if group.batch is None:
            for req in group.rows:
                assert req.started_at is not None
                req.stats.queue_wait_s = req.started_at - req.submitted_at
            specs = [RowSpec(r.prompt_ids, r.params, r.generator, r.vision) for r in group.rows]
            group.batch = self.runner.new_batch(specs)
            for req in group.rows:
                req.vision = None  # the batch holds the pixels until its first encoder pass
        if group.batch.needs_encoding:
            encoded = self.runner.encode(group.batch)  # timed as the device runs it (on CUDA: events)
            for req in group.rows:
                req.stats.encoder_passes += 1
                req.stats.encoder_s += encoded.seconds  # the batched pass, charged to each row (its trace span)
            self._record_step("encoder", encoded.seconds)
            self._meter.observe("encoder_token", encoded.seconds / max(1, encoded.tokens))
            return Work(encoder_s=encoded.seconds)
        started = time.perf_counter()
        going = self.runner.settle(group.batch)
        if not any(going):  # every row's canvas stopped at the previous step
            self._commit(group)
            return Work()
        for i, req in enumerate(group.rows):
            if going[i] and req.params.stream_drafts and self.runner.steps_done(group.batch, i):
                self._maybe_draft(group, i)  # the previous step's draft, now known not to be the last
        report = self.runner.denoise(group.batch)
        self.counters.decoder_forward_s += report.forward_s
        for i in report.stepped:
            group.rows[i].stats.decoder_passes += 1
        self._record_step("decoder", time.perf_counter() - started)
        return Work(steps=1)

    def _maybe_draft(self, group: Group[_Request], i: int) -> None:
        req = group.rows[i]
        now = self.clock()
        if now - req.last_draft_at < req.params.draft_interval_s:
            return
        req.last_draft_at = now
        ids = tuple(self.runner.draft(group.batch, i, req.params.max_new_tokens - len(req.generated)))
        step = self.runner.steps_done(group.batch, i)
        self._emit(req, DraftEvent(req.stats.canvases, step, ids, self.detokenize(ids)))

    def _commit(self, group: Group[_Request]) -> None:
        """Commit every row's argmax canvas; the rows that go on feed theirs to the encoder next."""
        canvases = self.runner.finish_canvas(group.batch)
        for req, canvas in zip(group.rows, canvases, strict=True):
            self._commit_row(req, canvas)
        self._drop_ended_rows(group)

    def _commit_row(self, req: _Request, canvas_ids: list[int]) -> None:
        """Append one row's canvas (cut at EOS, stop string or the token budget) and emit it."""
        req.stats.canvases += 1
        eos = () if req.params.ignore_eos else self.loaded.eos_token_ids
        commit = commit_canvas(
            req.generated, req.text, canvas_ids, max_new_tokens=req.params.max_new_tokens, eos_ids=eos
        )
        now = self.clock()
        if req.stats.time_to_first_commit_s is None:
            req.stats.time_to_first_commit_s = now - req.submitted_at
        req.stats.completion_tokens = len(req.generated)
        self._meter.add_tokens(now, len(commit.kept))
        self.counters.tokens_generated += len(commit.kept)
        self._emit(req, CommitEvent(req.stats.canvases - 1, tuple(commit.kept), commit.text))
        if commit.reason is not None:
            self._finish(req, commit.reason)

    def _finish(
        self, req: _Request, reason: StopReason, error: str | None = None, kind: str | None = None
    ) -> None:
        """Account for a finished request and free its slot, then send its final event."""
        if req.done:
            return
        req.done = True
        stats = req.stats
        stats.total_s = self.clock() - req.submitted_at
        outcome = reason.value
        # Bookkeeping before the final event, so whoever sees the event sees the slot free and counted.
        with self.scheduler.cond:
            self.counters.requests_by_outcome[outcome] = self.counters.requests_by_outcome.get(outcome, 0) + 1
            self.scheduler.release(req)
        self.observer.on_request_end(reason, stats)
        self._emit(req, FinalEvent(reason, stats, error, kind))

    def _emit(self, req: _Request, event: Event) -> None:
        try:
            req.sink(event)
        except Exception:
            log.exception("event sink of %s failed; cancelling it", req.id)
            req.cancelled.set()

    def _record_step(self, kind: str, seconds: float) -> None:
        self._meter.observe(kind, seconds)
        if kind == "decoder":
            self._steps_total += 1
            self.counters.decoder_passes += 1
            self.counters.decoder_step_s += seconds
        else:
            self.counters.encoder_passes += 1
        self.observer.on_step(kind, seconds)


def checkpoint_params(loaded: LoadedModel, overrides: Mapping[str, Any], limits: Limits) -> GenerationParams:
    """Request defaults: `overrides` over the checkpoint's generation_config over the published settings."""
    return params_from_mapping({**loaded.generation_defaults(), **overrides}, GenerationParams(), limits)
