"""OpenAI-compatible HTTP upstreams: vLLM pods and external APIs, as the gateway's second kind of endpoint.

A request is forwarded as a streamed chat or text completion built from what the gateway validated (never the
client's raw body). The upstream's server-sent events become the gateway's own events as they arrive (one
commit per content chunk, then a final with the upstream's usage), so both front ends serve them like a
worker's. Errors become `UpstreamFailure`s; the core retries elsewhere only before anything reached the
client. Closing the event stream (the client went away) closes the connection, which makes the upstream
abort the request.

Load: a server with vLLM's metrics is scraped (`vllm_load`) together with its `/health`; any other upstream
is routed on the latencies the gateway measured of its own requests there (`measured_load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dgemma_common import vllm
from dgemma_gateway import vllm_load
from dgemma_gateway.errors import GatewayError, UpstreamFailure, http_failure
from dgemma_gateway.measured_load import MeasuredLatency
from dgemma_gateway.request import GatewayRequest
from dgemma_gateway.runtimes import openai_settings
from dgemma_gateway.types import EndpointLoad, Variant
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1 << 20  # one server-sent event; a canvas of text is a few kilobytes
MAX_ERROR_BYTES = 64 << 10  # an error body read for its message
MAX_METRICS_BYTES = 8 << 20
MAX_RETRY_AFTER_S = 3600.0
MIN_SCRAPE_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
STOP_REASONS = {"length": pb.STOP_REASON_LENGTH}

Report = Callable[[EndpointLoad | None, float | None], None]  # (load or None, measured step fraction or None)


def _trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The W3C trace context of a call (traceparent, tracestate); the request id is set by the endpoint."""
    return {k: v for k, v in (headers or {}).items() if k.lower() in ("traceparent", "tracestate")}


@dataclass(frozen=True)
class HttpTarget:
    """Where an OpenAI-compatible upstream is and how to use it."""

    base_url: str  # the API root, e.g. http://10.0.0.7:8000/v1 (completions are under it)
    model: str  # the model's name on the upstream
    api_key: str | None = field(default=None, repr=False)
    capacity: int = vllm.DEFAULT_MAX_NUM_SEQS  # requests it runs at once (vLLM's --max-num-seqs, an API's limit)
    max_queue: int = 16  # more that may wait there
    scrape: bool = True  # read vLLM's /metrics and /health; False: measured latencies only (external APIs)

    @property
    def server_root(self) -> str:
        """The server's root, where vLLM serves /metrics and /health (the API root without its /v1)."""
        base = self.base_url.rstrip("/")
        return base[: -len(vllm.API_PREFIX)] if base.endswith(vllm.API_PREFIX) else base


def http_base_url(text: str) -> str:
    """An OpenAI-compatible API root (http or https, with a host), without a trailing slash."""
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ValueError(f"{text!r} is not an http(s) base URL such as http://10.0.0.7:8000/v1")
    return text.rstrip("/")


def request_body(req: GatewayRequest, target: HttpTarget, variant: Variant) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of the streamed completion that forwards a request."""
    body: dict[str, Any] = {"model": target.model, "stream": True, "stream_options": {"include_usage": True}}
    kind = req.prompt.WhichOneof("kind")
    if kind == "chat":
        path = "/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.prompt.chat.messages]
    else:
        path = "/completions"
        body["prompt"] = req.prompt.text if kind == "text" else list(req.prompt.tokens.ids)
    body.update(openai_settings(variant.runtime, req.settings))
    return path, body


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) in seconds from now, bounded; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, OverflowError):
            return None
        seconds = when - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def _error_fields(payload: Any) -> tuple[str, str | None, int | None]:
    """(message, param, code) of an OpenAI-style error object; vLLM puts the HTTP status in `code`."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "", None, None
    message, param, code = error.get("message"), error.get("param"), error.get("code")
    return (message[:1000] if isinstance(message, str) else "", param if isinstance(param, str) else None,
            code if isinstance(code, int) and not isinstance(code, bool) else None)


def client_param(req: GatewayRequest, param: str | None) -> str | None:
    """An upstream's OpenAI field name as the client named it (max_tokens may have been max_completion_tokens)."""
    if param in ("max_tokens", "max_completion_tokens"):
        return req.client_field("max_new_tokens")
    if param in ("messages", "prompt"):
        return req.client_field("prompt")
    return param


async def server_sent_data(stream: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each server-sent event, in order; fields other than data and comments are skipped."""
    lines: list[str] = []
    size = 0
    while True:
        raw = await stream.readline()
        if not raw:
            if lines:
                yield "\n".join(lines)
            return
        line = raw.rstrip(b"\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
            lines, size = [], 0
            continue
        name, _, value = line.partition(b":")
        if name != b"data":
            continue
        value = value[1:] if value.startswith(b" ") else value
        size += len(value)
        if size > MAX_EVENT_BYTES:
            raise ValueError(f"an event exceeds {MAX_EVENT_BYTES} bytes")
        lines.append(value.decode())


def _broken(what: str) -> UpstreamFailure:
    return UpstreamFailure(GatewayError(503, f"the upstream {what}", code="upstream_unavailable", retry_after_s=1.0),
                           retryable=True, failing=True, reason="connection")


class OpenAIUpstream:
    """One OpenAI-compatible server: forwards requests, and keeps its load fresh."""

    def __init__(self, target: HttpTarget, session: aiohttp.ClientSession, clock: Callable[[], float],
                 interval_s: float, report: Report, variant: Callable[[], Variant]) -> None:
        self.target = target  # replaced by the registry when only its key changes: read at each request
        self.session = session
        self.clock = clock
        self.interval_s = interval_s
        self.report = report  # where the load goes
        self.variant = variant  # the endpoint's variant as it is now
        self.measured = MeasuredLatency()
        self.inflight = 0
        self.scraping = target.scrape  # False once the server turned out to have no vLLM metrics

    def _headers(self, request_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.target.api_key}"} if self.target.api_key else {}
        if request_id:
            headers["X-Request-Id"] = request_id
        return headers

    # ---- requests -------------------------------------------------------------------------------

    async def generate(self, req: GatewayRequest, variant: Variant, timeout_s: float,
                       headers: Mapping[str, str] | None = None) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The request's events: a commit per content chunk, then the final; raises UpstreamFailure. `headers`
        (the trace context) go with the call; the request id is sent as X-Request-Id either way."""
        path, body = request_body(req, self.target, variant)
        started = self.clock()
        concurrency = self.inflight + 1
        self.inflight += 1
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, timeout_s))
        response: aiohttp.ClientResponse | None = None
        complete = False
        try:
            try:
                response = await self.session.post(self.target.base_url.rstrip("/") + path, json=body,
                                                   headers={**_trace_headers(headers),
                                                            **self._headers(req.request_id),
                                                            "Accept": "text/event-stream"},
                                                   timeout=timeout)
            except (aiohttp.ClientError, OSError) as exc:
                raise _broken(f"could not be reached ({type(exc).__name__})") from None
            if response.status != 200:
                raise await self._failure(req, response)
            async with contextlib.aclosing(self._events(req, variant, response, started, concurrency)) as events:
                async for event in events:
                    yield event
            complete = True
        except TimeoutError:
            error = GatewayError(504, "the request's deadline passed upstream", code="upstream_timeout")
            raise UpstreamFailure(error, retryable=False, failing=False, reason="timeout") from None
        finally:
            self.inflight -= 1
            if response is not None:
                # A stream cut short closes its connection, so the upstream sees the client go and aborts.
                (response.release if complete else response.close)()

    async def _failure(self, req: GatewayRequest, response: aiohttp.ClientResponse) -> UpstreamFailure:
        try:
            raw = await response.content.read(MAX_ERROR_BYTES)
            payload = json.loads(raw) if raw else None
        except (ValueError, aiohttp.ClientError):
            payload = None
        message, param, _ = _error_fields(payload)
        wait = retry_after_s(response.headers.get("Retry-After"))
        return http_failure(response.status, message, client_param(req, param), wait)

    async def _events(self, req: GatewayRequest, variant: Variant, response: aiohttp.ClientResponse,
                      started: float, concurrency: int) -> AsyncGenerator[pb.GenerateResponse, None]:
        chat = req.prompt.WhichOneof("kind") == "chat"
        usage: Mapping[str, Any] = {}
        finish: str | None = None
        stopped_by_string = False
        commits = 0
        first_commit: float | None = None
        try:
            async for data in server_sent_data(response.content):
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError("an event is not a JSON object")
                if "error" in chunk:
                    message, param, code = _error_fields(chunk)
                    failure = http_failure(code if code is not None else 502, message, client_param(req, param))
                    raise failure
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if not isinstance(choice, dict):
                        continue
                    text = _delta_text(choice) if chat else choice.get("text")
                    if isinstance(text, str) and text:
                        first_commit = self.clock() if first_commit is None else first_commit
                        yield pb.GenerateResponse(request_id=req.request_id,
                                                  commit=pb.Commit(canvas_index=commits, text=text))
                        commits += 1
                    if isinstance(choice.get("finish_reason"), str):
                        finish = choice["finish_reason"]
                        stopped_by_string = isinstance(choice.get("stop_reason"), str)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError):
            raise _broken("connection broke mid-stream") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _broken(f"sent a malformed event ({exc})") from None
        if finish is None:
            raise _broken("ended the stream before the completion finished")
        yield self._final(req, variant, finish, stopped_by_string, usage, started, first_commit, concurrency)

    def _final(self, req: GatewayRequest, variant: Variant, finish: str, stopped_by_string: bool,
               usage: Mapping[str, Any], started: float, first_commit: float | None, concurrency: int
               ) -> pb.GenerateResponse:
        now = self.clock()
        prompt_tokens = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        # The upstream reports tokens, not canvases: a canvas is a block of canvas_length tokens.
        canvases = math.ceil(completion / max(1, variant.canvas_length))
        self.measured.observe(now - started, max(1, canvases), completion, concurrency)
        if not self.scraping:
            self._report_measured()  # before the client can send its next request
        reason = STOP_REASONS.get(finish, pb.STOP_REASON_STOP_STRING if stopped_by_string else pb.STOP_REASON_EOS)
        stats = pb.RequestStats(prompt_tokens=prompt_tokens, completion_tokens=completion, canvases=canvases,
                                total_s=now - started)
        if first_commit is not None:
            stats.time_to_first_commit_s = first_commit - started
        return pb.GenerateResponse(request_id=req.request_id, final=pb.Final(stop_reason=reason, stats=stats))

    # ---- load -----------------------------------------------------------------------------------

    def _report_measured(self) -> None:
        v = self.variant()
        self.report(self.measured.load(v, self.inflight, self.target.capacity, self.target.max_queue, self.clock()),
                    None)

    async def watch(self) -> None:
        """Report the load every interval until cancelled (None while the upstream is unreachable)."""
        prev: vllm_load.VllmSample | None = None
        measured: vllm_load.Timing | None = None
        backoff = self.interval_s
        while True:
            if not self.scraping:
                self._report_measured()
                await asyncio.sleep(self.interval_s)
                continue
            try:
                sample = await self._scrape()
                healthy = sample is not None and await self._healthy()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.debug("scrape of %s failed: %s", self.target.server_root, exc)
                self.report(None, None)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = max(MIN_SCRAPE_INTERVAL_S, self.interval_s)
            if sample is None:
                log.info("%s serves no vLLM metrics: routing on the latencies of its own requests",
                         self.target.server_root)
                self.scraping = False
                continue
            v = self.variant()
            measured = vllm_load.timing(prev, sample, v.canvas_length, measured)
            prev = sample
            load = vllm_load.load(sample, measured, v, self.target.capacity, self.target.max_queue, healthy)
            self.report(load, vllm_load.step_fraction(measured, v))
            await asyncio.sleep(backoff)

    async def _scrape(self) -> vllm_load.VllmSample | None:
        """The server's vLLM metrics; None when it serves none (no /metrics, or not vLLM's)."""
        timeout = aiohttp.ClientTimeout(total=5.0)
        url = self.target.server_root + vllm.METRICS_PATH
        async with self.session.get(url, headers=self._headers(), timeout=timeout) as r:
            if r.status == 404:
                return None
            r.raise_for_status()
            raw = await r.content.read(MAX_METRICS_BYTES + 1)
        if len(raw) > MAX_METRICS_BYTES:
            raise ValueError(f"the metrics page exceeds {MAX_METRICS_BYTES} bytes")
        text = raw.decode(errors="replace")
        # Parsing a page takes milliseconds: off the event loop.
        return await asyncio.to_thread(vllm_load.parse, text, self.clock())

    async def _healthy(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=5.0)
        url = self.target.server_root + vllm.HEALTH_PATH
        async with self.session.get(url, headers=self._headers(), timeout=timeout) as r:
            with contextlib.suppress(aiohttp.ClientError):
                await r.content.read(MAX_ERROR_BYTES)
            return r.status == 200


def _delta_text(choice: Mapping[str, Any]) -> Any:
    delta = choice.get("delta")
    return delta.get("content") if isinstance(delta, dict) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
