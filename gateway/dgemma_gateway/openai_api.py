"""The OpenAI-compatible HTTP API (aiohttp): chat and text completions with SSE streaming, models,
health, metrics, the demand JSON and the OpenAPI document.

Handlers only translate: a body becomes `GatewayRequest`s (validated here, 400 naming the field),
`Gateway.generate` does the work, and its events become OpenAI JSON or server-sent events. Headers of
a stream are sent with its first event, so anything that fails before it is a plain HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dgemma_common.auth import ApiKeys
from dgemma_common.params import FIELD_NAMES, Limits, ParamError, params_from_mapping
from dgemma_gateway.auth import StreamLimiter, authenticate
from dgemma_gateway.core import Gateway, GatewayRequest
from dgemma_gateway.errors import GatewayError, bad_request
from dgemma_gateway.openapi import openapi_document
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

log = logging.getLogger(__name__)

LATENCY_HEADER = "x-dgemma-latency-target-ms"
DRAFT_EVENT = "dgemma.draft"
FINISH_REASONS = {pb.STOP_REASON_EOS: "stop", pb.STOP_REASON_STOP_STRING: "stop", pb.STOP_REASON_LENGTH: "length"}
# DiffusionGemma's own knobs, accepted as extra body fields (and `seed`, `stop` from OpenAI itself).
DGEMMA_FIELDS = (
    "max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold",
    "draft_interval_s", "ignore_eos", "stream_drafts",
)
# Autoregressive sampling knobs have no meaning for a diffusion model: accepted (clients send them) and ignored.
IGNORED_FIELDS = frozenset({
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "user", "logit_bias", "top_k", "min_p",
    "repetition_penalty", "parallel_tool_calls", "metadata", "store", "service_tier", "reasoning_effort",
    "modalities", "prediction", "audio", "web_search_options", "echo", "best_of", "suffix", "min_tokens",
    "top_logprobs", "response_format", "tool_choice", "functions", "function_call", "safety_identifier",
    "prompt_cache_key", "verbosity",
})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSET = object()


@dataclass(frozen=True)
class ApiLimits:
    """What one request may ask for."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int = 32768
    max_tokens: int = 8192
    default_max_tokens: int = 256
    max_n: int = 4
    max_streams_per_key: int = 64


@dataclass(frozen=True)
class Parsed:
    """A validated OpenAI request."""

    requests: list[GatewayRequest]
    stream: bool
    include_usage: bool
    drafts: bool
    model: str


def _int_field(body: Mapping[str, Any], name: str, lo: int, hi: int, default: Any = UNSET) -> Any:
    value = body.get(name, default)
    if value is UNSET or value is None:
        return default if default is not UNSET else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise bad_request(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _bool_field(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, f"must be a boolean, got {value!r}")
    return value


def _latency_target(body: Mapping[str, Any], header: str | None) -> float | None:
    value: Any = body.get("latency_target_ms")
    name = "latency_target_ms"
    if value is None and header is not None:
        name = LATENCY_HEADER
        try:
            value = float(header)
        except ValueError:
            raise bad_request(name, f"must be a number of milliseconds, got {header!r}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= 3_600_000:
        raise bad_request(name, f"must be a number of milliseconds in (0, 3600000], got {value!r}")
    return float(value)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{i}]", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if value is None:
        return ""
    raise bad_request(where, "must be a string or a list of text parts")


def chat_prompt(messages: Any) -> pb.Prompt:
    """OpenAI chat messages as a chat prompt (the worker applies the model's template)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(f"messages[{i}].role", f"must be one of {sorted(ROLES)}, got {m.get('role')!r}")
        out.append(pb.ChatMessage(role=role, content=_content(m.get("content"), f"messages[{i}].content")))
    return pb.Prompt(chat=pb.ChatMessages(messages=out))


def text_prompt(prompt: Any) -> pb.Prompt:
    """A completions prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt", "must not be empty")
        return pb.Prompt(text=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise bad_request("prompt", "token ids must be >= 0")
        return pb.Prompt(tokens=pb.TokenIds(ids=prompt))
    raise bad_request("prompt", "must be a non-empty string or a list of token ids (one prompt per request)")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object", code="invalid_json")
    return body


def parse_request(
    body: Mapping[str, Any], kind: str, limits: ApiLimits, latency_header: str | None = None
) -> Parsed:
    """Validate an OpenAI chat ('chat') or completions ('text') body into gateway requests (one per choice)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model", "is required and must be a string")
    prompt = chat_prompt(body.get("messages")) if kind == "chat" else text_prompt(body.get("prompt"))
    if body.get("tools"):
        raise bad_request("tools", "tool calling is not supported")
    if body.get("logprobs") not in (None, False, 0):
        raise bad_request("logprobs", "log probabilities are not supported")
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int_field(body, token_field, 1, limits.max_tokens, limits.default_max_tokens)
    n = _int_field(body, "n", 1, limits.max_n, 1)
    stream = _bool_field(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options", "must be an object")
    include_usage = bool((options or {}).get("include_usage", False))
    timeout_s = body.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
                                  or not 0 < timeout_s <= 3600):
        raise bad_request("timeout_s", f"must be a number of seconds in (0, 3600], got {timeout_s!r}")
    strict = body.get("latency_strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("latency_strict", f"must be a boolean, got {strict!r}")
    settings: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name in (*DGEMMA_FIELDS, "seed", "stop"):
        if body.get(name) is not None:
            settings[name] = body[name]
    try:
        # The worker checks again against its own limits; this catches bad values before routing.
        params_from_mapping(settings, limits=Limits(max_new_tokens=limits.max_tokens))
    except ParamError as exc:
        raise bad_request(token_field if exc.field == "max_new_tokens" else exc.field, exc.reason) from None
    unknown = sorted(set(body) - KNOWN_FIELDS[kind])
    if unknown:
        raise bad_request(unknown[0], "unknown field")
    target = _latency_target(body, latency_header)
    names = {"max_new_tokens": token_field, "prompt": "messages" if kind == "chat" else "prompt"}
    requests = []
    for i in range(n):
        s = dict(settings)
        if n > 1 and "seed" in s:
            s["seed"] = s["seed"] + i  # distinct but reproducible choices
        requests.append(GatewayRequest(
            model=model, prompt=prompt, settings=s, latency_target_ms=target, strict=strict,
            timeout_s=float(timeout_s) if timeout_s is not None else None, param_names=names,
        ))
    return Parsed(requests, stream, include_usage, bool(settings.get("stream_drafts")), model)


_COMMON = {"model", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "seed", "stop",
           "latency_target_ms", "latency_strict", "timeout_s", "tools", "logprobs", *DGEMMA_FIELDS}
KNOWN_FIELDS = {
    "chat": frozenset(_COMMON | {"messages"} | IGNORED_FIELDS),
    "text": frozenset(_COMMON | {"prompt"} | IGNORED_FIELDS),
}
assert set(DGEMMA_FIELDS) <= FIELD_NAMES


async def merge(
    streams: Sequence[AsyncGenerator[pb.GenerateResponse, None]],
) -> AsyncGenerator[tuple[int, Any], None]:
    """Events of several streams as (index, event) in arrival order; the first error ends them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncGenerator[pb.GenerateResponse, None]) -> None:
        try:
            async for item in s:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _dgemma_extra(finals: Sequence[pb.Final | None], trace: Mapping[str, Any]) -> dict[str, Any]:
    stats = [f.stats for f in finals if f is not None]
    return {
        "variant": trace.get("variant"),
        "endpoint": trace.get("endpoint"),
        "latency_target_ms": trace.get("target_ms"),
        "predicted_ms": trace.get("predicted_ms"),
        "prediction": trace.get("prediction"),
        "target_met": trace.get("target_met"),
        "canvases": sum(s.canvases for s in stats),
        "decoder_passes": sum(s.decoder_passes for s in stats),
        "tokens_per_forward": (sum(s.completion_tokens for s in stats) / max(1, sum(s.decoder_passes for s in stats))),
    }


class OpenAIApp:
    """The aiohttp application around one Gateway."""

    def __init__(self, gateway: Gateway, keys: ApiKeys, limits: ApiLimits | None = None) -> None:
        self.gateway = gateway
        self.keys = keys
        self.limits = limits or ApiLimits()
        self.streams = StreamLimiter(self.limits.max_streams_per_key)
        self.app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._errors])
        r = self.app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/v1/models/{model:.+}", self.get_model)
        r.add_get("/v1/dgemma/demand", self.demand)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.openapi)

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as err:
            return web.json_response(err.body(), status=err.status, headers=err.headers())
        except web.HTTPRequestEntityTooLarge:
            big = GatewayError(413, f"the body exceeds {self.limits.max_body_bytes} bytes", code="body_too_large")
            return web.json_response(big.body(), status=413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": {"message": exc.reason, "type": "invalid_request_error", "param": None,
                              "code": str(exc.status)}}
            return web.json_response(body, status=exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            internal = GatewayError(500, "internal error in the gateway", code="internal_error")
            return web.json_response(internal.body(), status=500)

    def _authenticate(self, request: web.Request) -> str:
        return authenticate(self.keys, request.headers,
                            lambda reason: self.gateway.metrics.auth_failures.labels("openai", reason).inc())

    # ---- plain endpoints ------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """The process is alive."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """At least one endpoint is ready."""
        n = self.gateway.ready_count()
        return web.json_response({"ready": n > 0, "endpoints_ready": n}, status=200 if n else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format."""
        return web.Response(body=self.gateway.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def demand(self, request: web.Request) -> web.Response:
        """The autoscaler's measurements (see demand.py)."""
        return web.json_response(self.gateway.demand_snapshot())

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of this API."""
        return web.json_response(openapi_document())

    async def list_models(self, request: web.Request) -> web.Response:
        """Served model names."""
        self._authenticate(request)
        return web.json_response({"object": "list", "data": [_model(m) for m in self.gateway.models()]})

    async def get_model(self, request: web.Request) -> web.Response:
        """One served model."""
        self._authenticate(request)
        name = request.match_info["model"]
        if name not in self.gateway.models():
            raise GatewayError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return web.json_response(_model(name))

    # ---- completions ----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._complete(request, "text")

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        key = self._authenticate(request)
        parsed = parse_request(parse_body(await request.read()), kind, self.limits,
                               request.headers.get(LATENCY_HEADER))
        if parsed.model not in self.gateway.models():
            raise GatewayError(404, f"model {parsed.model!r} does not exist; served: {self.gateway.models()}",
                               param="model", code="model_not_found")
        tokens = await self.gateway.count_prompt_tokens(parsed.model, parsed.requests[0].prompt,
                                                        self.limits.max_prompt_tokens)
        if tokens is not None and tokens > self.limits.max_prompt_tokens:
            raise GatewayError(413, f"the prompt has {tokens} tokens; the limit is {self.limits.max_prompt_tokens}",
                               param="messages" if kind == "chat" else "prompt", code="prompt_too_long")
        self.streams.acquire(key)
        try:
            if parsed.stream:
                return await self._stream(request, parsed, kind)
            return await self._whole(parsed, kind)
        finally:
            self.streams.release(key)

    async def _whole(self, parsed: Parsed, kind: str) -> web.Response:
        n = len(parsed.requests)
        texts = [[] for _ in range(n)]  # type: list[list[str]]
        finals: list[pb.Final | None] = [None] * n
        async with contextlib.aclosing(merge([self.gateway.generate(r) for r in parsed.requests])) as events:
            async for i, event in events:
                which = event.WhichOneof("event")
                if which == "commit":
                    texts[i].append(event.commit.text)
                elif which == "final":
                    finals[i] = event.final
        choices = []
        for i in range(n):
            f = finals[i]
            reason = FINISH_REASONS.get(f.stop_reason, "stop") if f is not None else "stop"
            text = "".join(texts[i])
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        prompt_tokens = finals[0].stats.prompt_tokens if finals[0] is not None else 0
        completion = sum(f.stats.completion_tokens for f in finals if f is not None)
        trace = parsed.requests[0].trace
        body = {
            "id": _id(kind),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": parsed.model,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion),
            "dgemma": _dgemma_extra(finals, trace),
        }
        return web.json_response(body, headers=_trace_headers(trace))

    async def _stream(self, request: web.Request, parsed: Parsed, kind: str) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        n = len(parsed.requests)
        cid, created = _id(kind), int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        finals: list[pb.Final | None] = [None] * n
        ended = 0

        def chunk(i: int, delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "chat":
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": i, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": cid, "object": obj, "created": created, "model": parsed.model, "choices": [choice]}

        async def send(data: Mapping[str, Any], event: str | None = None) -> None:
            assert response is not None
            head = f"event: {event}\n" if event else ""
            await response.write(f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        events = merge([self.gateway.generate(r) for r in parsed.requests])
        try:
            async for i, event in events:
                if response is None:
                    # The first event: only now is anything sent, so earlier failures were retried or
                    # reported as plain HTTP errors.
                    response = web.StreamResponse(headers={
                        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no", **_trace_headers(parsed.requests[0].trace)})
                    await response.prepare(request)
                    if kind == "chat":
                        for j in range(n):
                            await send(chunk(j, None, None, role=True))
                which = event.WhichOneof("event")
                if which == "commit":
                    await send(chunk(i, event.commit.text, None))
                elif which == "draft" and parsed.drafts:
                    # A valid chunk with an empty delta (plain OpenAI clients see nothing) and the draft in
                    # the `dgemma` field, under its own SSE event name.
                    d = event.draft
                    data = chunk(i, None, None)
                    data["dgemma"] = {"draft": {"index": i, "canvas_index": d.canvas_index, "step": d.step,
                                                "text": d.text, "token_ids": list(d.token_ids)}}
                    await send(data, DRAFT_EVENT)
                elif which == "final":
                    finals[i] = event.final
                    ended += 1
                    last = chunk(i, None, FINISH_REASONS.get(event.final.stop_reason, "stop"))
                    if ended == n:
                        prompt_tokens = event.final.stats.prompt_tokens
                        completion = sum(f.stats.completion_tokens for f in finals if f is not None)
                        last["usage"] = _usage(prompt_tokens, completion)
                        last["dgemma"] = _dgemma_extra(finals, parsed.requests[0].trace)
                    await send(last)
        except GatewayError as err:
            if response is None:
                raise
            # Mid-stream failure: a clean error event that OpenAI clients raise as an APIError, then the end.
            await send(err.body())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await events.aclose()  # a client that went away cancels the upstream call now, not at GC
        assert response is not None
        if parsed.include_usage and finals[-1] is not None:
            usage_chunk = {"id": cid, "object": obj, "created": created, "model": parsed.model, "choices": [],
                           "usage": _usage(finals[0].stats.prompt_tokens if finals[0] else 0,
                                           sum(f.stats.completion_tokens for f in finals if f is not None))}
            await send(usage_chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "dgemma"}


def _trace_headers(trace: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    if trace.get("variant"):
        out["x-dgemma-variant"] = str(trace["variant"])
    if trace.get("endpoint"):
        out["x-dgemma-endpoint"] = str(trace["endpoint"])
    return out
