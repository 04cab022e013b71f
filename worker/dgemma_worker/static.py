"""The static-shape decoder step (`--compile`): a preallocated KV cache in length buckets, persistent step
buffers, and one compiled decoder forward per bucket.

CUDA graphs (and `torch.compile(mode="reduce-overhead")`) need every tensor a step reads to keep its shape
and address from step to step. The engine's dynamic path has neither: transformers' `DynamicCache` grows
by concatenation, and the canvas, self-conditioning and masks are fresh tensors each step. Here:

- `PrefixCache` keeps the encoder's keys and values in storage allocated once for a bucket's capacity
  (full-attention layers) or the window (sliding layers), and is written in place. To the encoder it
  behaves exactly like a `DynamicCache` (same tensors returned, same mask sizes); to the decoder it is a
  compileable cache, so transformers' `append_to_cache` takes its static branch: a fixed-size
  (capacity + canvas) key/value tensor per layer, whatever the prompt's length.
- Sliding layers keep the last `window - 1` tokens, as the dynamic cache does (transformers' own
  `StaticSlidingWindowLayer` keeps `window` and, past the window, puts the canvas over the cached tokens
  in the decoder: its static `generate()` then differs from its dynamic one), right-aligned, so the
  canvas always lands right after them.
- The decoder's 4-D masks are built here per canvas (the prefix changes once per canvas, not per step)
  and say exactly which keys the dynamic path attends to: the non-padding prefix (for sliding layers,
  its last `window - 1` tokens) and the canvas.
- A `Slot` is the persistent set of a batch's step tensors (cache, canvas, self-conditioning and its
  per-row on/off mask, positions, masks) for one (rows, bucket) shape. Slots are pooled and reused by
  later requests, so their addresses stay put and a captured CUDA graph is replayed, not re-recorded.
- The first step of a canvas has no self-conditioning; instead of a second graph for `None`, the decoder's
  own `self_conditioning_mask` zeroes the signal for rows whose mask is False.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .model import LoadedModel
from .runner import Batch, StepRunner, decoder_logits

log = logging.getLogger(__name__)

# Capacities (prefix tokens a batch's cache holds) that the compiled step is built for: powers of two.
# A batch takes the smallest that holds its prompt and the canvases it may commit; beyond the largest it
# runs the dynamic (eager) step. Each bucket used costs one compilation (and one CUDA graph per slot).
BUCKETS = tuple(2**i for i in range(8, 17))  # 256 .. 65536


def bucket_for(length: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket holding `length` prefix tokens, None when none does."""
    return next((b for b in sorted(buckets) if b >= length), None)


def compiled_by_default(flag: bool | None, device: torch.device) -> bool:
    """`--compile` as given, else on for CUDA and off on a CPU (where compiling takes minutes and gains
    little: no CUDA graphs, and the eager CPU kernels are already what inductor emits for the matmuls)."""
    return device.type == "cuda" if flag is None else flag


def compile_mode(device: torch.device) -> str:
    """`reduce-overhead` (inductor kernels replayed as CUDA graphs) on CUDA; plain inductor elsewhere,
    where CUDA graphs do not exist and the mode would do nothing more."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class FixedLayer(CacheLayerMixin):
    """One layer's keys and values in storage of `size` tokens, allocated on the first write and then
    only written in place (a compiled step reads it at a fixed address)."""

    is_compileable = True
    # Where the decoder puts the canvas: a device tensor (never a Python int, which a graph would bake in).
    cumulative_length: torch.Tensor  # type: ignore[assignment]
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.length = 0  # tokens written so far (the host's count; the encoder's masks read it)
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        def storage(like: torch.Tensor) -> torch.Tensor:
            b, heads, _, dim = like.shape
            return torch.zeros(b, heads, self.size, dim, dtype=like.dtype, device=like.device)

        self.keys, self.values = storage(key_states), storage(value_states)
        self.cumulative_length = self.cumulative_length.to(key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.size

    def reset(self) -> None:
        self.length = 0

    def take_rows(self, other: FixedLayer, index: torch.Tensor) -> None:
        """Rows `index` of `other` (the same layer of a larger batch) into this layer's storage."""
        if not other.is_initialized:
            return
        if not self.is_initialized:
            self.lazy_initialization(other.keys[index], other.values[index])
        self.keys.copy_(other.keys[index])
        self.values.copy_(other.values[index])
        self.length = other.length
        self.cumulative_length.copy_(other.cumulative_length)


class PrefixLayer(FixedLayer):
    """A full-attention layer: every prefix token at its position, up to a bucket's capacity."""

    is_sliding = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens after the prefix; return the whole prefix (what `DynamicLayer` returns)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.length, key_states.shape[-2]
        if start + n > self.size:
            raise ValueError(f"a prefix of {start + n} tokens exceeds the cache's capacity of {self.size}")
        self.keys[:, :, start : start + n].copy_(key_states)
        self.values[:, :, start : start + n].copy_(value_states)
        self.length = start + n
        self.cumulative_length.fill_(self.length)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.cumulative_length.zero_()


class WindowLayer(FixedLayer):
    """A sliding layer's last `window - 1` keys and values (what `DynamicSlidingWindowLayer` keeps),
    right-aligned in fixed storage: the decoder's canvas goes right after them."""

    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__(window - 1)
        self.cumulative_length.fill_(self.size)

    @property
    def kept(self) -> int:
        return min(self.length, self.size)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the kept tokens and the new ones (as the dynamic layer does), then keep the last ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.size - self.kept
        keys = torch.cat([self.keys[:, :, old:], key_states], dim=-2)
        values = torch.cat([self.values[:, :, old:], value_states], dim=-2)
        self.length += key_states.shape[-2]
        keep = self.kept
        self.keys[:, :, self.size - keep :].copy_(keys[:, :, -keep:])
        self.values[:, :, self.size - keep :].copy_(values[:, :, -keep:])
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # DynamicSlidingWindowLayer's, with its sliding_window = size + 1.
        window = self.size + 1
        kv_offset = max(self.length - window + 1, 0)
        if self.length >= window:
            return window - 1 + query_length, kv_offset
        return self.length + query_length, kv_offset


class PrefixCache(Cache):
    """The encoder's KV cache in fixed storage: dynamic-like while encoding, compileable while decoding."""

    def __init__(self, layer_types: Sequence[str], window: int, capacity: int) -> None:
        self.fixed: list[FixedLayer] = [
            WindowLayer(window) if kind == "sliding_attention" else PrefixLayer(capacity) for kind in layer_types
        ]
        super().__init__(layers=list(self.fixed))
        self.capacity = capacity
        # Read by transformers: False while encoding (the encoder's masks and skips then match a
        # DynamicCache's), True while decoding (append_to_cache's fixed-shape branch).
        self.decoding = False

    @property
    def is_compileable(self) -> bool:
        return self.decoding

    def reset(self) -> None:
        for layer in self.fixed:
            layer.reset()

    def take_rows(self, other: PrefixCache, index: torch.Tensor) -> None:
        """Rows `index` of `other` (same capacity, more rows) into this cache's storage."""
        for mine, theirs in zip(self.fixed, other.fixed, strict=True):
            mine.take_rows(theirs, index)

    def tensors(self) -> list[torch.Tensor]:
        """The storage a compiled step reads (for marking static addresses)."""
        return [t for layer in self.fixed if layer.is_initialized
                for t in (layer.keys, layer.values, layer.cumulative_length)]


def decoder_masks(
    attention: torch.Tensor, capacity: int, window_slots: int, canvas_length: int
) -> dict[str, torch.Tensor]:
    """Per layer type, a (B, 1, L, keys) bool mask of the keys the canvas attends to (True = attend).

    `attention` (B, P) marks the prefix's non-padding tokens. Full-attention layers see the prefix at
    [0, P) and the canvas at [P, P + L) of their capacity + L keys; sliding layers see the last
    window - 1 prefix tokens, right-aligned before the canvas at [slots, slots + L).
    """
    b, prefix = attention.shape
    length, device = canvas_length, attention.device
    full = torch.zeros(b, 1, length, capacity + length, dtype=torch.bool, device=device)
    full[:, 0, :, :prefix] = attention.unsqueeze(1)
    full[:, 0, :, prefix : prefix + length] = True
    kept = min(prefix, window_slots)
    sliding = torch.zeros(b, 1, length, window_slots + length, dtype=torch.bool, device=device)
    if kept:
        sliding[:, 0, :, window_slots - kept : window_slots] = attention[:, prefix - kept :].unsqueeze(1)
    sliding[:, 0, :, window_slots:] = True
    return {"full_attention": full, "sliding_attention": sliding}


@dataclass(eq=False)
class Slot:
    """The persistent tensors of a batch's decoder step for one (rows, bucket) shape."""

    rows: int
    capacity: int
    cache: PrefixCache
    canvas: torch.Tensor  # (B, L) long
    self_conditioning: torch.Tensor  # (B, L, V) in the model's dtype
    use_self_conditioning: torch.Tensor  # (B,) bool: False on a canvas's first step
    positions: torch.Tensor  # (1, L) the canvas's positions
    masks: dict[str, torch.Tensor]
    marked: bool = False

    def mark_static(self) -> None:
        """Tell dynamo (and CUDA graphs) these addresses do not change, once the cache is allocated."""
        if self.marked:
            return
        for t in [self.canvas, self.self_conditioning, self.use_self_conditioning, self.positions,
                  *self.masks.values(), *self.cache.tensors()]:
            torch._dynamo.mark_static_address(t)
        self.marked = True


class SlotPool:
    """Slots kept for reuse, keyed by shape; at most `spare` idle ones are kept (the oldest go first)."""

    def __init__(self, make: Callable[[int, int], Slot], spare: int) -> None:
        self._make, self._spare = make, spare
        self._idle: OrderedDict[int, Slot] = OrderedDict()
        self._lock = threading.Lock()  # releases may come from a finalizer on another thread

    def acquire(self, rows: int, capacity: int) -> Slot:
        with self._lock:
            for key, slot in self._idle.items():
                if (slot.rows, slot.capacity) == (rows, capacity):
                    del self._idle[key]
                    slot.cache.reset()
                    return slot
        return self._make(rows, capacity)

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._idle[id(slot)] = slot
            while len(self._idle) > self._spare:
                self._idle.popitem(last=False)

    @property
    def idle(self) -> int:
        return len(self._idle)


def prefix_needed(width: int, max_new_tokens: int, canvas_length: int) -> int:
    """Prefix tokens a row's cache must hold: its prompt and every canvas but the last (never encoded)."""
    return width + (math.ceil(max_new_tokens / canvas_length) - 1) * canvas_length


class CompiledDecoder:
    """The decoder forward (transformers' own entry, self-conditioning included), compiled once per shape."""

    def __init__(self, model: Any, device: torch.device, mode: str | None = None) -> None:
        self.model = model
        self.device = device
        self.mode = mode or compile_mode(device)
        self._compiled: Callable[[Slot], torch.Tensor] | None = None

    def compiled(self) -> Callable[[Slot], torch.Tensor]:
        """The compiled forward (made on first use; dynamo compiles each new shape on its first call)."""
        if self._compiled is None:
            # One graph per (rows, bucket) shape: raise dynamo's per-function limit above what the buckets
            # and batch sizes can need, so it never falls back to eager silently.
            config = torch._dynamo.config
            config.cache_size_limit = max(config.cache_size_limit, 4 * len(BUCKETS))
            self._compiled = torch.compile(self.forward, mode=self.mode, fullgraph=True, dynamic=False)
        return self._compiled

    def forward(self, slot: Slot) -> torch.Tensor:
        """The logits (B, L, V, float32) of the slot's canvas: traced by dynamo, also callable eagerly."""
        return decoder_logits(self.model, slot.canvas, slot.self_conditioning, slot.use_self_conditioning,
                              slot.masks, slot.cache, slot.positions)

    def __call__(self, slot: Slot, *, compiled: bool = True) -> torch.Tensor:
        """The logits of the slot's canvas, from the compiled forward (or the same forward run eagerly)."""
        slot.cache.decoding = True
        try:
            if not compiled:
                return self.forward(slot)
            slot.mark_static()
            if self.mode == "reduce-overhead":
                # The previous step's outputs (its logits) are consumed: the graph may reuse their memory.
                torch.compiler.cudagraph_mark_step_begin()
            return self.compiled()(slot)
        finally:
            slot.cache.decoding = False


class CompiledStepRunner(StepRunner):
    """The step runner with the static-shape compiled decoder step (`--compile`).

    A batch whose prompt and budget fit a bucket gets a slot from the pool when it is first encoded;
    its encoder passes write into the slot's cache, and its steps copy canvas and self-conditioning into
    the slot's persistent tensors and run the compiled forward. A batch too long for every bucket runs the
    dynamic step. Sampling, the stop rule and the one host sync per step are the base runner's.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int = 1, *, spare_slots: int = 4,
                 buckets: Sequence[int] = BUCKETS, mode: str | None = None, eager: bool = False) -> None:
        """`eager` runs the same static-shape forward without compiling it (tests, debugging)."""
        super().__init__(loaded, max_batch)
        self.eager = eager
        text = loaded.model.config.get_text_config()
        self.layer_types = list(text.layer_types)
        self.window = int(text.sliding_window)
        self.buckets = tuple(sorted(buckets))
        self.decoder = CompiledDecoder(loaded.model, loaded.device, mode)
        self.pool = SlotPool(self._make_slot, spare_slots)
        self._finalizers: dict[int, weakref.finalize[[Slot], Batch]] = {}  # by id(slot)

    def _make_slot(self, rows: int, capacity: int) -> Slot:
        device, length, vocab = self.loaded.device, self.canvas_length, self.loaded.vocab_size
        attention = torch.zeros(rows, 0, dtype=torch.bool, device=device)
        return Slot(
            rows=rows,
            capacity=capacity,
            cache=PrefixCache(self.layer_types, self.window, capacity),
            canvas=torch.zeros(rows, length, dtype=torch.long, device=device),
            self_conditioning=torch.zeros(rows, length, vocab, dtype=self.self_conditioning_dtype, device=device),
            use_self_conditioning=torch.zeros(rows, dtype=torch.bool, device=device),
            positions=torch.zeros(1, length, dtype=torch.int32, device=device),
            masks=decoder_masks(attention, capacity, self.window - 1, length),
        )

    def _attach(self, batch: Batch, slot: Slot) -> None:
        batch.slot = slot
        # However the batch ends (finished, cancelled, failed), its slot goes back to the pool.
        finalizer = weakref.finalize(batch, self._release, slot)
        finalizer.atexit = False
        self._finalizers[id(slot)] = finalizer

    def _release(self, slot: Slot) -> None:
        self._finalizers.pop(id(slot), None)
        self.pool.release(slot)

    def _detach(self, batch: Batch) -> None:
        finalizer = self._finalizers.get(id(batch.slot))
        if finalizer is not None and finalizer.detach() is not None:
            self._release(batch.slot)
        batch.slot = None

    def _new_cache(self, batch: Batch) -> Any:
        need = max(prefix_needed(batch.seq_len, r.params.max_new_tokens, self.canvas_length) for r in batch.rows)
        capacity = bucket_for(need, self.buckets)
        if capacity is None:
            log.info("a batch needing %d prefix tokens exceeds the largest bucket: dynamic step", need)
            return super()._new_cache(batch)
        slot = self.pool.acquire(len(batch.rows), capacity)
        self._attach(batch, slot)
        return slot.cache

    def _canvas_started(self, batch: Batch) -> None:
        slot: Slot | None = batch.slot
        if slot is None:
            return
        assert batch.canvas is not None and batch.positions is not None
        slot.canvas.copy_(batch.canvas)
        slot.positions.copy_(batch.positions)
        slot.use_self_conditioning.zero_()
        self._write_masks(batch, slot)
        batch.canvas = slot.canvas

    def _write_masks(self, batch: Batch, slot: Slot) -> None:
        masks = decoder_masks(batch.attention, slot.capacity, self.window - 1, self.canvas_length)
        for kind, mask in masks.items():
            slot.masks[kind].copy_(mask)
        batch.mask_mapping = slot.masks

    def _decoder_mask(self, batch: Batch) -> Any:
        if batch.slot is None:
            return super()._decoder_mask(batch)
        return batch.slot.masks  # written by _write_masks when the canvas starts

    def set_canvas(self, batch: Batch, canvas: torch.Tensor) -> None:
        if batch.slot is None:
            super().set_canvas(batch, canvas)
            return
        batch.slot.canvas.copy_(canvas)
        batch.canvas, batch.argmax = batch.slot.canvas, canvas

    def decoder_forward(self, batch: Batch) -> torch.Tensor:
        if batch.slot is None:
            return super().decoder_forward(batch)
        return self.decoder(batch.slot, compiled=not self.eager)

    def _keep_step(
        self, batch: Batch, canvas: torch.Tensor, argmax: torch.Tensor, self_conditioning: torch.Tensor
    ) -> None:
        slot: Slot | None = batch.slot
        if slot is None:
            super()._keep_step(batch, canvas, argmax, self_conditioning)
            return
        slot.canvas.copy_(canvas)
        slot.self_conditioning.copy_(self_conditioning)
        slot.use_self_conditioning.fill_(True)
        batch.canvas, batch.argmax, batch.self_conditioning = slot.canvas, argmax, slot.self_conditioning

    def keep_rows(self, batch: Batch, keep: list[int]) -> None:
        old: Slot | None = batch.slot
        if old is None or len(keep) == len(batch.rows):
            super().keep_rows(batch, keep)
            return
        if not keep:
            self._detach(batch)
            super().keep_rows(batch, keep)
            return
        # The rows that go on move into a slot of their size (the compiled step's shapes are per size).
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        new = self.pool.acquire(len(keep), old.capacity)
        new.cache.take_rows(old.cache, index)
        new.canvas.copy_(old.canvas[index])
        new.self_conditioning.copy_(old.self_conditioning[index])
        new.use_self_conditioning.copy_(old.use_self_conditioning[index])
        new.positions.copy_(old.positions)
        self._detach(batch)
        self._attach(batch, new)
        cache, canvas, argmax = new.cache, batch.canvas, batch.argmax
        sc = batch.self_conditioning
        batch.cache = batch.canvas = batch.argmax = batch.self_conditioning = None  # the base must not select them
        super().keep_rows(batch, keep)
        batch.cache = cache
        if canvas is not None:
            assert argmax is not None
            batch.canvas, batch.argmax = new.canvas, argmax[index]
            batch.self_conditioning = new.self_conditioning if sc is not None else None
            self._write_masks(batch, new)
