"""The static-shape compiled step (`--compile`): the dynamic step's logits, one graph per bucket, no breaks.

The tiny model has a 128-token sliding window and 16-token canvases, so a 150-token prompt is past the
window and a few canvases cross it again. One test compiles (inductor on this CPU; `reduce-overhead`
is CUDA-only): it shares its graph with the engine test through the module's runner.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from dgemma_common.params import GenerationParams
from dgemma_common.types import CommitEvent, FinalEvent, Prompt
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import LoadedModel, load_model
from dgemma_worker.runner import Batch, RowSpec, StepRunner
from dgemma_worker.static import (
    BUCKETS,
    CompiledStepRunner,
    bucket_for,
    compile_mode,
    compiled_by_default,
    prefix_needed,
)

CLOSE = {"rtol": 1e-5, "atol": 1e-5}  # fp32 logits (|x| <= 30, soft-capped): attention over padded keys


@pytest.fixture(scope="module")
def cuda_like(tiny_dir: Path) -> LoadedModel:
    """The tiny model with the experts a compiled step needs (grouped_mm: one graph, no per-expert loop)."""
    return load_model(tiny_dir, device="cpu", experts="grouped_mm")


@pytest.fixture(scope="module")
def compiled(cuda_like: LoadedModel) -> CompiledStepRunner:
    return CompiledStepRunner(cuda_like)


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, 300, (n,), generator=g).tolist() for n in lengths]


def new_batches(runners: list[StepRunner], texts: list[list[int]], max_new_tokens: int) -> list[Batch]:
    params = GenerationParams(max_new_tokens=max_new_tokens, max_denoising_steps=3)
    return [r.new_batch([RowSpec(p, params, torch.Generator().manual_seed(i)) for i, p in enumerate(texts)])
            for r in runners]


def same_steps(runners: list[StepRunner], batches: list[Batch], canvases: int, steps: int = 3,
               drop_first_row_after: int | None = None) -> list[torch.Tensor]:
    """Runs both batches canvas by canvas on the same noisy canvases; returns each step's logits per runner."""
    g = torch.Generator().manual_seed(9)
    seen: list[torch.Tensor] = []
    with torch.inference_mode():
        for canvas in range(canvases):
            if canvas == drop_first_row_after:
                for r, b in zip(runners, batches, strict=True):
                    r.keep_rows(b, list(range(1, len(b.rows))))
            for r, b in zip(runners, batches, strict=True):
                r.encode(b)
            for _ in range(steps):
                loaded = runners[0].loaded
                noisy = torch.randint(0, loaded.vocab_size, (len(batches[0].rows), loaded.canvas_length), generator=g)
                for r, b in zip(runners, batches, strict=True):
                    r.set_canvas(b, noisy)
                    seen.append(r.decoder_forward(b).clone())
                    r.settle(b)
                    r.denoise(b)  # its own forward, sampling, and self-conditioning for the next step
            for r, b in zip(runners, batches, strict=True):
                r.finish_canvas(b)
    return seen


def test_the_fixed_cache_and_masks_give_the_dynamic_logits_past_the_window_with_padding(
    cuda_like: LoadedModel,
) -> None:
    """The static-shape forward, run eagerly: a batch of a 150- and a 90-token prompt (left padding),
    four canvases (self-conditioning from the second step on), the first row dropped after two."""
    dynamic, static = StepRunner(cuda_like, max_batch=2), CompiledStepRunner(cuda_like, max_batch=2, eager=True)
    batches = new_batches([dynamic, static], prompts(150, 90), max_new_tokens=64)
    logits = same_steps([dynamic, static], batches, canvases=4, drop_first_row_after=2)
    assert batches[1].slot is not None and batches[1].slot.capacity == 256 and len(batches[1].rows) == 1
    for want, got in zip(logits[0::2], logits[1::2], strict=True):
        torch.testing.assert_close(got, want, **CLOSE)


def test_the_decoder_step_traces_as_one_graph_without_breaks(compiled: CompiledStepRunner) -> None:
    (batch,) = new_batches([compiled], prompts(40), max_new_tokens=16)
    with torch.inference_mode():
        compiled.encode(batch)
        batch.slot.cache.decoding = True
        explained = torch._dynamo.explain(compiled.decoder.forward)(batch.slot)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_logits_equal_the_dynamic_ones_and_a_bucket_compiles_once(
    cuda_like: LoadedModel, compiled: CompiledStepRunner
) -> None:
    """Two requests of different lengths (one past the window) in the same bucket, three canvases each, the
    second in a slot of its own (the first one's is held, as by a request still running): one graph."""
    dynamic = StepRunner(cuda_like)
    graphs = counters["stats"]["unique_graphs"]
    slots, held = [], []
    for length in (40, 150):
        batches = new_batches([dynamic, compiled], prompts(length), max_new_tokens=48)
        logits = same_steps([dynamic, compiled], batches, canvases=3)
        slots.append(batches[1].slot)
        assert batches[1].slot.capacity == 256
        for want, got in zip(logits[0::2], logits[1::2], strict=True):
            torch.testing.assert_close(got, want, **CLOSE)
        del batches  # the request ends: its slot goes back to the pool ...
        with torch.inference_mode():
            held.append(compiled.pool.acquire(1, 256))  # ... and is taken, so the next request gets another
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert slots[0] is not slots[1] and held[0] is slots[0]
    for slot in held:
        compiled.pool.release(slot)


def test_an_engine_on_the_compiled_step_generates_what_the_eager_engine_does(
    cuda_like: LoadedModel, compiled: CompiledStepRunner
) -> None:
    params = GenerationParams(max_new_tokens=40, max_denoising_steps=4, seed=3, ignore_eos=True)
    outputs = []
    for runner in (None, compiled):
        engine = Engine(cuda_like, EngineConfig(max_active=2, max_queue=2), runner=runner)
        engine.start(warmup=False)
        try:
            events = list(engine.generate(Prompt.of_tokens([2, *range(40, 80)]), params))
        finally:
            engine.shutdown()
        assert isinstance(events[-1], FinalEvent) and events[-1].error is None
        outputs.append([t for e in events if isinstance(e, CommitEvent) for t in e.token_ids])
    assert len(outputs[0]) == 40 and outputs[1] == outputs[0]


def test_a_batch_too_long_for_every_bucket_runs_the_dynamic_step(cuda_like: LoadedModel) -> None:
    runner = CompiledStepRunner(cuda_like, buckets=(64,), eager=True)
    (short,) = new_batches([runner], prompts(40), max_new_tokens=16)
    (long,) = new_batches([runner], prompts(100), max_new_tokens=16)
    with torch.inference_mode():
        runner.encode(short)
        runner.encode(long)
    assert short.slot is not None and short.slot.capacity == 64
    assert long.slot is None and type(long.cache).__name__ == "DynamicCache"


def test_finished_batches_return_their_slots_for_the_next_ones(cuda_like: LoadedModel) -> None:
    runner = CompiledStepRunner(cuda_like, eager=True, spare_slots=1)
    with torch.inference_mode():
        (first,) = new_batches([runner], prompts(40), max_new_tokens=16)
        runner.encode(first)
        slot = first.slot
        runner.keep_rows(first, [])  # every row ended
        assert runner.pool.idle == 1 and first.slot is None
        (second,) = new_batches([runner], prompts(60), max_new_tokens=16)
        runner.encode(second)
        assert second.slot is slot and runner.pool.idle == 0
        del second  # a batch dropped without keep_rows (an error path) still returns its slot
        assert runner.pool.idle == 1


def test_the_operators_pod_memory_reserves_the_largest_bucket() -> None:
    from dgemma_common.profiles import LARGEST_BUCKET

    assert max(BUCKETS) == LARGEST_BUCKET


def test_buckets_hold_the_prompt_and_every_canvas_but_the_last() -> None:
    assert prefix_needed(100, max_new_tokens=256, canvas_length=256) == 100
    assert prefix_needed(100, max_new_tokens=257, canvas_length=256) == 356
    assert [bucket_for(n) for n in (1, 256, 257, 65536, 65537)] == [256, 256, 512, 65536, None]


def test_compiling_is_on_with_cuda_and_off_on_a_cpu_unless_asked() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (compiled_by_default(None, cuda), compiled_by_default(None, cpu)) == (True, False)
    assert (compiled_by_default(False, cuda), compiled_by_default(True, cpu)) == (False, True)
    assert (compile_mode(cuda), compile_mode(cpu)) == ("reduce-overhead", "default")
