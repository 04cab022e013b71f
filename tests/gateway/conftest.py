"""Session fixtures: the worker processes the gateway tests share (started together, in parallel)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, SLOW_STEP_S, Pool, RunningGateway, static, variant


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



@pytest.fixture(scope="module")
def gw(pool: Pool) -> Iterator[RunningGateway]:
    """A gateway with its KServe front in front of the first fast worker, defaults otherwise."""
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], grpc=True)
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()
