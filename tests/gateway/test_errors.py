"""Every error status of the HTTP API, in the OpenAI error format, against real workers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from dgemma_gateway.openai_api import ApiLimits
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def gw(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway with API keys and small limits in front of one fast worker."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# keys\n{KEY}\nsk-other\n")
    limits = ApiLimits(max_body_bytes=16 * 1024, max_prompt_tokens=64, max_tokens=2048, max_n=2,
                       max_streams_per_key=1)
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], keys=keys, limits=limits)
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()


def post(gw: RunningGateway, body: Any, key: str | None = KEY, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    async def go() -> tuple[int, dict[str, Any], dict[str, str]]:
        h = {"Authorization": f"Bearer {key}"} if key else {}
        h["Content-Type"] = "application/json"
        h.update(headers or {})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}{path}", data=data, headers=h) as r:
            return r.status, await r.json(), dict(r.headers)

    return asyncio.run(go())


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "max_denoising_steps": 2, **kw}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=10**6), "max_tokens"),
        (chat(max_completion_tokens="many"), "max_completion_tokens"),
        (chat(n=3), "n"),
        (chat(t_min=0.9, t_max=0.5), "t_max"),
        (chat(max_denoising_steps=-1), "max_denoising_steps"),
        (chat(seed="x"), "seed"),
        (chat(stream="yes"), "stream"),
        (chat(latency_target_ms=-5), "latency_target_ms"),
        (chat(frobnicate=1), "frobnicate"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_fields_are_400_naming_the_field(gw: RunningGateway, body: dict[str, Any], param: str) -> None:
    status, err, _ = post(gw, body)
    assert status == 400, err
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith(param)


def test_invalid_json_is_400(gw: RunningGateway) -> None:
    status, err, _ = post(gw, b"{not json")
    assert status == 400 and err["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("key", [None, "sk-wrong", KEY + "x"])
def test_a_missing_or_wrong_api_key_is_401(gw: RunningGateway, key: str | None) -> None:
    status, err, _ = post(gw, chat(), key=key)
    assert status == 401 and err["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key or "none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_every_configured_key_works(gw: RunningGateway) -> None:
    for key in (KEY, "sk-other"):
        assert post(gw, chat(), key=key)[0] == 200


def test_an_unknown_model_is_404(gw: RunningGateway) -> None:
    status, err, _ = post(gw, chat(model="gpt-9"))
    assert status == 404 and err["error"]["param"] == "model"
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_a_body_or_prompt_too_large_is_413(gw: RunningGateway) -> None:
    status, err, _ = post(gw, chat(messages=[{"role": "user", "content": "x" * 20000}]))
    assert status == 413 and err["error"]["code"] == "body_too_large"
    # 64-token limit: short enough bytes-wise for the body, too many tokens (counted by a worker).
    status, err, _ = post(gw, chat(messages=[{"role": "user", "content": "word " * 200}]))
    assert status == 413 and err["error"]["code"] == "prompt_too_long" and err["error"]["param"] == "messages"
    # Token-id prompts are counted without a worker.
    status, err, _ = post(gw, {"model": MODEL, "prompt": list(range(100)), "max_tokens": 4},
                          path="/v1/completions")
    assert status == 413 and err["error"]["param"] == "prompt"


def test_too_many_concurrent_streams_for_one_key_is_429_with_retry_after(gw: RunningGateway) -> None:
    started, release = threading.Event(), threading.Event()
    done: list[int] = []

    def long_stream() -> None:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2048, stream=True,
            extra_body={"max_denoising_steps": 8, "ignore_eos": True})
        for _ in stream:
            started.set()
            release.wait(30)
            break
        stream.close()  # the client goes away: the gateway cancels the worker's request
        done.append(1)

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    status, err, headers = post(gw, chat())
    release.set()
    t.join(60)
    assert status == 429 and err["error"]["code"] == "too_many_streams"
    assert int(headers["Retry-After"]) >= 1
    # The client went away: its slot comes back as soon as the gateway notices.
    deadline = time.monotonic() + 10
    while gw.server.api.streams.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done and post(gw, chat())[0] == 200


def test_a_strict_latency_target_no_endpoint_can_meet_is_429_with_retry_after(gw: RunningGateway) -> None:
    status, err, headers = post(gw, chat(max_tokens=2048, max_denoising_steps=64, latency_strict=True),
                                headers={"x-dgemma-latency-target-ms": "1"})
    assert status == 429 and "latency target of 1 ms" in err["error"]["message"]
    assert int(headers["Retry-After"]) >= 1


def test_an_upstream_deadline_is_504(gw: RunningGateway) -> None:
    status, err, _ = post(gw, chat(max_tokens=2048, max_denoising_steps=64, ignore_eos=True, timeout_s=0.3))
    assert status == 504 and err["error"]["type"] == "timeout"


def test_no_ready_endpoint_is_503(tmp_path: Path) -> None:
    # Nothing listens on this port: the endpoint never reports and never becomes ready.
    g = RunningGateway([static(("127.0.0.1:9", variant("cpu")))])
    try:
        status, err, headers = post(g, chat(), key=None)
        assert status == 503 and err["error"]["type"] == "service_unavailable" and "Retry-After" in headers
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])

        async def ready() -> int:
            async with aiohttp.ClientSession() as s, s.get(f"{g.url}/readyz") as r:
                return r.status

        assert asyncio.run(ready()) == 503
    finally:
        g.close()
