"""grpc.health.v1 semantics: NOT_SERVING until loaded and warm, NOT_SERVING again while draining,
and a drain that lets an in-flight stream finish while refusing new requests."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_worker.server import load_engine

from .conftest import RunningWorker, text_request, wait_until, worker_config

pytestmark = pytest.mark.timeout(120)
SERVICES = ("", "dgemma.v1.Denoiser", "inference.GRPCInferenceService")


def _status(w: RunningWorker, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(w.channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_health_is_not_serving_until_warm_then_serving_then_not_serving_while_draining() -> None:
    gate = threading.Event()

    def slow_factory(config: Any, observer: Any) -> Any:
        gate.wait(60)  # the model "is loading" until the test lets it finish
        return load_engine(config, observer)

    w = RunningWorker(worker_config(), slow_factory)
    try:
        assert all(_status(w, s) == health_pb2.HealthCheckResponse.NOT_SERVING for s in SERVICES)
        with pytest.raises(grpc.RpcError) as info:
            list(w.stub.Generate(text_request()))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in info.value.details()
        assert not w.stub.GetLoad(pb.GetLoadRequest()).ready

        gate.set()
        w.wait_loaded()
        assert all(_status(w, s) == health_pb2.HealthCheckResponse.SERVING for s in SERVICES)

        # A stream in flight when the drain starts: 6 canvases of 8 steps each.
        params = pb.GenerationParams(max_new_tokens=96, max_denoising_steps=8, ignore_eos=True)
        stream = w.stub.Generate(text_request(params=params))
        assert next(stream).HasField("commit")
        drain = w.call_soon(w.server.drain(grace_s=30))

        assert wait_until(lambda: _status(w) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=2)
        with pytest.raises(grpc.RpcError) as info:
            list(w.stub.Generate(text_request()))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert w.stub.GetLoad(pb.GetLoadRequest()).draining

        rest = list(stream)
        assert not drain.done() or drain.result()  # the drain waited for the stream
        assert rest[-1].final.stop_reason == pb.STOP_REASON_LENGTH
        assert rest[-1].final.stats.completion_tokens == 96
        assert drain.result(30) is True
    finally:
        gate.set()
        w.close()


def test_health_goes_not_serving_when_the_engine_dies() -> None:
    from dgemma_common.params import GenerationParams
    from dgemma_common.types import Prompt

    worker = RunningWorker(worker_config())
    try:
        worker.wait_loaded()
        assert _status(worker) == health_pb2.HealthCheckResponse.SERVING
        engine = worker.engine

        def broken(group: object) -> None:
            raise RuntimeError("scheduler bug")

        engine._turn = broken
        list(engine.generate(Prompt.of_text("x"), GenerationParams(max_new_tokens=16, max_denoising_steps=2)))
        worker.call(worker.server.watch_engine(interval_s=0.05), timeout=10)
        assert _status(worker) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        worker.close()
