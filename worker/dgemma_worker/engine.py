"""The denoising engine: admits requests, interleaves them one denoising step at a time, streams events.

One thread owns the model and runs a round-robin over the active requests: each turn is one unit of work
for one request (an encoder pass over its uncached tokens, or one denoising step of its current canvas).
Between turns it admits queued requests, drops cancelled ones and ends those past their deadline, so a
client that goes away costs at most one more step. Front ends talk to it through `submit` (a sink called
with each event) or the `stream` / `generate` wrappers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from dgemma_common.params import GenerationParams, Limits, ParamError, params_from_mapping
from dgemma_common.types import (
    CommitEvent,
    Counters,
    DraftEvent,
    Event,
    FinalEvent,
    LoadSnapshot,
    NotReadyError,
    OverloadedError,
    Prompt,
    PromptTooLongError,
    RequestStats,
    StopReason,
)

from .model import LoadedModel
from .sampling import StabilityTracker, denoise_step, temperature
from .textstream import TextAssembler

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]

# TEST ONLY: an artificial delay added to every decoder step, to make a "slow GPU" worker in the gateway's
# latency-target tests and benchmarks. Never set it in production.
DEBUG_STEP_DELAY_ENV = "DGEMMA_DEBUG_STEP_DELAY_S"


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
    # None: the checkpoint's own settings (its generation_config) over the published ones.
    defaults: GenerationParams | None = None
    rate_window_s: float = 10.0


class EngineObserver(Protocol):
    """Metrics hooks, called from the engine thread: keep them cheap."""

    def on_step(self, kind: str, seconds: float) -> None: ...

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None: ...


class _NullObserver:
    def on_step(self, kind: str, seconds: float) -> None:
        pass

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None:
        pass


class RateMeter:
    """Tokens per second over a sliding window, plus an exponential moving average of step latency."""

    def __init__(self, window_s: float, alpha: float = 0.2) -> None:
        self.window_s = window_s
        self.alpha = alpha
        self._events: deque[tuple[float, int]] = deque()
        self.ema: dict[str, float] = {}

    def add_tokens(self, now: float, tokens: int) -> None:
        self._events.append((now, tokens))
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self._events) / self.window_s if self._events else 0.0

    def observe(self, kind: str, seconds: float) -> None:
        prev = self.ema.get(kind)
        self.ema[kind] = seconds if prev is None else prev + self.alpha * (seconds - prev)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


@dataclass
class _Request:
    """One request: its settings, its generator, what it has produced, and its place in a canvas."""

    id: str
    prompt_ids: list[int]
    params: GenerationParams
    sink: Sink
    deadline: float | None
    generator: torch.Generator
    submitted_at: float
    text: TextAssembler
    stats: RequestStats
    stability: StabilityTracker
    cancelled: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    generated: list[int] = field(default_factory=list)
    remaining: int = 0  # denoising steps left in the current canvas: N..1, as transformers counts them
    canvas_done: bool = False  # this row's current canvas has stopped; it waits for the rest of its group
    last_draft_at: float = 0.0
    done: bool = False


@dataclass
class _Group:
    """Requests that share forward passes: a batch with one row per request (one row unless batching).

    Rows are left-padded to a common length, which is exact with an attention mask; every row adds one
    canvas per round, so they stay aligned. A row that ends is dropped from the batch (and its cache).
    """

    rows: list[_Request]
    attention: torch.Tensor  # (B, seq_len) bool: False on left padding
    pending: torch.Tensor | None  # (B, n) tokens not yet in the cache
    cache: Any = None
    canvas: torch.Tensor | None = None  # (B, L) the noisy canvas fed to the next step
    argmax: torch.Tensor | None = None  # (B, L) the current drafts
    self_conditioning: torch.Tensor | None = None  # (B, L, V)
    mask_mapping: Any = None
    positions: torch.Tensor | None = None  # (1, L)

    @property
    def seq_len(self) -> int:
        return int(self.attention.shape[1])


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
    ) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.observer: EngineObserver = observer or _NullObserver()
        self.counters = Counters()
        self._meter = RateMeter(self.config.rate_window_s)
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._active: list[_Request] = []  # admitted requests, in groups
        self._groups: list[_Group] = []
        self._scratch: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}  # owned by the step thread
        self._rr = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fatal: BaseException | None = None
        self._ready = False
        self._draining = False
        self._ids = itertools.count(1)
        self._steps_total = 0
        self._debug_step_delay_s = float(os.environ.get(DEBUG_STEP_DELAY_ENV, "") or 0.0)  # TEST ONLY
        self.defaults = self.config.defaults or checkpoint_params(loaded, {}, self.config.limits)
        self.defaults.validated(self.config.limits)
        if self.config.max_batch < 1 or self.config.max_active < 1 or self.config.max_queue < 0:
            raise ValueError("max_batch and max_active must be >= 1 and max_queue >= 0")

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
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._active:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def shutdown(self) -> None:
        """Cancel everything and stop the step thread."""
        self._draining = True
        with self._cond:
            for req in [*self._queue, *self._active]:
                req.cancelled.set()
            self._stopping = True
            self._cond.notify_all()
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
        self._steps_total = 0

    # ---- admission ------------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids for a prompt: raw text gets BOS, chat messages go through the chat template."""
        tok = self.loaded.tokenizer
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
            bad = next((t for t in ids if not 0 <= t < self.loaded.vocab_size), None)
            if bad is not None:
                raise ParamError("prompt.token_ids", f"ids must be in [0, {self.loaded.vocab_size}), got {bad}")
        elif prompt.messages is not None:
            if not prompt.messages:
                raise ParamError("prompt.messages", "must not be empty")
            messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        elif prompt.text is not None:
            ids = list(tok(prompt.text, add_special_tokens=True)["input_ids"])
        else:
            raise ParamError("prompt", "one of text, messages or token_ids is required")
        if not ids:
            raise ParamError("prompt", "must not be empty")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
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
        with self._cond:
            # Counted together: a request may sit in the queue for a moment before a free slot takes it.
            if len(self._active) + len(self._queue) >= self.config.max_active + self.config.max_queue:
                raise OverloadedError(
                    f"overloaded: {len(self._active)} active and {len(self._queue)} queued requests "
                    f"(max_active={self.config.max_active}, max_queue={self.config.max_queue})"
                )
            self._queue.append(req)
            self._cond.notify_all()
        return RequestHandle(req, self._wake)

    def _make_request(self, prompt: Prompt, params: GenerationParams, sink: Sink, deadline: float | None) -> _Request:
        """Validate and tokenize: everything that can refuse a request happens before it is queued."""
        limits = self.config.limits
        params.validated(limits)
        ids = self.tokenize(prompt)
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
            submitted_at=time.monotonic(),
            text=TextAssembler(self.detokenize, params.stop),
            stats=RequestStats(prompt_tokens=len(ids)),
            stability=StabilityTracker(params.stability_threshold, params.confidence_threshold),
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

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- convenience front ends -----------------------------------------------------------------

    def generate(
        self, prompt: Prompt, params: GenerationParams, *, deadline: float | None = None
    ) -> Iterator[Event]:
        """Events of one request, synchronously; closing the iterator cancels the request."""
        return self._generate(prompt, params, deadline, admit_when_draining=False)

    def _generate(
        self, prompt: Prompt, params: GenerationParams, deadline: float | None, admit_when_draining: bool
    ) -> Iterator[Event]:
        import queue

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
        now = time.monotonic()
        with self._cond:
            queued, active = len(self._queue), len(self._active)
        return LoadSnapshot(
            queue_depth=queued,
            active=active,
            capacity=self.config.max_active,
            max_queue=self.config.max_queue,
            step_latency_s=self._meter.ema.get("decoder", 0.0),
            tokens_per_s=self._meter.rate(now),
            encoder_latency_s=self._meter.ema.get("encoder", 0.0),
            canvas_length=self.canvas_length,
            model_name=self.model_name,
            model_revision=self.model_revision,
            ready=self.ready,
            draining=self._draining,
            steps_total=self._steps_total,
            tokens_total=self.counters.tokens_generated,
        )

    # ---- the step thread ------------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        # OpenMP's thread count is per thread: without this the step thread would use every core,
        # whatever the process was configured with (oversubscribing a node shared with other work).
        torch.set_num_threads(threads)
        try:
            while True:
                group = self._next_group()
                if group is None:
                    return
                self._turn(group)
        except BaseException as exc:  # the scheduler itself broke: nothing more will be served
            log.critical("engine step thread died", exc_info=exc)
            self._fatal = exc
            self._fail_everything()

    def _fail_everything(self) -> None:
        with self._cond:
            pending = [*self._queue, *self._active]
            self._queue.clear()
            self._groups.clear()
        for req in pending:
            self._finish(req, StopReason.ERROR, "engine failure", "internal")

    def _next_group(self) -> _Group | None:
        """Admit queued requests into free slots (as new groups) and pick the next group, round robin."""
        with self._cond:
            while True:
                self._reap_locked()
                self._admit_locked()
                if self._groups:
                    self._rr %= len(self._groups)
                    group = self._groups[self._rr]
                    self._rr += 1
                    return group
                if self._stopping:
                    return None
                self._cond.wait(self._batch_wait_left() or 0.5)

    def _batch_wait_left(self) -> float:
        """Seconds the oldest queued request may still wait for its batch to fill (0 = admit now)."""
        free = self.config.max_active - len(self._active)
        want = min(self.config.max_batch, free)
        if not self._queue or free <= 0 or len(self._queue) >= want:
            return 0.0
        return max(0.0, self._queue[0].submitted_at + self.config.batch_window_s - time.monotonic())

    def _admit_locked(self) -> None:
        while self._queue and len(self._active) < self.config.max_active:
            if self.config.max_batch > 1 and self._batch_wait_left() > 0:
                return  # give the batch a moment to fill, as Triton's max_queue_delay does
            size = min(self.config.max_batch, self.config.max_active - len(self._active), len(self._queue))
            rows = [self._queue.popleft() for _ in range(size)]
            now = time.monotonic()
            for req in rows:
                req.started_at = now
                req.stats.queue_wait_s = now - req.submitted_at
                self._active.append(req)
            self._groups.append(self._new_group(rows))

    def _new_group(self, rows: list[_Request]) -> _Group:
        """Left-pad the prompts of `rows` into one batch."""
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.loaded.pad_token_id or 0
        device = self.loaded.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long, device=device)
            attention[i, width - n :] = True
        return _Group(rows=rows, attention=attention, pending=ids)

    def _reap_locked(self) -> None:
        """End queued requests that were cancelled or ran out of time while waiting."""
        now = time.monotonic()
        for req in list(self._queue):
            reason = self._interrupt_reason(req, now)
            if reason is not None:
                self._queue.remove(req)
                self._finish(req, reason)

    @staticmethod
    def _interrupt_reason(req: _Request, now: float) -> StopReason | None:
        if req.cancelled.is_set():
            return StopReason.CANCELLED
        if req.deadline is not None and now >= req.deadline:
            return StopReason.DEADLINE
        return None

    def _turn(self, group: _Group) -> None:
        """One unit of work for one group, with every failure contained to that group."""
        now = time.monotonic()
        for req in group.rows:
            reason = self._interrupt_reason(req, now)
            if reason is not None:
                self._finish(req, reason)
        try:
            with torch.inference_mode():
                self._drop_finished_rows(group)
                if not group.rows:
                    pass
                elif group.canvas is None:
                    self._encode(group)
                else:
                    self._denoise(group)
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
            with self._cond:
                self._groups.remove(group)

    def _drop_finished_rows(self, group: _Group) -> None:
        """Remove ended requests from the batch: their rows of every tensor and of the cache."""
        keep = [i for i, r in enumerate(group.rows) if not r.done]
        if len(keep) == len(group.rows):
            return
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        group.attention = group.attention[index]
        if group.pending is not None:
            group.pending = group.pending[index]
        if group.cache is not None:
            group.cache.batch_select_indices(index)
        if group.canvas is not None:
            assert group.argmax is not None
            group.canvas, group.argmax = group.canvas[index], group.argmax[index]
            if group.self_conditioning is not None:
                group.self_conditioning = group.self_conditioning[index]
            group.mask_mapping = self._decoder_mask(group)

    def _encode(self, group: _Group) -> None:
        """Put the pending tokens into the group's cache and start a fresh noisy canvas for each row."""
        model = self.loaded.model
        device = self.loaded.device
        assert group.pending is not None
        started = time.perf_counter()
        batch, seq_len = len(group.rows), group.seq_len
        if group.cache is None:
            group.cache = model._prepare_cache_for_generation(
                generation_config=model.generation_config, batch_size=batch, max_length=seq_len
            )
        positions = torch.arange(seq_len - group.pending.shape[1], seq_len, dtype=torch.int32, device=device)
        positions = positions.unsqueeze(0)
        ids, mask = model._prepare_encoder_inputs(
            input_ids=group.pending,
            attention_mask=group.attention,
            encoder_position_ids=positions,
            past_key_values=group.cache,
            is_prefill=True,
            canvas_length=self.canvas_length,
            batch_size=batch,
        )
        out = model.model.encoder(
            input_ids=ids, attention_mask=mask, past_key_values=group.cache, position_ids=positions
        )
        group.cache = out.past_key_values
        group.pending = None
        self._start_canvas(group)
        self._record_step("encoder", time.perf_counter() - started)

    def _start_canvas(self, group: _Group) -> None:
        length, device = self.canvas_length, self.loaded.device
        rows = [
            torch.randint(0, self.loaded.vocab_size, (length,), generator=r.generator, device=device, dtype=torch.long)
            for r in group.rows
        ]
        group.canvas = torch.stack(rows)
        group.argmax = group.canvas
        group.self_conditioning = None
        seq_len = group.seq_len
        group.positions = torch.arange(seq_len, seq_len + length, dtype=torch.int32, device=device).unsqueeze(0)
        group.mask_mapping = self._decoder_mask(group)
        for req in group.rows:
            req.stats.encoder_passes += 1
            req.remaining = req.params.max_denoising_steps
            req.canvas_done = False
            req.stability.reset()

    def _decoder_mask(self, group: _Group) -> Any:
        assert group.canvas is not None
        model = self.loaded.model
        decoder_attention = torch.nn.functional.pad(group.attention, (0, self.canvas_length), value=True)
        return model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config,
            inputs_embeds=group.canvas.unsqueeze(-1),
            past_key_values=group.cache,
            decoder_attention_mask=decoder_attention,
        )

    def _denoise(self, group: _Group) -> None:
        """One denoising step for every row whose canvas is still going; commit when all have stopped."""
        assert group.canvas is not None and group.argmax is not None
        model = self.loaded.model
        started = time.perf_counter()
        out = model(
            decoder_input_ids=group.canvas,
            self_conditioning_logits=group.self_conditioning,
            decoder_attention_mask=group.mask_mapping,
            past_key_values=group.cache,
            decoder_position_ids=group.positions,
        )
        if self._debug_step_delay_s > 0:  # TEST ONLY: a slow worker, measured like a slow GPU
            time.sleep(self._debug_step_delay_s)
        self.counters.decoder_forward_s += time.perf_counter() - started
        going = [i for i, r in enumerate(group.rows) if not r.canvas_done]
        rows = [group.rows[i] for i in going]
        device = group.canvas.device
        index = torch.tensor(going, dtype=torch.long, device=device)
        whole = len(going) == len(group.rows)
        logits = out.logits if whole else out.logits[index]
        step = denoise_step(
            logits,
            group.canvas if whole else group.canvas[index],
            temperatures=torch.tensor(
                [temperature(r.params.t_min, r.params.t_max, r.remaining, r.params.max_denoising_steps) for r in rows],
                device=device,
            ),
            entropy_bounds=torch.tensor([r.params.entropy_bound for r in rows], device=device),
            vocab_size=self.loaded.vocab_size,
            generators=[r.generator for r in rows],
            overwrite_logits=True,
            scratch=self._scratch_like(logits),
        )
        sc_dtype = model.model.decoder.embed_tokens.weight.dtype
        if whole:
            group.canvas, group.argmax = step.next_canvas, step.argmax_canvas
            group.self_conditioning = step.processed_logits.to(sc_dtype)
        else:
            # Rows whose canvas has stopped keep their canvas and self-conditioning, as in stock batches.
            assert group.self_conditioning is not None
            group.canvas[index] = step.next_canvas
            group.argmax[index] = step.argmax_canvas
            group.self_conditioning[index] = step.processed_logits.to(sc_dtype)
        for j, req in enumerate(rows):
            req.remaining -= 1
            req.stats.decoder_passes += 1
            stop = req.stability.update(step.argmax_canvas[j], step.entropy[j])
            req.canvas_done = stop or req.remaining == 0
        self._record_step("decoder", time.perf_counter() - started)
        if all(r.canvas_done for r in group.rows):
            self._commit(group)
            return
        for i in going:
            if group.rows[i].params.stream_drafts and not group.rows[i].canvas_done:
                self._maybe_draft(group.rows[i], group.argmax[i])

    def _scratch_like(self, logits: torch.Tensor) -> torch.Tensor:
        """A (B, L, V) work buffer reused across steps, one per shape: with batching, groups of different
        sizes take turns, and a single buffer would be reallocated at every turn."""
        key = (tuple(logits.shape), logits.dtype)
        buffer = self._scratch.get(key)
        if buffer is None:
            if len(self._scratch) >= self.config.max_batch + 1:
                self._scratch.clear()  # bounded: at most one buffer per batch size (plus one spare)
            buffer = self._scratch[key] = torch.empty_like(logits)
        return buffer

    def _maybe_draft(self, req: _Request, argmax: torch.Tensor) -> None:
        now = time.monotonic()
        if now - req.last_draft_at < req.params.draft_interval_s:
            return
        req.last_draft_at = now
        room = req.params.max_new_tokens - len(req.generated)
        ids = tuple(argmax[:room].tolist())
        step = req.params.max_denoising_steps - req.remaining
        self._emit(req, DraftEvent(req.stats.canvases, step, ids, self.detokenize(ids)))

    def _commit(self, group: _Group) -> None:
        """Commit every row's argmax canvas; the rows that go on feed theirs to the encoder next."""
        assert group.argmax is not None
        canvases = group.argmax
        for i, req in enumerate(group.rows):
            self._commit_row(req, canvases[i].tolist())
        group.pending = canvases
        group.attention = torch.nn.functional.pad(group.attention, (0, self.canvas_length), value=True)
        group.canvas = group.argmax = group.self_conditioning = group.mask_mapping = None
        self._drop_finished_rows(group)

    def _commit_row(self, req: _Request, canvas_ids: list[int]) -> None:
        """Append one row's canvas (cut at EOS, stop string or the token budget) and emit it."""
        req.stats.canvases += 1
        room = req.params.max_new_tokens - len(req.generated)
        kept, reason = cut_canvas(canvas_ids, room, () if req.params.ignore_eos else self.loaded.eos_token_ids)
        req.generated.extend(kept)
        delta, hit_stop = req.text.push(req.generated, final=reason is not None)
        if hit_stop:
            reason = StopReason.STOP_STRING
        now = time.monotonic()
        if req.stats.time_to_first_commit_s is None:
            req.stats.time_to_first_commit_s = now - req.submitted_at
        req.stats.completion_tokens = len(req.generated)
        self._meter.add_tokens(now, len(kept))
        self.counters.tokens_generated += len(kept)
        self._emit(req, CommitEvent(req.stats.canvases - 1, tuple(kept), delta))
        if reason is not None:
            self._finish(req, reason)

    def _finish(
        self, req: _Request, reason: StopReason, error: str | None = None, kind: str | None = None
    ) -> None:
        """Account for a finished request and free its slot, then send its final event."""
        if req.done:
            return
        req.done = True
        stats = req.stats
        stats.total_s = time.monotonic() - req.submitted_at
        outcome = reason.value
        # Bookkeeping before the final event, so whoever sees the event sees the slot free and counted.
        with self._cond:
            self.counters.requests_by_outcome[outcome] = self.counters.requests_by_outcome.get(outcome, 0) + 1
            if req in self._active:
                self._active.remove(req)
            self._cond.notify_all()
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


def cut_canvas(canvas_ids: list[int], room: int, eos_ids: Sequence[int]) -> tuple[list[int], StopReason | None]:
    """The part of a committed canvas to keep: up to the first EOS (excluded) and within `room` tokens."""
    eos = set(eos_ids)
    for i, tok in enumerate(canvas_ids[:room]):
        if tok in eos:
            return canvas_ids[:i], StopReason.EOS
    if room <= len(canvas_ids):
        return canvas_ids[:room], StopReason.LENGTH
    return canvas_ids, None
