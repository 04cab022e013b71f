"""Failures and latency targets with real processes: a worker killed mid-stream, a retry before the first
byte, and a slow and a fast worker under a latency target only the fast one meets."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from dgemma_common.demand import DemandSnapshot
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from tests.gateway.gateway_harness import MODEL, SLOW_STEP_S, Pool, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)


class BrokenWorker(pb_grpc.DenoiserServicer):
    """Reports itself ready and cheap, then fails every request before its first byte."""

    def __init__(self) -> None:
        self.calls = 0

    async def WatchLoad(self, request: Any, context: Any) -> AsyncIterator[pb.LoadReport]:
        while True:
            yield pb.LoadReport(capacity=2, max_queue=4, step_latency_s=0.001, encoder_latency_s=0.001,
                                canvas_length=16, model_name=MODEL, ready=True)
            await asyncio.sleep(0.1)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "broken on purpose")
        yield pb.GenerateResponse()  # pragma: no cover


def test_a_request_that_fails_before_its_first_byte_is_retried_on_another_endpoint(pool: Pool) -> None:
    broken = BrokenWorker()
    holder: dict[str, Any] = {}
    g = RunningGateway([])

    async def start() -> str:
        server = grpc.aio.server()
        pb_grpc.add_DenoiserServicer_to_server(broken, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        return f"127.0.0.1:{port}"

    try:
        address = g.call(start())
        g.call(_apply(g, static((address, variant("cheap-broken", cost_weight=0.5))),
                      static((pool.fast[1].address, variant("fine", cost_weight=2.0)))))
        g.wait_ready(2)
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
            extra_body={"max_denoising_steps": 2})
        assert r.headers["x-dgemma-variant"] == "fine"
        assert broken.calls == 1  # tried first (cheapest), failed before the first byte, retried elsewhere
        assert r.parse().choices[0].finish_reason in ("stop", "length")
        # One request is demand once: counted where it was served, not once per attempt.
        views = g.call(_snapshot(g)).variants
        assert (views["fine"].demand.requests_total, views["cheap-broken"].demand.requests_total) == (1, 0)
        assert views["cheap-broken"].demand.routed_canvases_per_s == 0.0
        # The failed endpoint is ejected for a while: the next request goes straight to the good one.
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       extra_body={"max_denoising_steps": 2})
        assert broken.calls == 1
        metrics = g.gateway.metrics.render().decode()
        assert 'dgemma_gateway_retries_total{reason="unavailable"} 1.0' in metrics
    finally:
        if "server" in holder:
            g.call(holder["server"].stop(None))
        g.close()


async def _snapshot(g: RunningGateway) -> DemandSnapshot:
    return g.gateway.demand_snapshot()  # type: ignore[no-any-return]


def test_a_request_whose_deadline_passes_before_an_endpoint_takes_it_is_a_504_in_the_metrics(pool: Pool) -> None:
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))])
    try:
        g.wait_ready(1)
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body={"timeout_s": 1e-6})
        assert caught.value.status_code == 504
        metrics = g.gateway.metrics.render().decode()
        assert 'dgemma_gateway_requests_total{api="openai",outcome="504",variant="cpu"} 1.0' in metrics
    finally:
        g.close()


async def _apply(g: RunningGateway, *sources: Any) -> None:
    for s in sources:
        g.gateway.registry.apply(s.name + str(id(s)), s.endpoints)


def test_a_worker_killed_mid_stream_gives_a_clean_error_event_and_later_requests_go_elsewhere(pool: Pool) -> None:
    g = RunningGateway([static((pool.victim.address, variant("victim", cost_weight=1.0)),
                               (pool.fast[1].address, variant("survivor", cost_weight=2.0)))])
    try:
        g.wait_ready(2)
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Go on"}], max_tokens=4096, stream=True,
            extra_body={"max_denoising_steps": 8, "ignore_eos": True})
        assert stream.response.headers["x-dgemma-variant"] == "victim"
        started = time.monotonic()
        received = 0
        with pytest.raises(openai.APIError, match="upstream unavailable"):
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received == 1:
                        pool.victim.process.send_signal(signal.SIGKILL)
        assert time.monotonic() - started < 20  # an error, never a hang
        pool.victim.process.wait(10)
        r = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
            extra_body={"max_denoising_steps": 2})
        assert r.headers["x-dgemma-variant"] == "survivor"
    finally:
        g.close()


def _warm(address: str) -> None:
    """One request straight to a worker, so its step latency is measured."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DenoiserStub(ch)
        list(stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text="warm"),
                                              params=pb.GenerationParams(max_new_tokens=16, max_denoising_steps=4)),
                           timeout=60))


def test_a_target_only_the_fast_worker_meets_goes_to_it_and_a_loose_one_to_the_cheap_slow_one(pool: Pool) -> None:
    for w in (pool.slow, pool.fast[0]):
        _warm(w.address)
    # Cost compares what serving the request costs (price x worker-seconds): the slow worker must be much
    # cheaper per second to be the cheaper place for a request it needs ~10x longer for.
    g = RunningGateway([static((pool.slow.address, variant("slow", cost_weight=0.05)),
                               (pool.fast[0].address, variant("fast", cost_weight=4.0)))])
    try:
        g.wait_ready(2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for load reports carrying the measured step latencies
            loads = {c.variant.name: c.load for c in g.gateway.registry.candidates()}
            if all(ld is not None and ld.step_latency_s > 0 for ld in loads.values()):
                break
            time.sleep(0.1)
        assert loads["slow"].step_latency_s >= SLOW_STEP_S  # type: ignore[union-attr]

        def ask(target_ms: int) -> tuple[str, dict[str, Any]]:
            async def go() -> tuple[str, dict[str, Any]]:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32,
                        "max_denoising_steps": 8, "ignore_eos": True}
                async with aiohttp.ClientSession() as s, s.post(
                    f"{g.url}/v1/chat/completions", json=body,
                    headers={"x-dgemma-latency-target-ms": str(target_ms)}) as r:
                    assert r.status == 200
                    return r.headers["x-dgemma-variant"], json.loads(await r.text())["dgemma"]

            return asyncio.run(go())

        # 2 canvases x 8 steps x >= 80 ms on the slow one: > 1.28 s; the fast one needs well under 0.5 s.
        chosen, info = ask(1000)
        assert chosen == "fast" and info["target_met"] is True and info["predicted_ms"] < 1000
        chosen, info = ask(20000)
        assert chosen == "slow" and info["target_met"] is True
        metrics = g.gateway.metrics.render().decode()
        assert 'dgemma_gateway_latency_target_total{result="met",variant="fast"} 1.0' in metrics
        assert 'dgemma_gateway_latency_target_total{result="met",variant="slow"} 1.0' in metrics
    finally:
        g.close()
