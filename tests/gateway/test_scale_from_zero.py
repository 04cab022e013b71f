"""Scale from zero: a request for a model with no ready replica is held, counted as demand, and released to
the first endpoint that becomes ready; past the bound it gets 503 with Retry-After; a client that leaves is
dropped. Real worker processes; the source reports the worker late, as an EndpointSlice would."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence

import openai
import pytest

from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.endpoints import EndpointSpec, Sink
from dgemma_gateway.openai_api import ApiLimits
from dgemma_gateway.types import Variant
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, variant

pytestmark = pytest.mark.timeout(120)

IDLE = variant("idle", scale_from_zero=True)


class LateSource:
    """Knows the variant from the start; its endpoint appears when the test says so."""

    name = "late"

    def __init__(self, v: Variant) -> None:
        self.variant = v
        self.sink: Sink | None = None

    async def run(self, sink: Sink) -> None:
        self.sink = sink
        sink(self.name, [], [self.variant])
        await asyncio.Event().wait()

    async def report(self, endpoints: Sequence[EndpointSpec]) -> None:
        assert self.sink is not None
        self.sink(self.name, endpoints, [self.variant])


@pytest.fixture
def late() -> LateSource:
    return LateSource(IDLE)


@pytest.fixture
def gw(late: LateSource) -> Iterator[RunningGateway]:
    g = RunningGateway([late], settings=GatewaySettings(watch_interval_s=0.2, hold_for_replica_s=20.0))
    try:
        yield g
    finally:
        g.close()


def held(gw: RunningGateway) -> int:
    async def read() -> int:
        return gw.gateway.demand_snapshot().variants["idle"].demand.requests_held

    return gw.call(read())


def eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_held_request_is_counted_as_demand_and_released_to_the_first_ready_endpoint(
    gw: RunningGateway, late: LateSource, pool: Pool
) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]  # the model is served before any replica exists
    with concurrent.futures.ThreadPoolExecutor(1) as pool_of_one:
        reply = pool_of_one.submit(client.chat.completions.with_raw_response.create, model=MODEL, max_tokens=16,
                                   messages=[{"role": "user", "content": "Hi"}])
        eventually(lambda: held(gw) == 1)
        metrics = urllib.request.urlopen(f"{gw.url}/metrics", timeout=5).read().decode()
        assert 'dgemma_gateway_requests_held{variant="idle"} 1.0' in metrics
        assert 'dgemma_gateway_endpoints_ready{variant="idle"} 0.0' in metrics
        time.sleep(0.5)
        assert not reply.done()  # still held: no replica yet
        address = pool.fast[0].address
        gw.call(late.report([EndpointSpec(f"idle/{address}", address, IDLE)]))
        raw = reply.result(60)
    assert raw.headers["x-dgemma-endpoint"] == f"idle/{address}"
    assert raw.parse().choices[0].message.content is not None
    assert held(gw) == 0


def test_past_the_bound_the_request_gets_503_with_retry_after(late: LateSource) -> None:
    g = RunningGateway([late], settings=GatewaySettings(hold_for_replica_s=0.5))
    try:
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=30)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
        assert err.value.status_code == 503 and err.value.response.headers["Retry-After"]
        assert time.monotonic() - started >= 0.5
    finally:
        g.close()


def test_a_client_that_goes_away_while_held_is_dropped(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
    eventually(lambda: held(gw) == 0, timeout=5)


def test_a_variant_that_cannot_scale_from_zero_is_refused_at_once() -> None:
    g = RunningGateway([LateSource(variant("fixed"))], settings=GatewaySettings(hold_for_replica_s=20.0))
    try:
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0, timeout=10)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
        assert err.value.status_code == 503
    finally:
        g.close()


def test_a_held_stream_sends_headers_and_keep_alives_so_a_read_timeout_never_fires(
    late: LateSource, pool: Pool
) -> None:
    # The SDK's read timeout (1 s) is far shorter than the hold (3 s): only the keep-alive comments, which the
    # SDK skips, keep it reading. Before them the stream was silent until its first canvas, and the client gave up.
    g = RunningGateway([late], settings=GatewaySettings(watch_interval_s=0.2, hold_for_replica_s=20.0),
                       limits=ApiLimits(sse_keepalive_s=0.3))
    try:
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0,
                               timeout=openai.Timeout(60.0, read=1.0))
        with concurrent.futures.ThreadPoolExecutor(1) as pool_of_one:
            stream = pool_of_one.submit(lambda: "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=MODEL, max_tokens=16, stream=True, messages=[{"role": "user", "content": "Hi"}],
                    extra_body={"max_denoising_steps": 2, "ignore_eos": True}) if c.choices))
            eventually(lambda: held(g) == 1)
            time.sleep(3.0)
            assert not stream.done(), stream.exception() if stream.done() else None
            address = pool.fast[0].address
            g.call(late.report([EndpointSpec(f"idle/{address}", address, IDLE)]))
            assert len(stream.result(60)) > 0
    finally:
        g.close()
