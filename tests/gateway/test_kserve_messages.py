"""The KServe `messages` tensor through the gateway's gRPC front (tritonclient): JSON larger than any chat within
the prompt byte limit is refused unread, the text is measured once parsed, and a large request is decoded on a
thread, not on the event loop every stream of the gateway shares."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from dgemma_common import kserve
from dgemma_common.params import Limits
from tests.gateway.gateway_harness import MODEL, RunningGateway, fast_gateway

pytestmark = pytest.mark.timeout(180)

gw = pytest.fixture(scope="module", name="gw")(fast_gateway)
LIMIT = Limits().prompt_byte_limit  # the gateway's KServe front, as the harness starts it


def messages(content: str) -> list[tc.InferInput]:
    tensor = tc.InferInput("messages", [1], "BYTES")
    chat = [{"role": "user", "content": content}]
    tensor.set_data_from_numpy(np.array([json.dumps(chat).encode()], dtype=object))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([b'{"max_tokens": 4, "max_denoising_steps": 2}'], dtype=object))
    return [tensor, params]


@pytest.fixture
def parsed_on(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads the messages JSON was parsed on, one per parse."""
    threads: list[threading.Thread] = []
    parse = kserve.parse_messages_json

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return parse(*args, **kwargs)

    monkeypatch.setattr(kserve, "parse_messages_json", recording)
    return threads


def infer_error(gw: RunningGateway, content: str) -> str:
    client = tc.InferenceServerClient(gw.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, messages(content))
    finally:
        client.close()
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    return str(info.value.message())


def test_messages_json_larger_than_any_chat_within_the_limit_is_refused_unread(
        gw: RunningGateway, parsed_on: list[threading.Thread]) -> None:
    message = infer_error(gw, "x" * (kserve.JSON_BYTES_PER_TEXT_BYTE * LIMIT + kserve.MESSAGES_JSON_SLACK))
    assert message.startswith("messages:") and "exceeds the limit" in message, message
    assert parsed_on == []


def test_messages_text_over_the_limit_is_refused_once_parsed_on_a_thread(
        gw: RunningGateway, parsed_on: list[threading.Thread]) -> None:
    # Escaped JSON (6 bytes a character) of text under the limit is let through to be parsed; text over the limit
    # is refused by its bytes before a worker counts its tokens (it went on to a worker before).
    message = infer_error(gw, "x" * (LIMIT + 1))
    assert message == f"messages: the messages have more than {LIMIT} bytes of text; the limit is {LIMIT} bytes"
    assert len(parsed_on) == 1 and parsed_on[0] is not gw.thread, "a large request was decoded on the event loop"
    client = tc.InferenceServerClient(gw.grpc_address)
    try:
        result = client.infer(MODEL, messages("\u0001" * 400))  # 6 JSON bytes a text byte: served
        assert result.as_numpy("stop_reason")[0] in (b"length", b"stop")
    finally:
        client.close()
    assert parsed_on[1] is gw.thread  # a small request: cheaper to decode than to hand off
