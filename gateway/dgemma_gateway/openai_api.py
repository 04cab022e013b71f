"""The OpenAI-compatible HTTP API (aiohttp): chat and text completions with SSE streaming, models,
health, metrics, the demand JSON and the OpenAPI document.

Handlers only translate: a body becomes `GatewayRequest`s (validated here, 400 naming the field),
`Gateway.generate` does the work, and its events become OpenAI JSON or server-sent events. Headers of
a stream are sent with its first event or, if that takes longer than `sse_keepalive_s`, with the first
keep-alive comment: failures known sooner (a strict 429, no endpoint) stay plain HTTP errors, and a request
that waits (held for a replica, queued, retried) is never silent long enough for a read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from dgemma_common.auth import ApiKeys
from dgemma_common.logsafe import clip
from dgemma_common.openai_models import (
    MAX_JSON_VALUES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ImageUrlPart,
    json_values,
    latency_target_ms,
    parse_json,
)
from dgemma_common.params import MAX_SEED, ParamError, prompt_byte_limit, utf8_size
from dgemma_gateway.auth import StreamLimiter, authenticate
from dgemma_gateway.content_encoding import body_too_large, check_encoding, decode_body
from dgemma_gateway.core import Gateway, GatewayRequest, estimate_text_tokens
from dgemma_gateway.errors import GatewayError, bad_request
from dgemma_gateway.images import ImageIntake, ImageRef, ImageSettings, image_tokens
from dgemma_gateway.observability import echo_request_id, request_context
from dgemma_gateway.openapi import openapi_document
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

LATENCY_HEADER = "x-dgemma-latency-target-ms"
DRAFT_EVENT = "dgemma.draft"
FINISH_REASONS = {pb.STOP_REASON_EOS: "stop", pb.STOP_REASON_STOP_STRING: "stop", pb.STOP_REASON_LENGTH: "length"}
MODELS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest, "text": CompletionRequest}


@dataclass(frozen=True)
class ApiLimits:
    """What one request may ask for."""

    max_body_bytes: int = 16 * 1024 * 1024  # images come in the body, base64: 4/3 of their size
    max_prompt_tokens: int = 32768
    max_prompt_bytes: int | None = None  # None: BYTES_PER_TOKEN x max_prompt_tokens, as the workers' default
    max_tokens: int = 8192
    default_max_tokens: int = 256
    max_n: int = 4
    max_streams_per_key: int = 64
    sse_keepalive_s: float = 2.0  # a stream silent this long gets its headers (if not yet sent) and a comment
    images: ImageSettings = field(default_factory=ImageSettings)

    @property
    def prompt_byte_limit(self) -> int:
        """The largest prompt text in UTF-8 bytes: a longer one is refused before it is tokenized or sent on."""
        return prompt_byte_limit(self.max_prompt_tokens, self.max_prompt_bytes)


# A body at least this large is parsed on a thread (see OpenAIApp._parse); a smaller one costs well under a
# millisecond to parse, less than the hand-off.
PARSE_ON_THREAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Parsed:
    """A validated OpenAI request."""

    requests: list[GatewayRequest]
    stream: bool
    include_usage: bool
    drafts: bool
    model: str
    images: list[ImageRef] = field(default_factory=list)  # image parts whose bytes are still to be loaded


def _latency_target(body: ChatCompletionRequest | CompletionRequest, header: str | None) -> float | None:
    if body.latency_target_ms is not None or header is None:
        return body.latency_target_ms
    try:
        return latency_target_ms(float(header), LATENCY_HEADER)
    except ValueError as exc:
        if isinstance(exc, ParamError):
            raise bad_request(LATENCY_HEADER, exc.reason) from None
        raise bad_request(LATENCY_HEADER, f"must be a number of milliseconds, got {clip(header, 64)!r}") from None


def _message_pb(m: ChatMessage) -> pb.ChatMessage:
    if not isinstance(m.content, list) or not m.has_images:
        return pb.ChatMessage(role=m.template_role, content=m.text())
    return pb.ChatMessage(role=m.template_role, parts=[
        pb.ContentPart(image=pb.Image()) if isinstance(p, ImageUrlPart) else pb.ContentPart(text=p.text)
        for p in m.content])


def chat_prompt(messages: Sequence[ChatMessage]) -> tuple[pb.Prompt, list[ImageRef]]:
    """OpenAI chat messages as a chat prompt (the worker applies the model's template), and its image parts,
    whose bytes `ImageIntake.load` puts in place."""
    prompt = pb.Prompt(chat=pb.ChatMessages(messages=[_message_pb(m) for m in messages]))
    # References into the finished prompt (protobuf copies messages as they are added to it).
    chat = prompt.chat.messages
    images = [ImageRef(f"messages[{i}].content[{j}]", part.image_url.url, chat[i].parts[j].image)
              for i, m in enumerate(messages) if isinstance(m.content, list) and m.has_images
              for j, part in enumerate(m.content) if isinstance(part, ImageUrlPart)]
    return prompt, images


def text_prompt(prompt: str | list[str] | list[int]) -> pb.Prompt:
    """A completions prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if all(isinstance(p, str) for p in prompt):
        return pb.Prompt(text=str(prompt[0]))
    return pb.Prompt(tokens=pb.TokenIds(ids=[int(t) for t in prompt]))


def check_content_type(header: str | None, content_type: str) -> None:
    """A body is JSON: a request that says it is something else is refused before the body is read (a request
    without the header is read as JSON, as many clients send none)."""
    if header is not None and content_type != "application/json":
        raise GatewayError(415, f"Content-Type must be application/json, got {clip(content_type, 64)!r}",
                           param="Content-Type", code="unsupported_media_type")


def check_body_size(content_length: int | None, limit: int) -> None:
    """A body declared larger than the limit is refused before a byte of it is read (aiohttp's own check reads
    the body up to the limit first)."""
    if content_length is not None and content_length > limit:
        raise body_too_large(limit)


def _prompt_texts(body: ChatCompletionRequest | CompletionRequest) -> Iterator[str]:
    """The text of a request's prompt, string by string (image parts left out; token ids have none)."""
    if isinstance(body, ChatCompletionRequest):
        yield from (m.text() for m in body.messages)
    elif isinstance(body.prompt, str):
        yield body.prompt
    elif isinstance(body.prompt[0], str):
        yield str(body.prompt[0])


def check_prompt_bytes(body: ChatCompletionRequest | CompletionRequest, field: str, limit: int) -> None:
    """Refuse a prompt whose text is over the byte limit: before it is copied into a request, counted in tokens
    by a worker or sent to one (the workers refuse it by the same rule, after it has crossed the network)."""
    if utf8_size(_prompt_texts(body), limit) > limit:
        raise GatewayError(413, f"the prompt has more than {limit} bytes of text; the limit is {limit} bytes "
                                "(--max-prompt-bytes)", param=field, code="prompt_too_long")


def parse_request(raw: bytes, kind: str, limits: ApiLimits, latency_header: str | None = None) -> Parsed:
    """Validate an OpenAI chat ('chat') or completions ('text') body into gateway requests (one per choice).

    The body is parsed and validated in one pass by the request model (`dgemma_common.openai_models`); the
    limits this gateway was configured with are checked after, the prompt's size first.
    """
    values = json_values(raw)
    if values > max(MAX_JSON_VALUES, 2 * limits.max_prompt_tokens):  # refused before parsing, not after
        raise GatewayError(413, f"the body holds up to {values} JSON values; the limit is {MAX_JSON_VALUES}",
                           code="body_too_large")
    try:
        body = parse_json(MODELS[kind], raw)
    except ParamError as exc:
        if exc.field == "body":
            raise GatewayError(400, f"the body is not a valid JSON object: {exc.reason}", code="invalid_json") from None
        raise bad_request(exc.field, exc.reason) from None
    prompt_field = "messages" if kind == "chat" else "prompt"
    check_prompt_bytes(body, prompt_field, limits.prompt_byte_limit)
    token_field = body.token_field
    max_tokens = body.requested_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif max_tokens > limits.max_tokens:
        raise bad_request(token_field, f"must be in [1, {limits.max_tokens}], got {max_tokens}")
    n = body.n or 1
    if n > limits.max_n:
        raise bad_request("n", f"must be in [1, {limits.max_n}], got {n}")
    settings = body.generation_settings(max_tokens).given()
    target = _latency_target(body, latency_header)
    prompt, images = chat_prompt(body.messages) if isinstance(body, ChatCompletionRequest) \
        else (text_prompt(body.prompt), [])
    names = {"max_new_tokens": token_field, "prompt": prompt_field}
    requests = []
    for i in range(n):
        s = dict(settings)
        if n > 1 and "seed" in s:
            s["seed"] = (s["seed"] + i) % (MAX_SEED + 1)  # distinct but reproducible choices
        requests.append(GatewayRequest(
            model=body.model, prompt=prompt, settings=s, latency_target_ms=target, strict=body.latency_strict,
            timeout_s=body.timeout_s, param_names=names,
        ))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Parsed(requests, bool(body.stream), include_usage, bool(body.stream_drafts), body.model, images)


async def heartbeat(source: AsyncIterator[T], interval_s: float) -> AsyncGenerator[T | None, None]:
    """The items of `source`, and None each time `interval_s` passes without one (a keep-alive tick)."""
    items = aiter(source)
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})


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

    def __init__(self, gateway: Gateway, keys: ApiKeys, limits: ApiLimits | None = None,
                 images: ImageIntake | None = None) -> None:
        self.gateway = gateway
        self.keys = keys
        self.limits = limits or ApiLimits()
        self.images = images or ImageIntake(self.limits.images)
        self.streams = StreamLimiter(self.limits.max_streams_per_key)
        self.app = web.Application(client_max_size=self.limits.max_body_bytes,
                                   middlewares=[request_context, self._errors])
        self.app.on_response_prepare.append(echo_request_id)
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
            return web.json_response(body_too_large(self.limits.max_body_bytes).body(), status=413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": {"message": exc.reason, "type": "invalid_request_error", "param": None,
                              "code": str(exc.status)}}
            return web.json_response(body, status=exc.status)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", clip(request.method, 16), clip(request.path, 256))
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
        return web.json_response(self.gateway.demand_snapshot().model_dump(mode="json"))

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
        check_content_type(request.headers.get("Content-Type"), request.content_type)
        check_body_size(request.content_length, self.limits.max_body_bytes)
        encoding = check_encoding(request.headers.get("Content-Encoding"))
        raw = await request.read()  # as sent (the server does not decompress): at most --max-body-bytes
        if encoding:
            raw = await asyncio.to_thread(decode_body, raw, encoding, self.limits.max_body_bytes)
        parsed = await self._parse(raw, kind, request.headers.get(LATENCY_HEADER))
        if not self.keys.allows_overflow(key):
            parsed = dataclasses.replace(
                parsed, requests=[dataclasses.replace(r, allow_overflow=False) for r in parsed.requests])
        if parsed.model not in self.gateway.models():
            raise GatewayError(404, f"model {parsed.model!r} does not exist; served: {self.gateway.models()}",
                               param="model", code="model_not_found")
        self.streams.acquire(key)
        try:
            parsed = await self._count_prompt(parsed, "messages" if kind == "chat" else "prompt")
            if parsed.stream:
                return await self._stream(request, parsed, kind)
            return await self._whole(parsed, kind)
        finally:
            self.streams.release(key)

    async def _parse(self, raw: bytes, kind: str, latency_header: str | None) -> Parsed:
        """`parse_request`, on a thread for a large body. Parsing and validating hold the GIL in stretches of
        ~1 ms a MiB (a 10 MB body took 40-50 ms in all, a stall of every stream this gateway serves when it ran
        on the event loop); from a thread, the loop runs between the stretches."""
        if len(raw) < PARSE_ON_THREAD_BYTES:
            return parse_request(raw, kind, self.limits, latency_header)
        return await asyncio.to_thread(parse_request, raw, kind, self.limits, latency_header)

    async def _count_prompt(self, parsed: Parsed, field: str) -> Parsed:
        """Load the request's images, refuse a prompt over the limit, and give routing its length."""
        extra = 0
        if parsed.images:
            fields = [r.field for r in parsed.images]
            known, spec = self.gateway.model_vision(parsed.model)
            if known and spec is None:
                raise bad_request(fields[0], f"the model {parsed.model!r} takes no images")
            infos = await self.images.load(parsed.images, "messages")
            extra = 0 if spec is None else image_tokens(infos, fields, spec)
        limit = self.limits.max_prompt_tokens
        prompt = parsed.requests[0].prompt
        tokens = await self.gateway.count_prompt_tokens(parsed.model, prompt, limit, extra)
        if tokens is not None and tokens > limit:
            raise GatewayError(413, f"the prompt has {tokens} tokens; the limit is {limit}", param=field,
                               code="prompt_too_long")
        length = tokens if tokens is not None else estimate_text_tokens(prompt) + extra
        return dataclasses.replace(parsed, requests=[dataclasses.replace(r, prompt_tokens=length)
                                                     for r in parsed.requests])

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
        role_sent = False

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

        async def start() -> web.StreamResponse:
            started = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no", **_trace_headers(parsed.requests[0].trace)})
            await started.prepare(request)
            return started

        events = merge([self.gateway.generate(r) for r in parsed.requests])
        try:
            async for item in heartbeat(events, self.limits.sse_keepalive_s):
                if item is None:
                    # Nothing for a while (held for a replica, queued at a worker, retried after a failure):
                    # headers now if not yet sent, then an SSE comment, which OpenAI clients skip but which
                    # keeps read timeouts and proxies from giving up on a request that is still coming.
                    response = response or await start()
                    await response.write(b": keep-alive\n\n")
                    continue
                i, event = item
                if response is None:
                    # The first event, before any keep-alive: failures until now were retried or reported as
                    # plain HTTP errors.
                    response = await start()
                if not role_sent:
                    role_sent = True
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
