"""The step runner: the tensors of a batch of requests and the model calls that advance them.

It drives transformers 5.23's private DiffusionGemma helpers (`_prepare_cache_for_generation`,
`_prepare_encoder_inputs`, the decoder's `create_diffusion_decoder_attention_mask`) one unit at a time:
`encode` puts a batch's uncached tokens into its KV cache and starts fresh canvases; `denoise` runs one
denoising step. It knows nothing of queues, events or text: the engine decides what runs when, and what
a finished canvas means for each request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dgemma_common.params import GenerationParams

from .model import LoadedModel
from .sampling import StabilityTracker, denoise_step, temperature


@dataclass(frozen=True)
class RowSpec:
    """What the runner needs of one request: its prompt, settings and random generator."""

    prompt_ids: Sequence[int]
    params: GenerationParams
    generator: torch.Generator


@dataclass
class _Row:
    params: GenerationParams
    generator: torch.Generator
    stability: StabilityTracker
    remaining: int = 0  # denoising steps left in the current canvas: N..1, as transformers counts them
    canvas_done: bool = False  # this row's canvas has stopped; it rides along until the whole batch has


@dataclass(eq=False)
class Batch:
    """Requests that share forward passes: one row each (one row unless batching).

    Rows are left-padded to a common length, which is exact with an attention mask; every row adds one
    canvas per round, so they stay aligned. A row that ends is dropped from the batch (and its cache).
    """

    rows: list[_Row]
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

    @property
    def needs_encoding(self) -> bool:
        """True when the next unit of work is an encoder pass (a new prompt or a committed canvas)."""
        return self.pending is not None


@dataclass(frozen=True)
class StepReport:
    """What one denoising step did: which rows stepped, and whether every row's canvas has stopped."""

    stepped: list[int]
    canvas_done: bool
    forward_s: float


@dataclass
class StepRunner:
    """Advances batches on one loaded model; owns the reusable work buffers of the step."""

    loaded: LoadedModel
    max_batch: int = 1
    _scratch: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = field(default_factory=dict)

    @property
    def canvas_length(self) -> int:
        return self.loaded.canvas_length

    def new_batch(self, rows: Sequence[RowSpec]) -> Batch:
        """Left-pad the prompts of `rows` into one batch, waiting for its first encoder pass."""
        width = max(len(r.prompt_ids) for r in rows)
        pad = self.loaded.pad_token_id or 0
        device = self.loaded.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(list(r.prompt_ids), dtype=torch.long, device=device)
            attention[i, width - n :] = True
        states = [
            _Row(r.params, r.generator, StabilityTracker(r.params.stability_threshold, r.params.confidence_threshold))
            for r in rows
        ]
        return Batch(rows=states, attention=attention, pending=ids)

    def keep_rows(self, batch: Batch, keep: list[int]) -> None:
        """Keep only the rows at `keep` (in order): their rows of every tensor and of the cache."""
        if len(keep) == len(batch.rows):
            return
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        batch.attention = batch.attention[index]
        if batch.pending is not None:
            batch.pending = batch.pending[index]
        if batch.cache is not None:
            batch.cache.batch_select_indices(index)
        if batch.canvas is not None:
            assert batch.argmax is not None
            batch.canvas, batch.argmax = batch.canvas[index], batch.argmax[index]
            if batch.self_conditioning is not None:
                batch.self_conditioning = batch.self_conditioning[index]
            batch.mask_mapping = self._decoder_mask(batch)

    def encode(self, batch: Batch) -> None:
        """Put the pending tokens into the batch's cache and start a fresh noisy canvas for each row."""
        model = self.loaded.model
        assert batch.pending is not None
        size, seq_len = len(batch.rows), batch.seq_len
        if batch.cache is None:
            batch.cache = model._prepare_cache_for_generation(
                generation_config=model.generation_config, batch_size=size, max_length=seq_len
            )
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
        )
        out = model.model.encoder(
            input_ids=ids, attention_mask=mask, past_key_values=batch.cache, position_ids=positions
        )
        batch.cache = out.past_key_values
        batch.pending = None
        self._start_canvas(batch)

    def _start_canvas(self, batch: Batch) -> None:
        length, device = self.canvas_length, self.loaded.device
        noise = [
            torch.randint(0, self.loaded.vocab_size, (length,), generator=r.generator, device=device, dtype=torch.long)
            for r in batch.rows
        ]
        batch.canvas = torch.stack(noise)
        batch.argmax = batch.canvas
        batch.self_conditioning = None
        seq_len = batch.seq_len
        batch.positions = torch.arange(seq_len, seq_len + length, dtype=torch.int32, device=device).unsqueeze(0)
        batch.mask_mapping = self._decoder_mask(batch)
        for row in batch.rows:
            row.remaining = row.params.max_denoising_steps
            row.canvas_done = False
            row.stability.reset()

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
        """The decoder's logits (B, L, V) for the batch's current canvas and self-conditioning."""
        out = self.loaded.model(
            decoder_input_ids=batch.canvas,
            self_conditioning_logits=batch.self_conditioning,
            decoder_attention_mask=batch.mask_mapping,
            past_key_values=batch.cache,
            decoder_position_ids=batch.positions,
        )
        logits: torch.Tensor = out.logits
        return logits

    def denoise(self, batch: Batch) -> StepReport:
        """One denoising step for every row whose canvas is still going."""
        assert batch.canvas is not None and batch.argmax is not None
        started = time.perf_counter()
        all_logits = self.decoder_forward(batch)
        forward_s = time.perf_counter() - started
        going = [i for i, r in enumerate(batch.rows) if not r.canvas_done]
        rows = [batch.rows[i] for i in going]
        device = batch.canvas.device
        index = torch.tensor(going, dtype=torch.long, device=device)
        whole = len(going) == len(batch.rows)
        logits = all_logits if whole else all_logits[index]
        step = denoise_step(
            logits,
            batch.canvas if whole else batch.canvas[index],
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
        sc_dtype = self.loaded.model.model.decoder.embed_tokens.weight.dtype
        if whole:
            batch.canvas, batch.argmax = step.next_canvas, step.argmax_canvas
            batch.self_conditioning = step.processed_logits.to(sc_dtype)
        else:
            # Rows whose canvas has stopped keep their canvas and self-conditioning, as in stock batches.
            assert batch.self_conditioning is not None
            batch.canvas[index] = step.next_canvas
            batch.argmax[index] = step.argmax_canvas
            batch.self_conditioning[index] = step.processed_logits.to(sc_dtype)
        for j, row in enumerate(rows):
            row.remaining -= 1
            stop = row.stability.update(step.argmax_canvas[j], step.entropy[j])
            row.canvas_done = stop or row.remaining == 0
        return StepReport(going, all(r.canvas_done for r in batch.rows), forward_s)

    def row_going(self, batch: Batch, i: int) -> bool:
        """True while row `i`'s canvas is still being denoised."""
        return not batch.rows[i].canvas_done

    def steps_done(self, batch: Batch, i: int) -> int:
        """Denoising steps row `i` has taken in its current canvas."""
        row = batch.rows[i]
        return row.params.max_denoising_steps - row.remaining

    def draft(self, batch: Batch, i: int, room: int) -> list[int]:
        """Row `i`'s current argmax canvas (its draft), cut to `room` tokens, on the host."""
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

    def _scratch_like(self, logits: torch.Tensor) -> torch.Tensor:
        """A (B, L, V) work buffer reused across steps, one per shape: with batching, groups of different
        sizes take turns, and a single buffer would be reallocated at every turn."""
        key = (tuple(logits.shape), logits.dtype)
        buffer = self._scratch.get(key)
        if buffer is None:
            if len(self._scratch) >= self.max_batch + 1:
                self._scratch.clear()  # bounded: at most one buffer per batch size (plus one spare)
            buffer = self._scratch[key] = torch.empty_like(logits)
        return buffer


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
