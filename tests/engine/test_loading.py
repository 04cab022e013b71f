"""How weights load: tensor by tensor onto the target device, a few at a time (the operator's pod memory
for discrete GPUs, docs/operator.md "Pod memory", rests on this)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import core_model_loading
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from dgemma_worker.model import load_model


class InFlight:
    """Wraps transformers' per-tensor materialisation (which still runs) and records what it does."""

    def __init__(self, real: Any) -> None:
        self.real, self.lock = real, threading.Lock()
        self.now = self.peak = self.calls = 0
        self.devices: set[str] = set()

    def __call__(self, tensor: Any, device: Any = None, dtype: Any = None) -> torch.Tensor:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
            self.devices.add(str(device))
        try:
            out: torch.Tensor = self.real(tensor, device, dtype)
            return out
        finally:
            with self.lock:
                self.now -= 1


def test_each_weight_is_placed_on_the_device_as_it_is_read_with_at_most_four_in_flight(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = InFlight(core_model_loading._materialize_copy)
    monkeypatch.setattr(core_model_loading, "_materialize_copy", spy)
    load_model(tiny_dir, device="cpu")
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        stored = len(list(f.keys()))
    assert spy.calls == stored  # one read per checkpoint tensor, nothing loaded whole first
    assert spy.devices == {"cpu"}  # the target device (from device_map) is given at read time
    assert 1 <= spy.peak <= 4


def test_the_loader_keeps_its_thread_pool_small_and_never_forces_our_weights_onto_the_cpu() -> None:
    assert core_model_loading.GLOBAL_WORKERS <= 4
    for model_type in ("diffusion_gemma", "diffusion_gemma_text"):
        conversions = get_checkpoint_conversion_mapping(model_type) or []
        assert not any(getattr(c, "force_cpu", False) for c in conversions), model_type
