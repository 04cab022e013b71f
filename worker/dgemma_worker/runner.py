"""The step runner: the tensors of a batch of requests and the model calls that advance them.

It drives transformers 5.23's private DiffusionGemma helpers (`_prepare_cache_for_generation`,
`_prepare_encoder_inputs`, the decoder's `create_diffusion_decoder_attention_mask`) one unit at a time:
`encode` puts a batch's uncached tokens into its KV cache and starts fresh canvases; `denoise` runs one
denoising step. It knows nothing of queues, events or text: the engine decides what runs when, and what
a finished canvas means for each request.

A denoising step makes no host-device synchronization but one: per-row settings, step counters, the
stop rule's history and the random draws all live on the device (`sampling.py` is pure tensor math), and
each step copies its per-row "done" flags to the host without blocking; the next step of the batch reads
them. Per canvas (not per step) the committed tokens come to the host, drafts do when asked for, and on
CUDA the host waits for the encoder pass once, to time it (`DeviceTimer`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from dgemma_common.params import GenerationParams

from .model import LoadedModel
from .sampling import denoise_step, stop_rule, temperatures
from .vision import VisionInputs, batch_vision


def decoder_logits(
    model: Any,
    canvas: torch.Tensor,
    self_conditioning: torch.Tensor | None,
    self_conditioning_mask: torch.Tensor | None,
    masks: Any,
    cache: Any,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One decoder forward through transformers' own entry (self-conditioning included): fp32 logits."""
    out = model(
        decoder_input_ids=canvas,
        self_conditioning_logits=self_conditioning,
        self_conditioning_mask=self_conditioning_mask,
        decoder_attention_mask=masks,
        past_key_values=cache,
        decoder_position_ids=positions,
    )
    logits: torch.Tensor = out.logits
    return logits


@dataclass(frozen=True)
class RowSpec:
    """What the runner needs of one request: its prompt, settings and random generator."""

    prompt_ids: Sequence[int]
    params: GenerationParams
    generator: torch.Generator
    vision: VisionInputs | None = None  # the prompt's images, for the first encoder pass


@dataclass
class _Row:
    params: GenerationParams
    generator: torch.Generator
    steps_taken: int = 0  # in the current canvas; a host mirror of the device counters, for drafts


class RowState:
    """The device side of a batch's rows: settings, counters, stop-rule history, random draws, flags."""

    def __init__(self, rows: Sequence[_Row], canvas_length: int, device: torch.device) -> None:
        def column(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)  # once per batch, not per step

        params = [r.params for r in rows]
        self.t_min = column([p.t_min for p in params], torch.float64)
        self.t_max = column([p.t_max for p in params], torch.float64)
        self.max_steps = column([p.max_denoising_steps for p in params], torch.float64)
        self.entropy_bound = column([p.entropy_bound for p in params], torch.float32)
        self.stability = column([p.stability_threshold for p in params], torch.long)
        self.confidence = column([p.confidence_threshold for p in params], torch.float32)
        self.initial_steps = column([p.max_denoising_steps for p in params], torch.long)
        size, depth = len(rows), max(p.stability_threshold for p in params)
        self.remaining = torch.zeros(size, dtype=torch.long, device=device)
        self.done = torch.zeros(size, dtype=torch.bool, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.history = torch.full((depth, size, canvas_length), -1, dtype=torch.long, device=device)
        self.uniforms = torch.empty(size, canvas_length, dtype=torch.float32, device=device)
        self.noise = torch.empty(size, canvas_length, dtype=torch.long, device=device)
        pinned = device.type == "cuda"
        self.done_host = torch.zeros(size, dtype=torch.bool, pin_memory=pinned)
        self._event = torch.cuda.Event() if pinned else None
        self._flags_pending = False

    def start_canvas(self) -> None:
        """Reset the counters and the history for a fresh canvas (device ops only)."""
        self.remaining.copy_(self.initial_steps)
        self.done.zero_()
        self.step.zero_()
        self.history.fill_(-1)
        self.done_host.zero_()
        self._flags_pending = False

    def queue_flags(self) -> None:
        """Start copying the done flags to the host; `read_flags` waits for the copy."""
        self.done_host.copy_(self.done, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._flags_pending = True

    def read_flags(self) -> list[bool]:
        """The done flags as of the last queued step: the step's one host sync."""
        if self._flags_pending and self._event is not None:
            self._event.synchronize()
        self._flags_pending = False
        return [bool(f) for f in self.done_host.tolist()]

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows at `index` (a device tensor of row numbers)."""
        for name in ("t_min", "t_max", "max_steps", "entropy_bound", "stability", "confidence", "initial_steps",
                     "remaining", "done", "uniforms", "noise"):
            setattr(self, name, getattr(self, name)[index])
        self.history = self.history[:, index]
        keep = index.cpu()
        self.done_host = self.done_host[keep].pin_memory() if self._event is not None else self.done_host[keep]


@dataclass(eq=False)
class Batch:
    """Requests that share forward passes: one row each (one row unless batching).

    Rows are left-padded to a common length, which is exact with an attention mask; every row adds one
    canvas per round, so they stay aligned. A row that ends is dropped from the batch (and its cache).
    """

    rows: list[_Row]
    state: RowState
    attention: torch.Tensor  # (B, seq_len) bool: False on left padding
    pending: torch.Tensor | None  # (B, n) tokens not yet in the cache
    vision: list[VisionInputs | None] | None = None  # per row, until the first encoder pass has taken them
    cache: Any = None
    canvas: torch.Tensor | None = None  # (B, L) the noisy canvas fed to the next step
    argmax: torch.Tensor | None = None  # (B, L) the current drafts
    self_conditioning: torch.Tensor | None = None  # (B, L, V)
    mask_mapping: Any = None
    positions: torch.Tensor | None = None  # (1, L)
    going: list[bool] = field(default_factory=list)  # host view: rows that took part in the last step
    slot: Any = None  # the static-shape step's persistent tensors (static.Slot), when compiled

    @property
    def seq_len(self) -> int:
        return int(self.attention.shape[1])

    @property
    def needs_encoding(self) -> bool:
        """True when the next unit of work is an encoder pass (a new prompt or a committed canvas)."""
        return self.pending is not None


class DeviceTimer:
    """The time the work queued on `device` inside a `with` block takes to run (`seconds`, once it exits).

    On a CPU the wall clock: operations have run when they return. On CUDA they are only queued, so the wall
    clock would time their launches: two events on the device's stream bracket the work instead, and the
    exit waits for the second one. That wait is a host sync: time only what happens once per canvas.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._started = 0.0

    def __enter__(self) -> DeviceTimer:
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record(torch.cuda.current_stream(self.device))
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._events is None:
            self.seconds = time.perf_counter() - self._started
        elif kind is None:  # after an error the work's time does not matter: no wait
            start, end = self._events
            end.record(torch.cuda.current_stream(self.device))
            end.synchronize()
            self.seconds = start.elapsed_time(end) / 1000  # milliseconds


@dataclass(frozen=True)
class EncodeReport:
    """What a call to `encode` did: the tokens it encoded per row, and the pass's time on the device."""

    tokens: int
    seconds: float


@dataclass(frozen=True)
class StepReport:
    """What a call to `denoise` did: which rows stepped, and the decoder forward's host time."""

    stepped: list[int]
    forward_s: float


@dataclass
class StepRunner:
    """Advances batches on one loaded model; owns the reusable work buffers of the step."""

    loaded: LoadedModel
    max_batch: int = 1
    _work: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def canvas_length(self) -> int:
        return self.loaded.canvas_length

    @property
    def self_conditioning_dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.loaded.model.model.decoder.embed_tokens.weight.dtype
        return dtype

    def new_batch(self, rows: Sequence[RowSpec]) -> Batch:
        """Left-pad the prompts of `rows` into one batch, waiting for its first encoder pass."""
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.loaded.pad_token_id or 0
        device = self.loaded.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(list(r.prompt_ids), dtype=torch.long)
            attention[i, width - n :] = True
        states = [_Row(r.params, r.generator) for r in rows]
        vision = [r.vision for r in rows] if any(r.vision is not None for r in rows) else None
        return Batch(
            rows=states,
            state=RowState(states, self.canvas_length, device),
            attention=attention.to(device),
            pending=ids.to(device),
            vision=vision,
        )

    def keep_rows(self, batch: Batch, keep: list[int]) -> None:
        """Keep only the rows at `keep` (in order): their rows of every tensor and of the cache."""
        if len(keep) == len(batch.rows):
            return
        batch.rows = [batch.rows[i] for i in keep]
        batch.going = [batch.going[i] for i in keep] if batch.going else []
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        batch.state.select(index)
        batch.attention = batch.attention[index]
        if batch.pending is not None:
            batch.pending = batch.pending[index]
        if batch.vision is not None:
            batch.vision = [batch.vision[i] for i in keep]
        if batch.cache is not None:
            batch.cache.batch_select_indices(index)
        if batch.canvas is not None:
            assert batch.argmax is not None
            batch.canvas, batch.argmax = batch.canvas[index], batch.argmax[index]
            if batch.self_conditioning is not None:
                batch.self_conditioning = batch.self_conditioning[index]
            batch.mask_mapping = self._decoder_mask(batch)

    def encode(self, batch: Batch) -> EncodeReport:
        """Put the pending tokens into the batch's cache and start a fresh noisy canvas for each row. The
        prompt's images go into the first pass only."""
        assert batch.pending is not None
        tokens = int(batch.pending.shape[1])
        with DeviceTimer(self.loaded.device) as timer:
            self._encode(batch)
        return EncodeReport(tokens, timer.seconds)

    def _encode(self, batch: Batch) -> None:
        model = self.loaded.model
        assert batch.pending is not None
        size, seq_len = len(batch.rows), batch.seq_len
        vision = batch_vision(batch.vision, batch.pending.shape[1], self.loaded.device) if batch.vision else {}
        batch.vision = None
        if batch.cache is None:
            batch.cache = self._new_cache(batch)
        positions = torch.arange(
            seq_len - batch.pending.shape[1], seq_len, dtype=torch.int32, device=self.loaded.device
        ).unsqueeze(0)
        ids, mask = model._prepare_encoder_inputs(
            input_ids=batch.pending,
            attention_mask=batch.attention,
            encoder_position_ids=positions,
            past_key_values=batch.cache,
            is_prefill=True,
            canvas_length=self.canvas_length,
            batch_size=size,
            **vision,
        )
        out = model.model.encoder(
            input_ids=ids, attention_mask=mask, past_key_values=batch.cache, position_ids=positions, **vision
        )
        batch.cache = out.past_key_values
        batch.pending = None
        self._start_canvas(batch)

    def _new_cache(self, batch: Batch) -> Any:
        """The KV cache a batch's encoder fills and its decoder reads: transformers' DynamicCache."""
        model = self.loaded.model
        return model._prepare_cache_for_generation(
            generation_config=model.generation_config, batch_size=len(batch.rows), max_length=batch.seq_len
        )

    def _start_canvas(self, batch: Batch) -> None:
        length, device, vocab = self.canvas_length, self.loaded.device, self.loaded.vocab_size
        canvas = torch.empty(len(batch.rows), length, dtype=torch.long, device=device)
        for i, row in enumerate(batch.rows):
            torch.randint(0, vocab, (length,), generator=row.generator, device=device, out=canvas[i])
            row.steps_taken = 0
        batch.canvas = batch.argmax = canvas
        batch.self_conditioning = None
        seq_len = batch.seq_len
        batch.positions = torch.arange(seq_len, seq_len + length, dtype=torch.int32, device=device).unsqueeze(0)
        batch.mask_mapping = self._decoder_mask(batch)
        batch.state.start_canvas()
        self._canvas_started(batch)

    def _canvas_started(self, batch: Batch) -> None:
        """A hook for runners that keep the step's tensors elsewhere (a fresh canvas is in `batch`)."""

    def _decoder_mask(self, batch: Batch) -> Any:
        assert batch.canvas is not None
        model = self.loaded.model
        decoder_attention = torch.nn.functional.pad(batch.attention, (0, self.canvas_length), value=True)
        return model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config,
            inputs_embeds=batch.canvas.unsqueeze(-1),
            past_key_values=batch.cache,
            decoder_attention_mask=decoder_attention,
        )

    def set_canvas(self, batch: Batch, canvas: torch.Tensor) -> None:
        """Replace the batch's noisy canvas (B, L), e.g. to compare paths on the same input."""
        batch.canvas = batch.argmax = canvas
        batch.mask_mapping = self._decoder_mask(batch)

    def decoder_forward(self, batch: Batch) -> torch.Tensor:
        """The decoder's logits (B, L, V, float32) for the batch's current canvas and self-conditioning."""
        assert batch.canvas is not None and batch.positions is not None
        return decoder_logits(self.loaded.model, batch.canvas, batch.self_conditioning, None, batch.mask_mapping,
                              batch.cache, batch.positions)

    def _draw(self, batch: Batch) -> None:
        """This step's random numbers, each row from its own generator (launches only, no sync)."""
        state, vocab = batch.state, self.loaded.vocab_size
        for i, row in enumerate(batch.rows):
            torch.rand(self.canvas_length, generator=row.generator, device=state.uniforms.device,
                       out=state.uniforms[i])
            torch.randint(0, vocab, (self.canvas_length,), generator=row.generator, device=state.noise.device,
                          out=state.noise[i])

    def settle(self, batch: Batch) -> list[bool]:
        """Which rows are still going, from the done flags of the batch's previous step: the one host
        sync per step (the flags were copied to the host without blocking when that step was queued)."""
        batch.going = [not done for done in batch.state.read_flags()]
        return batch.going

    def denoise(self, batch: Batch) -> StepReport:
        """One denoising step for the rows `settle` found going (call it first); everything on the device."""
        assert batch.canvas is not None and batch.argmax is not None
        state, going = batch.state, batch.going
        started = time.perf_counter()
        logits = self.decoder_forward(batch)
        forward_s = time.perf_counter() - started
        self._draw(batch)
        step = denoise_step(
            logits,
            temperatures=temperatures(state.t_min, state.t_max, state.remaining, state.max_steps),
            entropy_bounds=state.entropy_bound,
            uniforms=state.uniforms,
            noise=state.noise,
            work=self._work_buffer(logits),
        )
        next_canvas, argmax, self_conditioning = step.next_canvas, step.argmax_canvas, step.self_conditioning
        if not all(going):
            # Rows whose canvas has stopped ride along frozen until the batch commits, as in stock batches.
            frozen = state.done.view(-1, 1)  # the device copy of the flags: no host-to-device copy
            next_canvas = torch.where(frozen, batch.canvas, next_canvas)
            argmax = torch.where(frozen, batch.argmax, argmax)
            if batch.self_conditioning is not None:
                self_conditioning = torch.where(frozen.unsqueeze(-1), batch.self_conditioning, self_conditioning)
        stop = stop_rule(state.history, state.step, argmax, step.entropy, state.stability, state.confidence)
        moving = ~state.done
        state.remaining.sub_(moving.long())
        state.done.logical_or_(moving & (stop | (state.remaining == 0)))
        state.step.add_(1)
        self._keep_step(batch, next_canvas, argmax, self_conditioning)
        state.queue_flags()
        stepped = [i for i, g in enumerate(going) if g]
        for i in stepped:
            batch.rows[i].steps_taken += 1
        return StepReport(stepped, forward_s)

    def _keep_step(
        self, batch: Batch, canvas: torch.Tensor, argmax: torch.Tensor, self_conditioning: torch.Tensor
    ) -> None:
        """Keep a step's results as the batch's next inputs."""
        batch.canvas, batch.argmax = canvas, argmax
        batch.self_conditioning = self_conditioning.to(self.self_conditioning_dtype)

    def steps_done(self, batch: Batch, i: int) -> int:
        """Denoising steps row `i` has taken in its current canvas."""
        return batch.rows[i].steps_taken

    def draft(self, batch: Batch, i: int, room: int) -> list[int]:
        """Row `i`'s current argmax canvas (its draft), cut to `room` tokens, on the host (a sync)."""
        assert batch.argmax is not None
        return list(batch.argmax[i, :room].tolist())

    def finish_canvas(self, batch: Batch) -> list[list[int]]:
        """Every row's committed (argmax) canvas on the host; the canvases become the next encoder input."""
        assert batch.argmax is not None
        canvases = batch.argmax
        batch.pending = canvases
        batch.attention = torch.nn.functional.pad(batch.attention, (0, self.canvas_length), value=True)
        batch.canvas = batch.argmax = batch.self_conditioning = batch.mask_mapping = None
        return [list(row) for row in canvases.tolist()]

    def _work_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """A (B, L, V) work buffer reused across steps, per batch shape: with batching, groups of
        different sizes take turns, and one buffer would be reallocated at every turn."""
        key = tuple(logits.shape)
        work = self._work.get(key)
        if work is None:
            if len(self._work) >= self.max_batch + 1:
                self._work.clear()  # bounded: at most one buffer per batch size (plus one spare)
            work = self._work[key] = torch.empty_like(logits)
        return work


@dataclass
class DelayedStepRunner(StepRunner):
    """A runner that behaves like a slower GPU: each decoder forward takes `delay_s` longer.

    For tests and benchmarks that need slow workers on a fast machine (queues that form, latency targets
    that only a faster variant meets). It is chosen when the worker loads (`--debug-step-delay-s`), so the
    step loop itself has no test-only branch.
    """

    delay_s: float = 0.0

    def decoder_forward(self, batch: Batch) -> torch.Tensor:
        logits = super().decoder_forward(batch)
        time.sleep(self.delay_s)
        return logits
