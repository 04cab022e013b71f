"""When the only worker refuses a request, its reason reaches the client (not a router's "no endpoint")."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from dgemma_gateway.openai_api import ApiLimits
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)
SMALL_MESSAGES = 64 * 1024


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One worker that accepts messages of at most 64 KiB and prompts of at most 64 tokens."""
    workers = LocalWorkers(str(tiny_model_dir()), 1, MODEL, [
        "--max-message-bytes", str(SMALL_MESSAGES), "--max-prompt-tokens", "64"],
        workdir=tmp_path_factory.mktemp("small"))
    workers.start()
    g = None
    try:
        workers.wait_bound()
        g = RunningGateway([static((workers.workers[0].address, variant("only")))], grpc=True,
                           limits=ApiLimits(max_body_bytes=1024 * 1024))
        g.wait_ready(1)
        yield g
    finally:
        if g is not None:
            g.close()
        workers.stop()


def _chat(gw: RunningGateway, content: str) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "max_denoising_steps": 2}
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/chat/completions", json=body) as r:
            return r.status, await r.json()

    return asyncio.run(go())


def test_a_request_larger_than_the_only_worker_accepts_says_so_over_kserve(gw: RunningGateway) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x" * (2 * SMALL_MESSAGES)], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [text])
    client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value.message()
    assert "larger than the worker accepts" in info.value.message()
    assert "no endpoint" not in info.value.message()


def test_a_request_larger_than_the_only_worker_accepts_is_413_over_http(gw: RunningGateway) -> None:
    status, body = _chat(gw, "x" * (2 * SMALL_MESSAGES))
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large" and "larger than max" in body["error"]["message"]


@pytest.mark.parametrize(("content", "reason"), [("hi " * 300, "tokens exceeds the limit of 64"),
                                                 ("hello world " * 200, "bytes exceeds the limit of 1024 bytes")])
def test_a_prompt_over_the_only_workers_limits_is_413_naming_the_limit(
        gw: RunningGateway, content: str, reason: str) -> None:
    status, body = _chat(gw, content)
    assert status == 413, body
    assert body["error"]["code"] == "prompt_too_long" and reason in body["error"]["message"]
