"""Fixtures for engine tests: one tiny checkpoint per session, a fresh engine per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import LoadedModel, load_model, make_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_model(tiny_dir, device="cpu")


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    eng = Engine(loaded, EngineConfig(max_active=4, max_queue=8))
    eng.start(warmup=True)
    yield eng
    eng.shutdown()
