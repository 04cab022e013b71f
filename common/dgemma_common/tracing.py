"""Request ids and OpenTelemetry traces across the gateway -> worker hop.

- `x-request-id`: accepted from the client when well-formed (bounded, a safe charset), minted otherwise; held
  in a context variable for the request's task, echoed on HTTP and gRPC, sent to the worker, and added to every
  log record of that request (`RequestIdFilter`).
- Traces: W3C `traceparent` is read from HTTP headers and gRPC metadata and written into the metadata of the
  gateway's call to the worker, so one request is one trace across both processes. Spans are exported over
  OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise the API's no-op tracer costs nothing.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"

_current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("dgemma_request_id", default=None)


# ---- request ids ----------------------------------------------------------------------------------------------

def accepted_request_id(value: object) -> str | None:
    """A client's request id if it is safe to log and echo (1-128 of [A-Za-z0-9._:-]); None otherwise."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The request id of the request this task serves, if any."""
    return _current_request_id.get()


def current_or_new_request_id() -> str:
    """The current request's id, or a fresh one outside a request."""
    return _current_request_id.get() or new_request_id()


def bind_request_id(value: object) -> str:
    """Make the client's id (or a fresh one) the current request's id for this task; return it."""
    rid = accepted_request_id(value) or new_request_id()
    _current_request_id.set(rid)
    return rid


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to each record's structured fields (the formatters print them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _current_request_id.get()
        if rid is not None:
            fields = dict(getattr(record, "fields", None) or {})
            fields.setdefault("request_id", rid)
            record.fields = fields
        return True


# ---- tracing --------------------------------------------------------------------------------------------------

def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Export spans over OTLP (gRPC) when OTEL_EXPORTER_OTLP_ENDPOINT is set; returns whether it does.

    The exporter reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers, certificates).
    """
    env = os.environ if env is None else env
    if not env.get(OTLP_ENDPOINT_ENV):
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def tracer(name: str) -> trace.Tracer:
    """The tracer of a component (a no-op one unless tracing is set up)."""
    return trace.get_tracer(name)


def context_from(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a request carries (W3C traceparent/tracestate in headers or metadata)."""
    return propagate.extract(carrier)


def outgoing_metadata(request_id: str, context: otel_context.Context | None = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a call made on behalf of a request: its id and its span (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return ((REQUEST_ID_HEADER, request_id), *sorted(carrier.items()))


def _metadata(pairs: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    return {k: v for k, v in (pairs or ()) if isinstance(v, str)}


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """For the named gRPC methods: the request id (from `x-request-id` metadata, or minted) bound for the
    handler's task and echoed in the initial metadata, and a server span whose parent is the caller's
    `traceparent`. Servicers need not know: they read `current_request_id()` and the current span."""

    def __init__(self, component: str, methods: Iterable[str]) -> None:
        self._tracer = tracer(component)
        self._methods = frozenset(methods)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method not in self._methods:
            return handler
        metadata = _metadata(details.invocation_metadata)
        span_name = method.lstrip("/")

        async def begin(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[object, trace.Span]:
            rid = bind_request_id(metadata.get(REQUEST_ID_HEADER))
            await context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            span = self._tracer.start_span(span_name, context=context_from(metadata), kind=trace.SpanKind.SERVER,
                                           attributes={"rpc.system": "grpc", "rpc.method": span_name,
                                                       "dgemma.request_id": rid})
            return otel_context.attach(trace.set_span_in_context(span)), span

        def end(token: object, span: trace.Span, error: BaseException | None) -> None:
            code = getattr(error, "code", None)
            if error is not None and not isinstance(error, GeneratorExit):
                span.set_attribute("rpc.grpc.status_code", str(code() if callable(code) else code or "UNKNOWN"))
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
            span.end()
            otel_context.detach(token)  # type: ignore[arg-type]

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                token, span = await begin(context)
                try:
                    result = await inner_uu(request, context)
                except BaseException as e:
                    end(token, span, e)
                    raise
                end(token, span, None)
                return result

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer)

        def streaming(inner: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                token, span = await begin(context)
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as e:
                    end(token, span, e)
                    raise
                end(token, span, None)

            return stream

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
        return handler
