"""API keys on the worker's port (`DGEMMA_API_KEYS_FILE`): a worker process refuses every call to the Denoiser and
KServe services without a key, takes `authorization: bearer KEY` (any case of the scheme) or `x-api-key`, counts
refusals, re-reads a rotated key file; health (also the plaintext health-only port) and reflection stay open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.lifetime import die_with_parent
from dgemma_worker.model import tiny_model_dir

from .conftest import text_request, wait_until

pytestmark = pytest.mark.timeout(180)
KEY = "wk-0123456789-abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class KeyedWorker:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    keys_file: Path
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def auth_failures(self) -> dict[tuple[str, str], float]:
        """dgemma_worker_auth_failures_total by (api, reason), scraped from the metrics port."""
        url = f"http://127.0.0.1:{self.ports['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return {(s.labels["api"], s.labels["reason"]): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "dgemma_worker_auth_failures_total"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedWorker]:
    tmp = tmp_path_factory.mktemp("keyed-worker")
    keys_file, port_file, log = tmp / "keys", tmp / "ports.json", tmp / "worker.log"
    keys_file.write_text(f"# the gateway's key\n{KEY}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGEMMA_MODEL": str(tiny_model_dir()), "DGEMMA_HOST": "127.0.0.1",
           "DGEMMA_PORT": "0", "DGEMMA_METRICS_PORT": "0", "DGEMMA_HEALTH_PORT": "0",
           "DGEMMA_SERVED_MODEL_NAME": "tiny", "DGEMMA_API_KEYS_FILE": str(keys_file)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dgemma_worker.server", "--port-file", str(port_file)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    try:
        assert wait_until(port_file.exists, timeout=60), log.read_text()
        w = KeyedWorker(proc, json.loads(port_file.read_text()), keys_file, log)
        with grpc.insecure_channel(w.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING,
                              timeout=120), log.read_text()
        yield w
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


Call = Callable[[grpc.Channel, tuple[tuple[str, str], ...]], Any]
SMALL = pb.GenerationParams(max_new_tokens=8, max_denoising_steps=2, ignore_eos=True)
# Every RPC of both services that serve inference, as a client reaching the worker directly would make it.
CALLS: dict[str, Call] = {
    "Generate": lambda c, md: list(pb_grpc.DenoiserStub(c).Generate(text_request(params=SMALL), metadata=md,
                                                                     timeout=60)),
    "WatchLoad": lambda c, md: next(iter(pb_grpc.DenoiserStub(c).WatchLoad(pb.WatchLoadRequest(interval_s=1),
                                                                           metadata=md, timeout=30))),
    "GetLoad": lambda c, md: pb_grpc.DenoiserStub(c).GetLoad(pb.GetLoadRequest(), metadata=md, timeout=30),
    "Tokenize": lambda c, md: pb_grpc.DenoiserStub(c).Tokenize(
        pb.TokenizeRequest(prompt=pb.Prompt(text="Hello")), metadata=md, timeout=30),
    "Detokenize": lambda c, md: pb_grpc.DenoiserStub(c).Detokenize(pb.DetokenizeRequest(token_ids=[1, 2]),
                                                                   metadata=md, timeout=30),
    "ServerLive": lambda c, md: kpb_grpc.GRPCInferenceServiceStub(c).ServerLive(kpb.ServerLiveRequest(),
                                                                                metadata=md, timeout=30),
    "ModelMetadata": lambda c, md: kpb_grpc.GRPCInferenceServiceStub(c).ModelMetadata(
        kpb.ModelMetadataRequest(name="tiny"), metadata=md, timeout=30),
    "ModelInfer": lambda c, md: kpb_grpc.GRPCInferenceServiceStub(c).ModelInfer(_infer_request(), metadata=md,
                                                                                timeout=60),
    "ModelStreamInfer": lambda c, md: list(kpb_grpc.GRPCInferenceServiceStub(c).ModelStreamInfer(
        iter([_infer_request()]), metadata=md, timeout=60)),
}


def _infer_request() -> kpb.ModelInferRequest:
    text = kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Hello")
    request = kpb.ModelInferRequest(model_name="tiny", inputs=[text])
    request.parameters["max_new_tokens"].int64_param = 8
    request.parameters["max_denoising_steps"].int64_param = 2
    return request


def _code(call: Call, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        call(channel, metadata)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_every_inference_rpc_needs_the_key_and_takes_bearer_in_lower_case(worker: KeyedWorker, rpc: str) -> None:
    with grpc.insecure_channel(worker.address) as channel:
        missing = channel, ()
        wrong = channel, (("authorization", "Bearer wk-wrong"),)
        assert _code(CALLS[rpc], *missing) is grpc.StatusCode.UNAUTHENTICATED
        assert _code(CALLS[rpc], *wrong) is grpc.StatusCode.UNAUTHENTICATED
        assert _code(CALLS[rpc], channel, (("authorization", f"bearer {KEY}"),)) is grpc.StatusCode.OK
        assert _code(CALLS[rpc], channel, (("x-api-key", KEY),)) is grpc.StatusCode.OK


def test_a_refusal_says_what_to_send_and_is_counted_by_service_and_reason(worker: KeyedWorker) -> None:
    before = worker.auth_failures()
    with grpc.insecure_channel(worker.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.DenoiserStub(channel).GetLoad(pb.GetLoadRequest(), timeout=30)
        assert "missing API key" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                kpb.ServerReadyRequest(), metadata=(("x-api-key", "wk-wrong"),), timeout=30)
        assert "invalid API key" in (info.value.details() or "")
    after = worker.auth_failures()
    assert after[("denoiser", "missing")] - before[("denoiser", "missing")] == 1
    assert after[("kserve", "invalid")] - before[("kserve", "invalid")] == 1
    assert after[("denoiser", "invalid")] == before[("denoiser", "invalid")]


def test_health_reflection_and_the_health_only_port_stay_open_without_a_key(worker: KeyedWorker) -> None:
    for port in (worker.ports["port"], worker.ports["health_port"]):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for service in ("", "dgemma.v1.Denoiser", "inference.GRPCInferenceService"):
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                 timeout=10)
                assert reply.status == SERVING
    with grpc.insecure_channel(worker.address) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in next(iter(replies)).list_services_response.service}
    assert {"dgemma.v1.Denoiser", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_a_rotated_key_file_is_read_again_without_a_restart(worker: KeyedWorker) -> None:
    new = "wk-rotated-9876543210"
    old_text = worker.keys_file.read_text()

    def code(key: str) -> grpc.StatusCode:
        with grpc.insecure_channel(worker.address) as channel:
            return _code(CALLS["GetLoad"], channel, (("x-api-key", key),))

    try:
        # As a Secret volume does: the new content appears under the same path (a rename, so never half-written).
        tmp = worker.keys_file.with_name("keys.tmp")
        tmp.write_text(f"{new}\n")
        tmp.replace(worker.keys_file)
        assert wait_until(lambda: code(new) is grpc.StatusCode.OK, timeout=20, interval=0.5)
        assert code(KEY) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        tmp.write_text(old_text)
        tmp.replace(worker.keys_file)
        assert wait_until(lambda: code(KEY) is grpc.StatusCode.OK, timeout=20, interval=0.5)
