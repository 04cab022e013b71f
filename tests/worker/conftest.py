"""A real worker on 127.0.0.1 for the tests: the grpc.aio server on its own event-loop thread, the
real engine on the tiny random-weight checkpoint, and real clients talking to it over TCP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar

import grpc
import pytest

from dgemma_common.params import Limits
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_worker.model import tiny_model_dir
from dgemma_worker.server import EngineFactory, WorkerServer, load_engine
from dgemma_worker.worker_config import WorkerConfig

T = TypeVar("T")

# Long enough to still be running when a test acts on it, short enough to finish quickly if it does.
LONG = pb.GenerationParams(max_new_tokens=4096, max_denoising_steps=64, ignore_eos=True)


class RunningWorker:
    """A WorkerServer served from a background event loop; helpers to reach it."""

    def __init__(self, config: WorkerConfig, factory: EngineFactory = load_engine, load: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-worker-loop", daemon=True)
        self.thread.start()
        self.server = WorkerServer(config, factory)
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self.load_future = asyncio.run_coroutine_threadsafe(self.server.load(), self.loop) if load else None
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.DenoiserStub(self.channel)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the worker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start a coroutine on the worker's loop; return its future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait_loaded(self, timeout: float = 120) -> None:
        assert self.load_future is not None
        self.load_future.result(timeout)

    @property
    def engine(self) -> Any:
        return self.server.runtime.engine

    def close(self) -> None:
        self.channel.close()
        try:
            self.call(self.server.stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def worker_config(**overrides: Any) -> WorkerConfig:
    """Test settings: tiny model, free ports on 127.0.0.1, small queues."""
    base = WorkerConfig(
        model=str(tiny_model_dir()),
        served_model_name="tiny",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_active=2,
        max_queue=2,
        drain_grace_s=10.0,
        limits=Limits(max_new_tokens=8192, max_denoising_steps=256, max_prompt_tokens=512),
        max_message_bytes=1024 * 1024,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def worker() -> Iterator[RunningWorker]:
    """One loaded worker shared by the tests that leave it as they found it."""
    w = RunningWorker(worker_config())
    try:
        w.wait_loaded()
        yield w
    finally:
        w.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll until predicate() is true; False on timeout."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def text_request(text: str = "Hello", params: pb.GenerationParams | None = None, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(text=text), params=params or pb.GenerationParams(), **kw)
