"""The HTTP front's request context: the request id (the client's `x-request-id` if well-formed, else a fresh
one) bound for the handler and echoed on the response, and a server span continuing the client's
`traceparent`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import trace

from dgemma_common.tracing import REQUEST_ID_HEADER, bind_request_id, context_from

REQUEST_ID = web.RequestKey("request_id", str)
_tracer = trace.get_tracer("dgemma_gateway")
log = logging.getLogger(__name__)
# Scrapes, probes and the operator's demand reads are not traced.
UNTRACED = frozenset({"/metrics", "/healthz", "/readyz", "/v1/dgemma/demand"})


@web.middleware
async def request_context(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Bind the request id; run the handler in a server span (outermost middleware)."""
    rid = bind_request_id(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = rid
    if request.path in UNTRACED:
        return await handler(request)
    route = request.match_info.route.resource
    name = f"{request.method} {route.canonical if route is not None else request.path}"
    with _tracer.start_as_current_span(
        name, context=context_from(request.headers), kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path, "dgemma.request_id": rid},
    ) as span:
        started = time.monotonic()
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(trace.StatusCode.ERROR)
        # One line per API request; RequestIdFilter adds its id (find it in the worker's log by the same id).
        log.info("%s %s %d", request.method, request.path, response.status, extra={"fields": {
            "event": "request", "status": response.status, "wall_s": round(time.monotonic() - started, 6)}})
        return response


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, streamed ones included, names the request it answers."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
