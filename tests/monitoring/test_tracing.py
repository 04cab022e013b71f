"""One request is one trace across two processes: the client's `traceparent` enters the gateway (this process,
spans kept by the SDK's in-memory exporter), crosses to a real worker process in the gRPC metadata, and the
worker's spans (queue wait, each canvas, its encoder pass) come back over OTLP to a receiver in this test.
`x-request-id` is accepted or minted, echoed on HTTP and gRPC, and on the log lines of both sides."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import urllib3
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from dgemma_common import tracing
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, RunningGateway, static, variant

pytestmark = pytest.mark.timeout(240)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span the worker exports."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class Stack:
    gateway: RunningGateway
    exported: InMemorySpanExporter
    receiver: Receiver
    workers: LocalWorkers


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    trace.set_tracer_provider(provider)  # this process is the gateway
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    workers = LocalWorkers(str(tiny_model_dir()), 1, MODEL, ["--log-format", "json"], env=env,
                           workdir=tmp_path_factory.mktemp("traced"))
    gateway: RunningGateway | None = None
    try:
        workers.start()
        workers.wait_bound()
        gateway = RunningGateway([static((workers.workers[0].address, variant("traced")))], grpc=True)
        gateway.wait_ready(1)
        yield Stack(gateway, exported, receiver, workers)
    finally:
        if gateway is not None:
            gateway.close()
        workers.stop(timeout=5)
        server.stop(0)
        provider.shutdown()


def _complete(stack: Stack, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 20, "max_denoising_steps": 2, "ignore_eos": True}
    return urllib3.request("POST", f"{stack.gateway.url}/v1/completions", json=body, timeout=60,
                           headers={"Content-Type": "application/json", **headers})


def _worker_spans(stack: Stack, trace_id: str, names: set[str], timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [s for s in stack.receiver.spans if s.trace_id.hex() == trace_id]
        if names <= {s.name for s in mine}:
            return mine
        time.sleep(0.1)
    raise AssertionError(f"worker spans of {trace_id}: {sorted(s.name for s in stack.receiver.spans)}")


def test_one_request_is_one_connected_trace_across_gateway_and_worker(stack: Stack) -> None:
    r = _complete(stack, {"traceparent": TRACEPARENT, "x-request-id": "req-42"})
    assert r.status == 200, r.data
    assert r.headers["x-request-id"] == "req-42"
    ours: list[ReadableSpan] = [s for s in stack.exported.get_finished_spans()
                                if format(s.context.trace_id, "032x") == TRACE_ID]
    by_name = {s.name: s for s in ours}
    http, generate = by_name["POST /v1/completions"], by_name["gateway.generate"]
    assert http.parent is not None and format(http.parent.span_id, "016x") == "00f067aa0ba902b7"  # the client's
    assert generate.parent is not None and generate.parent.span_id == http.context.span_id
    attrs = generate.attributes or {}
    assert attrs["dgemma.variant"] == "traced" and attrs["dgemma.attempt"] == 1
    assert attrs["dgemma.request_id"] == "req-42" and "dgemma.predicted_ms" in attrs and "dgemma.elapsed_ms" in attrs

    worker = _worker_spans(stack, TRACE_ID, {"dgemma.v1.Denoiser/Generate", "queue wait", "canvas", "encoder pass"})
    server = next(s for s in worker if s.name == "dgemma.v1.Denoiser/Generate")
    assert server.parent_span_id.hex() == format(generate.context.span_id, "016x"), "the worker's span hangs " \
        "under the gateway's: the context crossed in the gRPC metadata"
    canvases = [s for s in worker if s.name == "canvas"]
    assert len(canvases) == 2  # 20 tokens on the tiny model's 16-token canvas
    assert {s.parent_span_id for s in canvases} == {server.span_id}
    encoders = [s for s in worker if s.name == "encoder pass"]
    assert {s.parent_span_id for s in encoders} == {c.span_id for c in canvases}
    queue = next(s for s in worker if s.name == "queue wait")
    assert queue.parent_span_id == server.span_id and queue.end_time_unix_nano <= canvases[0].start_time_unix_nano


def test_request_ids_are_minted_when_absent_or_unsafe_and_logged_on_both_sides(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    minted = _complete(stack, {}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted)
    unsafe = _complete(stack, {"x-request-id": "a b\u00e9" + "x" * 200}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe)

    caplog.set_level(logging.INFO, logger="dgemma_gateway")
    caplog.handler.addFilter(tracing.RequestIdFilter())  # as dgemma_common.logs.setup_logging does
    caplog.clear()  # only this request's records
    r = _complete(stack, {"x-request-id": "logged-7"})
    assert r.status == 200
    gateway_records = [rec for rec in caplog.records if rec.name.startswith("dgemma_gateway")]
    assert gateway_records, "the gateway logs each request"
    assert all(getattr(rec, "fields", {}).get("request_id") == "logged-7" for rec in gateway_records)
    deadline = time.monotonic() + 10
    worker_log = stack.workers.workers[0].log_path
    while '"request_id": "logged-7"' not in worker_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in worker_log.read_text().splitlines() if "logged-7" in line]
    assert lines and all('"request_id": "logged-7"' in line for line in lines)


def test_the_kserve_front_echoes_the_request_id_in_grpc_metadata(stack: Stack) -> None:
    channel = grpc.insecure_channel(stack.gateway.grpc_address)
    try:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        text = kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
        text.contents.bytes_contents.append(b"Hello")
        request = kpb.ModelInferRequest(model_name=MODEL, inputs=[text])
        request.parameters["max_tokens"].int64_param = 8
        _, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-9"),), timeout=60)
        assert ("x-request-id", "grpc-9") in call.initial_metadata()
    finally:
        channel.close()


def test_without_an_otlp_endpoint_nothing_is_set_up() -> None:
    assert tracing.setup_tracing("dgemma-test", env={}) is False
