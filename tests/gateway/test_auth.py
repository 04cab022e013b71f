"""API keys on every port of the gateway that serves inference: the OpenAI HTTP API and the KServe gRPC front,
with real clients (the OpenAI SDK, aiohttp, tritonclient, grpcio)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc
from tritonclient.utils import InferenceServerException

from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(180)
KEY = "sk-auth-test-0123456789"


@pytest.fixture(scope="module")
def gw(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY}\n")
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], keys=keys, grpc=True)
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()


def _inputs() -> list[tc.InferInput]:
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    # ignore_eos: the random-weight model puts EOS within 8 tokens in about 1 run in 4.
    settings = {"max_tokens": 8, "max_denoising_steps": 2, "ignore_eos": True}
    params.set_data_from_numpy(np.array([json.dumps(settings).encode()], dtype=object))
    return [prompt, params]


def _auth_failures(gw: RunningGateway) -> dict[tuple[str, str], float]:
    text = gw.gateway.metrics.render().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("dgemma_gateway_auth_failures_total{"):
            labels = dict(p.split("=") for p in line[line.index("{") + 1 : line.index("}")].split(","))
            out[(labels["api"].strip('"'), labels["reason"].strip('"'))] = float(line.rsplit(" ", 1)[1])
    return out


def test_kserve_grpc_refuses_calls_without_a_valid_key(gw: RunningGateway) -> None:
    before = _auth_failures(gw)
    client = tc.InferenceServerClient(gw.grpc_address)
    for call in (lambda: client.infer(MODEL, _inputs()), lambda: client.get_model_metadata(MODEL),
                 lambda: client.is_server_ready()):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "missing API key" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, _inputs(), headers={"authorization": "Bearer sk-wrong"})
    assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "invalid API key" in info.value.message()
    # The decoupled stream is refused as it opens: its only event is the error.
    errors: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: errors.put(error))
    with contextlib.suppress(InferenceServerException):  # the stream may already have ended
        client.async_stream_infer(MODEL, _inputs())
    error = errors.get(timeout=30)
    assert error is not None and "UNAUTHENTICATED" in str(error.status())
    client.stop_stream()
    client.close()
    after = _auth_failures(gw)
    assert after.get(("kserve", "missing"), 0) - before.get(("kserve", "missing"), 0) == 4
    assert after.get(("kserve", "invalid"), 0) - before.get(("kserve", "invalid"), 0) == 1


@pytest.mark.parametrize("headers", [{"authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"},
                                     {"authorization": f"BEARER  {KEY} "}, {"x-api-key": KEY}])
def test_kserve_grpc_accepts_the_key_as_bearer_in_any_case_or_as_x_api_key(
        gw: RunningGateway, headers: dict[str, str]) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    result = client.infer(MODEL, _inputs(), headers=headers)
    assert len(result.as_numpy("output_ids")) == 8
    assert client.get_model_metadata(MODEL, headers=headers).name == MODEL
    client.close()


def test_health_and_reflection_stay_open_but_every_inference_method_needs_the_key(gw: RunningGateway) -> None:
    with grpc.insecure_channel(gw.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(kpb.ServerLiveRequest(), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        live = stub.ServerLive(kpb.ServerLiveRequest(), timeout=10, metadata=(("x-api-key", KEY),))
        assert live.live


def test_http_accepts_the_bearer_scheme_in_any_case_and_x_api_key(gw: RunningGateway) -> None:
    async def status(headers: dict[str, str]) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "max_denoising_steps": 2}
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/chat/completions", json=body,
                                                        headers=headers) as r:
            return r.status

    before = _auth_failures(gw)
    assert asyncio.run(status({"Authorization": f"bearer {KEY}"})) == 200
    assert asyncio.run(status({"X-Api-Key": KEY})) == 200
    assert asyncio.run(status({})) == 401
    assert asyncio.run(status({"Authorization": f"Basic {KEY}"})) == 401
    assert asyncio.run(status({"Authorization": "Bearer nope"})) == 401
    after = _auth_failures(gw)
    assert after[("openai", "missing")] - before.get(("openai", "missing"), 0) == 2
    assert after[("openai", "invalid")] - before.get(("openai", "invalid"), 0) == 1
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in sdk.models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
