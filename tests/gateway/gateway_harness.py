"""Real processes for the gateway tests: worker processes on the tiny model, and a gateway served
from a background event loop on 127.0.0.1, reached by real clients over TCP."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as tc

from dgemma_gateway.app import GatewayServer
from dgemma_gateway.config import GatewayConfig
from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.endpoints import EndpointSource, EndpointSpec, StaticSource
from dgemma_gateway.openai_api import ApiLimits
from dgemma_gateway.types import Variant
from dgemma_serve.workers import LocalWorker, LocalWorkers

T = TypeVar("T")
MODEL = "tiny"


class RunningGateway:
    """A GatewayServer on its own event-loop thread."""

    def __init__(self, sources: Sequence[EndpointSource], *, profile: str = "latency-target",
                 keys: Path | None = None, limits: ApiLimits | None = None,
                 settings: GatewaySettings | None = None, grpc: bool = False, **config_fields: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-gateway-loop", daemon=True)
        self.thread.start()
        config = GatewayConfig(host="127.0.0.1", port=0, grpc_port=0 if grpc else -1, routing_profile=profile,
                               api_keys_file=keys, limits=limits or ApiLimits(),
                               core=settings or GatewaySettings(watch_interval_s=0.2))
        config = replace(config, **config_fields)  # e.g. tls=..., worker_tls=...

        async def make() -> GatewayServer:
            return GatewayServer(config, list(sources))

        self.server = self.call(make())
        self.call(self.server.start())
        self.url = f"{'https' if config.tls else 'http'}://127.0.0.1:{self.server.port}"
        self.grpc_address = f"127.0.0.1:{self.server.grpc_port}"

    @property
    def gateway(self) -> Any:
        return self.server.gateway

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the gateway's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, count: int, timeout: float = 120) -> None:
        assert self.call(self.gateway.wait_ready(timeout, count), timeout + 5), "endpoints did not become ready"

    def close(self) -> None:
        try:
            self.call(self.server.stop(grace_s=0.5), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def kserve_inputs(text: str, settings: dict[str, Any]) -> list[tc.InferInput]:
    """A tritonclient prompt and its sampling_parameters JSON."""
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=object))
    return [prompt, params]


def variant(name: str, **kw: Any) -> Variant:
    """A variant of the tiny model (canvas 16)."""
    base = Variant(name=name, model=MODEL, canvas_length=16, max_denoising_steps=48, tokens_per_s_prior=500.0)
    return replace(base, **kw)


def static(*pairs: tuple[str, Variant]) -> StaticSource:
    """Static endpoints from (address, variant) pairs."""
    return StaticSource([EndpointSpec(f"{v.name}/{a}", a, v) for a, v in pairs])


# Seconds of artificial delay per decoder step of the "slow GPU" worker (DGEMMA_DEBUG_STEP_DELAY_S).
SLOW_STEP_S = 0.08


class Pool:
    """The test workers by role: two fast ones, a slow one and a victim to be killed."""

    def __init__(self, fast: LocalWorkers, slow: LocalWorkers, victim: LocalWorkers) -> None:
        self.groups = (fast, slow, victim)

    @property
    def fast(self) -> list[LocalWorker]:
        return self.groups[0].workers

    @property
    def slow(self) -> LocalWorker:
        return self.groups[1].workers[0]

    @property
    def victim(self) -> LocalWorker:
        return self.groups[2].workers[0]

    def stop(self) -> None:
        for g in self.groups:
            g.stop(timeout=5)


def fast_gateway(pool: Pool) -> Iterator[RunningGateway]:
    """A gateway (HTTP and KServe gRPC, no keys) in front of the first fast worker; a module uses it as
    `gw = pytest.fixture(scope="module", name="gw")(fast_gateway)`."""
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], grpc=True)
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()
