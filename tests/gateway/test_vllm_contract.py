"""The vLLM contract, pinned to vLLM 0.24.0: the metric names the gateway reads exist on a real-format page
(tests/fixtures, rendered by vLLM 0.24.0's own PrometheusStatLogger), they map to the canonical load, and a
server that serves such pages and /health is scraped into a routable endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dgemma_common import vllm
from dgemma_gateway import vllm_load
from dgemma_gateway.openai_upstream import HttpTarget, OpenAIUpstream
from dgemma_gateway.routing import load_profile_file, route
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant
from tests.waiting import until

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PAGE_1 = (FIXTURES / "vllm-0.24.0-metrics-1.txt").read_text()
PAGE_2 = (FIXTURES / "vllm-0.24.0-metrics-2.txt").read_text()
VARIANT = Variant("vllm-h100", "google/diffusiongemma-26B-A4B-it", "h100", runtime="vllm", canvas_length=256,
                  max_denoising_steps=48, tokens_per_s_prior=1282.0)


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_metric_the_gateway_reads_is_on_a_vllm_0_24_page_with_its_type() -> None:
    found = families(PAGE_1)
    assert found[vllm.RUNNING] == "gauge" and found[vllm.WAITING] == "gauge"
    assert found[vllm.GENERATION_TOKENS] == "counter" and found[vllm.DENOISING_STEPS] == "counter"
    assert found[vllm.INFERENCE_TIME] == "histogram" and found[vllm.REQUEST_GENERATION_TOKENS] == "histogram"
    assert 'model_name="google/diffusiongemma-26B-A4B-it"' in PAGE_1 and 'engine="0"' in PAGE_1


def test_a_page_maps_to_gauges_and_two_pages_to_measured_costs() -> None:
    first, second = vllm_load.parse(PAGE_1, at=100.0), vllm_load.parse(PAGE_2, at=110.0)
    assert first is not None and second is not None
    assert (second.running, second.waiting) == (4.0, 3.0)
    timing = vllm_load.timing(first, second, 256, None)
    assert timing is not None
    # 25 requests finished between the pages: 14.37 s of RUNNING time over 727 decoder passes.
    assert timing.step_s == pytest.approx((second.running_s - first.running_s) / 727)
    assert 0.015 < timing.step_s < 0.025
    assert timing.tokens_per_s == pytest.approx((22267 - 14397) / 10.0)
    assert timing.steps_per_canvas == pytest.approx(727 / 50)  # 315 tokens a request: 2 canvases each
    load = vllm_load.load(second, timing, VARIANT, capacity=4, max_queue=16, ready=True)
    assert (load.active, load.queue_depth, load.capacity) == (4, 3, 4)
    assert load.step_latency_s == timing.step_s and load.observed_at == 110.0
    assert vllm_load.step_fraction(timing, VARIANT) == pytest.approx(727 / 50 / 48)


def test_no_finished_requests_keep_the_last_costs_and_a_restart_starts_over() -> None:
    first, second = vllm_load.parse(PAGE_1, 0.0), vllm_load.parse(PAGE_2, 10.0)
    assert first is not None and second is not None
    measured = vllm_load.timing(first, second, 256, None)
    idle = vllm_load.timing(second, second.__class__(**{**second.__dict__, "at": 20.0}), 256, measured)
    assert idle is not None and measured is not None and idle.step_s == measured.step_s
    assert idle.tokens_per_s < measured.tokens_per_s  # no tokens in that window
    assert vllm_load.timing(second, first, 256, measured) is measured  # counters went back: a new server


def test_a_page_without_vllm_gauges_is_not_a_vllm_server() -> None:
    assert vllm_load.parse("# HELP dgemma_gateway_requests x\ndgemma_gateway_requests_total 3\n", 0.0) is None


def test_the_router_prefers_the_idle_vllm_endpoint_over_the_busy_one() -> None:
    first, second = vllm_load.parse(PAGE_1, 0.0), vllm_load.parse(PAGE_2, 10.0)
    assert first is not None and second is not None
    timing = vllm_load.timing(first, second, 256, None)
    busy = vllm_load.load(second, timing, VARIANT, 4, 16, True)
    idle = EndpointLoad(**{**busy.__dict__, "active": 0, "queue_depth": 0})
    fraction = vllm_load.step_fraction(timing, VARIANT) or 1.0
    candidates = [Candidate("busy", VARIANT, busy, step_fraction=fraction),
                  Candidate("idle", VARIANT, idle, step_fraction=fraction)]
    decision = route(load_profile_file("latency-target"), RouteRequest(VARIANT.model, 512), candidates, 10.0)
    assert decision.endpoint is not None and decision.endpoint.endpoint_id == "idle"
    assert decision.prediction is not None and decision.prediction.measured


class FakeVllmServer:
    """Serves the fixture pages at /metrics (the next one on each scrape) and a switchable /health."""

    def __init__(self) -> None:
        self.pages = [PAGE_1, PAGE_2]
        self.scrapes = 0
        self.healthy = True
        self.auth: list[str | None] = []

    async def metrics(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        page = self.pages[min(self.scrapes, len(self.pages) - 1)]
        self.scrapes += 1
        return web.Response(text=page, content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)


@pytest.fixture
async def fake_vllm() -> AsyncIterator[tuple[FakeVllmServer, str]]:
    fake = FakeVllmServer()
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_get("/health", fake.health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_an_upstream_is_scraped_into_its_load_and_a_dead_engine_is_not_ready(
        fake_vllm: tuple[FakeVllmServer, str]) -> None:
    fake, base = fake_vllm
    reports: list[tuple[EndpointLoad | None, float | None]] = []
    async with aiohttp.ClientSession() as session:
        upstream = OpenAIUpstream(HttpTarget(base, VARIANT.model, api_key="k"), session, time.monotonic, 0.05,
                                  lambda load, f: reports.append((load, f)), lambda: VARIANT)
        task = asyncio.create_task(upstream.watch())
        try:
            await until(lambda: len(reports) >= 2, 10, "two load reports")
            load, fraction = reports[1]
            assert load is not None and load.ready and (load.active, load.queue_depth) == (4, 3)
            assert load.step_latency_s > 0 and fraction is not None and 0 < fraction < 1
            assert fake.auth[0] == "Bearer k"  # a server started with --api-key guards /metrics too
            fake.healthy = False
            seen = len(reports)
            await until(lambda: len(reports) > seen + 1, 10, "two more load reports")
            last = reports[-1][0]
            assert last is not None and not last.ready
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_the_pinned_version_is_the_fixtures_and_the_image() -> None:
    assert vllm.VERSION == "0.24.0" and vllm.IMAGE.endswith(":v0.24.0")
    assert {p.name for p in FIXTURES.glob("vllm-*")} == {f"vllm-{vllm.VERSION}-metrics-{i}.txt" for i in (1, 2)}
