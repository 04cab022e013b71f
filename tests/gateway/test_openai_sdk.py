"""The official openai SDK (sync, async, streaming) and plain HTTP against a gateway in front of two real
workers on the tiny model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def gw(pool: Pool) -> Iterator[RunningGateway]:
    v = variant("cpu")
    g = RunningGateway([static(*((w.address, v) for w in pool.fast))], grpc=True)
    try:
        g.wait_ready(2)
        yield g
    finally:
        g.close()


def test_chat_completion_returns_text_usage_and_dgemma_stats(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=24,
                                       extra_body={"max_denoising_steps": 4, "seed": 1})
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["dgemma"]  # type: ignore[index]
    assert extra["variant"] == "cpu" and extra["canvases"] >= 1 and extra["decoder_passes"] >= extra["canvases"]


def test_same_seed_same_text_and_n_gives_several_choices(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": "Once upon", "max_tokens": 16, "extra_body": {"max_denoising_steps": 3}}
    a = client.completions.create(seed=5, **kw)  # type: ignore[call-overload]
    b = client.completions.create(seed=5, **kw)  # type: ignore[call-overload]
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text
    several = client.completions.create(seed=5, n=2, **kw)  # type: ignore[call-overload]
    assert [c.index for c in several.choices] == [0, 1]


def test_streaming_chat_yields_chunks_ending_with_finish_reason_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=40, stream=True,
        extra_body={"max_denoising_steps": 3, "ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    # One content chunk per committed canvas (canvas 16: 16 + 16 + 8 tokens).
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
    assert isinstance(text, str)


def test_streaming_completion_with_include_usage_and_the_async_client(gw: RunningGateway) -> None:
    async def go() -> tuple[str, int]:
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = await client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=20, stream=True, stream_options={"include_usage": True},
            extra_body={"max_denoising_steps": 3, "ignore_eos": True})
        text, usage = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        await client.close()
        return text, usage

    _, usage = asyncio.run(go())
    assert usage == 20


def test_drafts_stream_as_their_own_event_type_that_the_sdk_passes_over(
    gw: RunningGateway, client: openai.OpenAI
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True,
            "stream_drafts": True, "max_denoising_steps": 4, "ignore_eos": True}

    async def raw() -> list[tuple[str | None, dict[str, object]]]:
        events = []
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            name = None
            async for line in resp.content:
                text = line.decode().strip()
                if text.startswith("event: "):
                    name = text[len("event: "):]
                elif text.startswith("data: ") and text != "data: [DONE]":
                    events.append((name, json.loads(text[len("data: "):])))
                    name = None
        return events

    events = asyncio.run(raw())
    drafts = [d for name, d in events if name == "dgemma.draft"]
    assert len(drafts) >= 2  # one per step but the last
    draft = drafts[0]["dgemma"]["draft"]  # type: ignore[index]
    assert draft["canvas_index"] == 0 and draft["step"] >= 1 and isinstance(draft["text"], str)
    assert drafts[0]["choices"][0]["delta"] == {}  # type: ignore[index]
    # The SDK reads the same stream: drafts arrive as empty deltas, the content is unchanged.
    chunks = list(client.chat.completions.create(stream=True, extra_body={
        k: v for k, v in body.items() if k not in ("model", "messages", "max_tokens", "stream")},
        model=MODEL, messages=body["messages"], max_tokens=16))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) is not None
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_readiness_metrics_openapi_and_demand(gw: RunningGateway, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL

    async def get(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}{path}") as resp:
            return resp.status, await resp.text()

    assert asyncio.run(get("/healthz"))[0] == 200
    status, body = asyncio.run(get("/readyz"))
    assert status == 200 and json.loads(body)["endpoints_ready"] == 2
    status, metrics = asyncio.run(get("/metrics"))
    assert status == 200 and 'dgemma_gateway_endpoints_ready{variant="cpu"} 2.0' in metrics
    assert "dgemma_gateway_requests_total" in metrics and "dgemma_gateway_latency_target_total" in metrics
    status, doc = asyncio.run(get("/openapi.json"))
    assert status == 200 and "/v1/chat/completions" in json.loads(doc)["paths"]
    status, demand = asyncio.run(get("/v1/dgemma/demand"))
    v = json.loads(demand)["variants"]["cpu"]
    assert v["replicas_ready"] == 2 and v["demand"]["requests_total"] >= 1
    assert gw.gateway.demand_snapshot().variants["cpu"].model == MODEL  # the in-process view
