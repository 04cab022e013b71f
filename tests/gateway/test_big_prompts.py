"""A large body costs the gateway's event loop nothing it could stall on: a body declared over --max-body-bytes is
refused before it is read, a large one is parsed on a thread, and a prompt over --max-prompt-bytes is refused at
the gateway, by either front, before it is counted in tokens or sent to a worker. Images, which make bodies large
legitimately, still go through."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as tc
from PIL import Image
from tritonclient.utils import InferenceServerException

from dgemma_gateway import openai_api
from dgemma_gateway.openai_api import PARSE_ON_THREAD_BYTES, ApiLimits
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)
PROMPT_BYTES = 4096  # the gateway's limit here; its worker's is 8192 (16 x --max-prompt-tokens 512)
HANG_S = 60.0  # an answer that takes this long never came


@pytest.fixture(scope="module")
def gw(pool: Pool) -> Iterator[RunningGateway]:
    """Both fronts, a prompt byte limit below the worker's own, in front of a fast worker."""
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], grpc=True,
                       limits=ApiLimits(max_prompt_bytes=PROMPT_BYTES))
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()


def post(gw: RunningGateway, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}{path}", data=json.dumps(body).encode(),
                                                         headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    return asyncio.run(go())


def chat(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 4, "max_denoising_steps": 2,
            "messages": [{"role": "user", "content": content}]}


def noise_png(size: tuple[int, int] = (200, 150)) -> bytes:
    """A PNG that does not compress: its data: URL makes a body of ~120 KB."""
    out = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", chat("x" * (PROMPT_BYTES + 1)), "messages"),
    ("/v1/chat/completions", chat([{"type": "text", "text": "é" * (PROMPT_BYTES // 4)}] * 3), "messages"),
    ("/v1/chat/completions", chat("x" * (10 * 1024 * 1024)), "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * (PROMPT_BYTES + 1)}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x" * (PROMPT_BYTES + 1)]}, "prompt"),
])
def test_a_prompt_over_the_gateways_byte_limit_is_413_from_the_gateway_itself(
        gw: RunningGateway, path: str, body: dict[str, Any], param: str) -> None:
    status, error = post(gw, body, path)
    assert status == 413, error
    # The gateway's limit, not the worker's (8192): the prompt was never sent to be counted or generated.
    assert error["error"] == {"message": f"the prompt has more than {PROMPT_BYTES} bytes of text; the limit is "
                                         f"{PROMPT_BYTES} bytes (--max-prompt-bytes)", "type": "invalid_request_error",
                              "param": param, "code": "prompt_too_long"}, error


def test_a_prompt_at_the_byte_limit_goes_on_to_be_counted_in_tokens(gw: RunningGateway) -> None:
    status, reply = post(gw, chat([{"type": "text", "text": "é" * (PROMPT_BYTES // 4)}] * 2))  # 4096 bytes
    # Not refused for its bytes: the tiny worker counted it, and its 512 tokens are the limit that decides.
    assert status == 413 and reply["error"]["message"].endswith("tokens exceeds the limit of 512"), reply


def test_a_large_body_is_parsed_on_a_thread_not_on_the_event_loop(
        gw: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed_on: list[threading.Thread] = []
    parse = openai_api.parse_request

    def recording(*args: Any, **kwargs: Any) -> Any:
        parsed_on.append(threading.current_thread())
        return parse(*args, **kwargs)

    monkeypatch.setattr(openai_api, "parse_request", recording)
    image = f"data:image/png;base64,{base64.b64encode(noise_png()).decode()}"
    with_image = chat([{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}])
    assert len(json.dumps(with_image)) > PARSE_ON_THREAD_BYTES
    status, reply = post(gw, with_image)
    assert status == 200, reply  # the image is no part of the prompt's text bytes
    assert post(gw, chat("x" * (10 * 1024 * 1024)))[0] == 413
    assert post(gw, chat("Hi"))[0] == 200
    assert len(parsed_on) == 3
    assert parsed_on[0] is not gw.thread and parsed_on[1] is not gw.thread, "a large body was parsed on the loop"
    assert parsed_on[2] is gw.thread  # a small one is cheaper to parse than to hand off


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(gw: RunningGateway) -> None:
    """The client declares 100 MB and sends one byte of it: the answer comes without the rest."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HANG_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # a gateway waiting for the body times out here (HANG_S)
            assert chunk, answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_the_kserve_front_refuses_text_over_the_gateways_byte_limit(gw: RunningGateway) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x" * (PROMPT_BYTES + 1)], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [text])
    client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == (f"text_input: {PROMPT_BYTES + 1} bytes exceeds the limit of {PROMPT_BYTES} bytes "
                                    "before tokenizing")


def test_the_prompt_byte_limit_is_a_flag_defaulting_to_the_workers_rule() -> None:
    from dgemma_gateway.config import parse_config

    endpoint = ["--endpoint", "127.0.0.1:50051", "--model", "m"]
    assert parse_config(endpoint, env={}).limits.prompt_byte_limit == 16 * 32768
    assert parse_config([*endpoint, "--max-prompt-tokens", "100"], env={}).limits.prompt_byte_limit == 1600
    assert parse_config(endpoint, env={"DGEMMA_MAX_PROMPT_BYTES": "5000"}).limits.prompt_byte_limit == 5000
    with pytest.raises(SystemExit):
        parse_config([*endpoint, "--max-prompt-bytes", "0"], env={})
