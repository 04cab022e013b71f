"""The step runner alone, on the tiny checkpoint: batch tensors, padding, and the encoder/decoder calls."""

from __future__ import annotations

import time

import torch

from dgemma_common.params import GenerationParams
from dgemma_worker.model import LoadedModel
from dgemma_worker.runner import DeviceTimer, RowSpec, StepRunner
from dgemma_worker.syncs import SyncCounter


def rows_of(prompts: list[list[int]]) -> list[RowSpec]:
    return [RowSpec(p, GenerationParams(seed=0), torch.Generator().manual_seed(0)) for p in prompts]


def test_left_padding_in_a_batch_gives_each_row_its_unpadded_logits(loaded: LoadedModel) -> None:
    """The batched path (padding, masks, positions) computes what each request would alone."""
    runner = StepRunner(loaded, max_batch=2)
    prompts = [[2, 40, 41], [2, 50, 51, 52, 53, 54, 55, 56, 57]]
    canvas = torch.randint(0, loaded.vocab_size, (2, loaded.canvas_length), generator=torch.Generator().manual_seed(0))

    def first_logits(prompts: list[list[int]], fixed: torch.Tensor) -> torch.Tensor:
        batch = runner.new_batch(rows_of(prompts))
        with torch.inference_mode():
            runner.encode(batch)
            runner.set_canvas(batch, fixed)
            return runner.decoder_forward(batch).clone()

    together = first_logits(prompts, canvas)
    for i, p in enumerate(prompts):
        alone = first_logits([p], canvas[i : i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-4), (i, (together[i] - alone[0]).abs().max())


def test_a_canvas_runs_its_steps_then_commits_and_feeds_the_encoder(loaded: LoadedModel) -> None:
    runner = StepRunner(loaded)
    params = GenerationParams(max_denoising_steps=3, seed=0, confidence_threshold=1e-9)
    batch = runner.new_batch([RowSpec([2, 40, 41], params, torch.Generator().manual_seed(0))])
    with torch.inference_mode():
        assert batch.needs_encoding
        runner.encode(batch)
        assert not batch.needs_encoding
        going = []
        for _ in range(4):
            going.append(runner.settle(batch))
            if going[-1][0]:
                runner.denoise(batch)
        assert going == [[True], [True], [True], [False]]  # random weights never stop early
        assert runner.steps_done(batch, 0) == 3
        (canvas,) = runner.finish_canvas(batch)
    assert len(canvas) == loaded.canvas_length and all(0 <= t < loaded.vocab_size for t in canvas)
    assert batch.needs_encoding  # the committed canvas goes into the cache next


def test_the_device_timer_on_a_cpu_times_the_work_in_its_block_without_a_sync() -> None:
    with SyncCounter() as counter, DeviceTimer(torch.device("cpu")) as timer:
        time.sleep(0.05)
    seconds = timer.seconds
    time.sleep(0.01)
    assert seconds >= 0.05 and timer.seconds == seconds and counter.total == 0
