"""Every field of a request is type-checked, also those the gateway ignores, and every refusal is a 4xx naming
the field: real clients (the OpenAI SDK, raw aiohttp for what the SDK cannot send, grpcio for raw bytes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from dgemma_gateway.openapi import openapi_document
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, fast_gateway

pytestmark = pytest.mark.timeout(180)
USER = [{"role": "user", "content": "Hi"}]


gw = pytest.fixture(scope="module", name="gw")(fast_gateway)


def post(gw: RunningGateway, data: bytes, content_type: str | None = "application/json",
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": content_type} if content_type else {}
        async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as s, s.post(
                f"{gw.url}{path}", data=data, headers=headers) as r:
            return r.status, await r.json()

    return asyncio.run(go())


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "hot"), ("temperature", 3.0), ("top_p", [1]), ("frequency_penalty", True), ("user", 5),
    ("logit_bias", ["x"]), ("logit_bias", {"5": 500}), ("metadata", "x"), ("store", "yes"), ("modalities", "text"),
    ("response_format", "json"), ("top_logprobs", 99), ("parallel_tool_calls", 1), ("service_tier", {"a": 1}),
    ("seed", 1.5), ("stop", [1]), ("n", "2"), ("stream_options", {"include_usage": "yes"}),
])
def test_ignored_and_used_fields_alike_are_type_checked(client: openai.OpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_body={field: value})
    error = info.value.body
    assert isinstance(error, dict) and error["param"].split(".")[0].split("[")[0] == field, error


def test_a_known_ignored_field_of_the_right_type_is_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0.3, top_p=0.9,
                                       user="u-1", metadata={"k": "v"}, store=False, seed=1,
                                       extra_body={"max_denoising_steps": 2})
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": 1, "content": "x"}], "messages[0].role"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}],
     "messages[0].content[0].image_url.detail"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x", "extra": 1}], "messages[0].extra"),
    ([], "messages"),
    ("hello", "messages"),
])
def test_bad_messages_name_the_message_and_field(client: openai.OpenAI, messages: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert info.value.body["param"] == param, info.value.body  # type: ignore[index]


@pytest.mark.parametrize(("data", "code"), [
    (b"[" * 100_000, "invalid_json"),  # nesting past the parser's depth: was a 500
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "timeout_s": NaN}', "invalid_value"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "timeout_s": Infinity}', "invalid_value"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', "invalid_value"),
    (b"\xff\xfe not utf-8", "invalid_json"),
    (b'"just a string"', "invalid_json"),
    (b"", "invalid_json"),
])
def test_malformed_bodies_are_400_never_500(gw: RunningGateway, data: bytes, code: str) -> None:
    status, body = post(gw, data)
    assert status == 400, body
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/octet-stream"])
def test_a_body_that_says_it_is_not_json_is_415(gw: RunningGateway, content_type: str) -> None:
    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4}).encode()
    status, error = post(gw, body, content_type)
    assert status == 415 and error["error"]["param"] == "Content-Type"
    assert post(gw, body, None)[0] == 200  # no Content-Type at all: read as JSON, as curl users expect
    assert post(gw, body, "application/json; charset=utf-8")[0] == 200


def test_the_openapi_document_is_generated_from_the_validating_models(gw: RunningGateway) -> None:
    async def fetch() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/openapi.json") as r:
            return await r.json()  # type: ignore[no-any-return]

    served = asyncio.run(fetch())
    assert served == json.loads(json.dumps(openapi_document()))
    chat = served["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and "messages" in chat["required"]
    temperature = chat["properties"]["temperature"]["anyOf"][0]
    assert (temperature["type"], temperature["minimum"], temperature["maximum"]) == ("number", 0.0, 2.0)
    role = served["components"]["schemas"]["ChatMessage"]["properties"]["role"]
    assert set(role["enum"]) == {"system", "developer", "user", "assistant"}


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ModelMetadata"])
def test_bytes_that_are_not_a_message_are_invalid_argument_on_the_kserve_front(gw: RunningGateway, method: str) -> None:
    with grpc.insecure_channel(gw.grpc_address) as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff\x0f not a protobuf message", timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request: ") and "inference." in info.value.details()


@pytest.mark.parametrize(("method", "streaming"), [("/dgemma.v1.Denoiser/Generate", True),
                                                   ("/dgemma.v1.Denoiser/GetLoad", False),
                                                   ("/dgemma.v1.Denoiser/Detokenize", False),
                                                   ("/inference.GRPCInferenceService/ModelStreamInfer", True)])
def test_bytes_that_are_not_a_message_are_invalid_argument_on_the_worker(
        pool: Pool, method: str, streaming: bool) -> None:
    with grpc.insecure_channel(pool.fast[0].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            if method.endswith("ModelStreamInfer"):
                list(channel.stream_stream(method)(iter([b"\xff\xff\xff\xff\x0f garbage"]), timeout=10))
            elif streaming:
                list(channel.unary_stream(method)(b"\xff\xff\xff\xff\x0f garbage", timeout=10))
            else:
                channel.unary_unary(method)(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        # The worker is unharmed.
        load = channel.unary_unary("/dgemma.v1.Denoiser/GetLoad", response_deserializer=pb.LoadReport.FromString)
        assert load(pb.GetLoadRequest().SerializeToString(), timeout=10).model_name == MODEL


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": [1] * 1_000_000},  # 2 MB of token ids: ~0.5 s of parsing on the event loop
    {"model": MODEL, "prompt": "x", "logit_bias": {str(i): 1 for i in range(200_000)}},
    {"model": MODEL, "prompt": "x", "metadata": {"a": [[0] * 8] * 60_000}},
])
def test_a_body_of_a_million_tiny_values_is_refused_before_parsing(gw: RunningGateway, body: dict[str, Any]) -> None:
    status, error = post(gw, json.dumps(body).encode(), path="/v1/completions")
    assert status == 413 and error["error"]["code"] == "body_too_large", error


@pytest.mark.parametrize("target", [float("nan"), -5.0, 1e12, "fast", True])
def test_a_bad_kserve_latency_target_is_invalid_argument_not_ignored(gw: RunningGateway, target: Any) -> None:
    from tritonclient.grpc import service_pb2 as kpb

    request = kpb.ModelInferRequest(model_name=MODEL)
    p = request.parameters["latency_target_ms"]
    if isinstance(target, bool):
        p.bool_param = target
    elif isinstance(target, str):
        p.string_param = target
    else:
        p.double_param = target
    with grpc.insecure_channel(gw.grpc_address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(request.SerializeToString(), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("latency_target_ms:")


@pytest.mark.parametrize("header", ["nan", "inf", "-1", "soon"])
def test_a_bad_latency_target_header_is_400_naming_it(client: openai.OpenAI, header: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,
                                       extra_headers={"x-dgemma-latency-target-ms": header})
    assert info.value.body["param"] == "x-dgemma-latency-target-ms"  # type: ignore[index]


@pytest.mark.parametrize(("field", "value", "path"), [
    ("prompt", [2**63], "/v1/completions"),  # found by the fuzz suite: a 500 when put in the int64 protobuf field
    ("max_denoising_steps", 2**63, "/v1/chat/completions"),
    ("max_tokens", 2**70, "/v1/chat/completions"),
])
def test_integers_past_int64_are_400_not_500(gw: RunningGateway, field: str, value: Any, path: str) -> None:
    body = {"model": MODEL, "max_tokens": 4, **({"prompt": "x"} if "completions" in path and "chat" not in path
                                                 else {"messages": USER}), field: value}
    status, error = post(gw, json.dumps(body).encode(), path=path)
    assert status == 400 and error["error"]["param"].startswith(field), error
