"""Session fixtures: the worker processes the gateway tests share (started together, in parallel)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, SLOW_STEP_S, Pool, RunningGateway


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Four real `dgemma worker` processes on the tiny model (max 2 active, 4 queued each)."""
    model = str(tiny_model_dir())
    args = ["--max-active", "2", "--max-queue", "4", "--max-prompt-tokens", "512"]
    fast = LocalWorkers(model, 2, MODEL, args, workdir=tmp_path_factory.mktemp("fast"))
    slow = LocalWorkers(model, 1, MODEL, args, env={"DGEMMA_DEBUG_STEP_DELAY_S": str(SLOW_STEP_S)},
                        workdir=tmp_path_factory.mktemp("slow"))
    victim = LocalWorkers(model, 1, MODEL, args, workdir=tmp_path_factory.mktemp("victim"))
    p = Pool(fast, slow, victim)
    try:
        for g in p.groups:
            g.start()
        for g in p.groups:
            g.wait_bound()
        yield p
    finally:
        p.stop()



@pytest.fixture
def client(gw: RunningGateway) -> openai.OpenAI:
    """The official SDK against the module's `gw` gateway (no keys, no retries)."""
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
