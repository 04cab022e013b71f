"""A Triton user's tritonclient.grpc code (sync and aio) against the worker, unchanged."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from .conftest import RunningWorker

pytestmark = pytest.mark.timeout(120)
PARAMS = {"max_new_tokens": 40, "max_denoising_steps": 3, "ignore_eos": True}


def _text_input(text: str) -> tc.InferInput:
    tensor = tc.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def _text(result: Any) -> str:
    return "".join(x.decode() for x in result.as_numpy("text_output"))


def test_server_and_model_metadata(worker: RunningWorker) -> None:
    client = tc.InferenceServerClient(worker.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("other")
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["name"] == "tiny" and meta["platform"] == "dgemma"
    assert {i["name"] for i in meta["inputs"]} >= {"text_input", "input_ids", "sampling_parameters"}
    assert {o["name"] for o in meta["outputs"]} == {"text_output", "output_ids", "stop_reason"}
    config = client.get_model_config("tiny").config
    assert config.model_transaction_policy.decoupled
    assert client.get_server_metadata().name == "dgemma-worker"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")


def test_infer_returns_the_whole_reply_and_its_stats(worker: RunningWorker) -> None:
    client = tc.InferenceServerClient(worker.address)
    result = client.infer("tiny", [_text_input("Hello")], parameters=PARAMS, request_id="t-1")
    response = result.get_response()
    assert response.id == "t-1"
    assert len(result.as_numpy("output_ids")) == 40
    assert result.as_numpy("stop_reason")[0] == b"length"
    assert response.parameters["completion_tokens"].int64_param == 40
    assert response.parameters["canvases"].int64_param == 3
    assert len(_text(result)) > 0


def test_infer_errors_use_the_same_codes(worker: RunningWorker) -> None:
    client = tc.InferenceServerClient(worker.address)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [_text_input("Hello")], parameters={"max_new_tokens": 0})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "max_new_tokens" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [_text_input("Hello")], parameters={"temperature": 0.7})
    assert "temperature" in info.value.message()


def test_stream_infer_sends_one_response_per_commit_then_a_final_one(worker: RunningWorker) -> None:
    client = tc.InferenceServerClient(worker.address)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("tiny", [_text_input("Hello")], parameters=PARAMS, request_id="s-1")
        client.async_stream_infer("tiny", [_text_input("Hello")], parameters={"max_new_tokens": -5})
        got = [results.get(timeout=30) for _ in range(5)]  # 3 commits + final, and 1 error
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "max_new_tokens" in str(errors[0])
    responses = [r.get_response() for r, e in got if e is None]
    assert [r.parameters["triton_final_response"].bool_param for r in responses] == [False, False, False, True]
    assert all(r.id == "s-1" for r in responses)
    ids = [len(r.as_numpy("output_ids")) for r, e in got if e is None]
    assert ids == [16, 16, 8, 0]
    assert responses[-1].parameters["stop_reason"].string_param == "length"


async def test_aio_client_infer_and_stream_infer(worker: RunningWorker) -> None:
    async with tca.InferenceServerClient(worker.address) as client:
        assert await client.is_server_ready()
        result = await client.infer("tiny", [_text_input("Hi")], parameters=PARAMS)
        assert len(result.as_numpy("output_ids")) == 40

        async def requests() -> Any:
            yield {"model_name": "tiny", "inputs": [_text_input("Hi")], "parameters": PARAMS, "request_id": "a"}

        finals = 0
        texts = []
        async for result, error in client.stream_infer(requests()):
            assert error is None
            response = result.get_response()
            texts.append(_text(result))
            if response.parameters["triton_final_response"].bool_param:
                finals += 1
                break
        assert finals == 1 and len(texts) == 4


def test_a_stream_whose_request_does_not_parse_ends_at_once_instead_of_waiting_for_the_deadline(
    worker: RunningWorker,
) -> None:
    """Found by the fuzz suite: ModelStreamInfer hung until the client's deadline when a message did not parse
    (field 0 with wire type 7 never parses)."""
    call = worker.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\x07"]), timeout=20))
    assert err.value.code() is not grpc.StatusCode.DEADLINE_EXCEEDED
