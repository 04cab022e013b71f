"""A denoising step makes at most one host-device synchronization: the read of its per-row done flags.

Counted on CPU tensors by `SyncCounter` (the operations that would stall a GPU: reading a value, boolean
masks, `nonzero`, `torch.equal`, tensors built from Python lists), on the tiny model with the experts it
has on every device (`grouped_mm`: transformers' `eager` experts loop over the experts with `nonzero`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dgemma_common.params import GenerationParams
from dgemma_worker.model import LoadedModel, load_model
from dgemma_worker.runner import RowSpec, StepRunner
from dgemma_worker.static import CompiledStepRunner
from dgemma_worker.syncs import SyncCounter


@pytest.fixture(scope="module")
def cuda_like(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir, device="cpu", experts="grouped_mm")


def steps(runner: StepRunner, prompts: list[list[int]], params: list[GenerationParams], n: int) -> list[SyncCounter]:
    batch = runner.new_batch([RowSpec(p, q, torch.Generator().manual_seed(i)) for i, (p, q) in
                              enumerate(zip(prompts, params, strict=True))])
    counters = []
    with torch.inference_mode():
        runner.encode(batch)
        for _ in range(n):
            with SyncCounter() as counter:
                going = runner.settle(batch)
                if any(going):
                    runner.denoise(batch)
            counters.append(counter)
    return counters


def test_a_step_syncs_once_at_batch_one(cuda_like: LoadedModel) -> None:
    counted = steps(StepRunner(cuda_like), [[2, 40, 41]], [GenerationParams(max_denoising_steps=6, seed=0)], 6)
    assert [c.total for c in counted] == [1] * 6, [dict(c.seen) for c in counted]
    assert all(dict(c.seen) == {"Tensor.tolist": 1} for c in counted)


def test_a_batch_with_a_stopped_row_riding_along_still_syncs_once(cuda_like: LoadedModel) -> None:
    params = [GenerationParams(max_denoising_steps=2, seed=0, stability_threshold=2),
              GenerationParams(max_denoising_steps=5, seed=1, t_min=0.3)]
    counted = steps(StepRunner(cuda_like, max_batch=2), [[2, 40, 41], [2, 50, 51, 52, 53]], params, 5)
    assert [c.total for c in counted] == [1] * 5, [dict(c.seen) for c in counted]


def test_the_static_shape_step_syncs_once_too(cuda_like: LoadedModel) -> None:
    """The compiled step's forward, run eagerly under the counter, and everything around it."""
    runner = CompiledStepRunner(cuda_like, eager=True)
    counted = steps(runner, [[2, 40, 41]], [GenerationParams(max_denoising_steps=6, seed=0)], 6)
    assert [c.total for c in counted] == [1] * 6, [dict(c.seen) for c in counted]


def test_the_counter_sees_what_would_stall_a_gpu() -> None:
    x = torch.arange(8)
    with SyncCounter() as counter:
        _ = x[x > 3]
        _ = int(x.sum())
        _ = torch.equal(x, x)
        _ = x.tolist()
        _ = torch.tensor([1, 2, 3])
        _ = torch.where(x > 3, x, 0)  # not a sync
        with counter.paused():
            _ = int(x.sum())  # around a compiled graph, which dynamo will not run under the counter
    assert counter.total == 5, dict(counter.seen)
