"""The gRPC servers' front door: API keys for the services that serve inference, and undecodable messages.

`RequestGuard` is a `grpc.aio` server interceptor used by the gateway and the worker:

- On services named in `protected`, a call without a valid key (`authorization: Bearer KEY` or
  `x-api-key` metadata) ends with UNAUTHENTICATED before any handler runs. Health and reflection stay
  open, so probes work without a key.
- grpcio turns a message that does not parse into UNKNOWN ("Unexpected DecodeError"), and UNKNOWN reads as
  a server bug. The guard decodes requests itself and answers INVALID_ARGUMENT naming the message type;
  for a stream of requests, the call ends with that status when the bad message arrives.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dgemma_common.auth import ApiKeys, AuthError, metadata_getter

Deserializer = Callable[[bytes], Any]


class Undecodable:
    """What the guard's deserializer returns for bytes that are not the method's request message."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Malformed(Exception):
    """Raised inside a request stream when a message does not parse; ends the call as INVALID_ARGUMENT."""


def _tolerant(deserializer: Deserializer | None, method: str) -> Deserializer:
    # protoc's stubs pass `Message.FromString`: name the message type it parses.
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    expected = message_type.full_name if message_type is not None else f"{method} request"

    def deserialize(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except (DecodeError, ValueError, TypeError, RuntimeError):
            return Undecodable(f"request: {len(raw)} bytes that are not a {expected} message")

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, Undecodable):
            raise _Malformed(item.message)
        yield item


async def _finish(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _guard_decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, with requests decoded by the guard (see the module docstring)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    deserializer = _tolerant(handler.request_deserializer, method)
    serializer = handler.response_serializer

    if handler.unary_unary is not None:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(invalid, request.message)
            return await _finish(uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream is not None:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort(invalid, request.message)
            async for response in _responses(us(request, context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.stream_unary is not None:
        su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await _finish(su(_checked(requests), context))
            except _Malformed as exc:
                await context.abort(invalid, str(exc))

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in _responses(ss(_checked(requests), context)):
                yield response
        except _Malformed as exc:
            await context.abort(invalid, str(exc))

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it is an async generator, a generator or a coroutine."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            yield item


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends every call with `code` and reads nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    # Requests are never decoded: a refused caller costs no parsing.
    raw = _tolerant(None, "")
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, raw, handler.response_serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, raw, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, raw, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, raw, handler.response_serializer)


class RequestGuard(grpc.aio.ServerInterceptor):
    """API keys on the `protected` services; INVALID_ARGUMENT for messages that do not parse, on every service.

    `on_refused(service, reason)` is called for every call refused for its key (the service's full name;
    reason: "missing" or "invalid").
    """

    def __init__(self, keys: ApiKeys | None = None, protected: Iterable[str] = (),
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.keys = keys
        self.protected = tuple(f"/{service}/" for service in protected)
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Refuse unauthenticated calls to protected services; decode requests strictly."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpcio answers UNIMPLEMENTED
        method: str = handler_call_details.method
        if self.keys is not None and self.keys.enabled and method.startswith(self.protected):
            try:
                self.keys.check(metadata_getter(handler_call_details.invocation_metadata))
            except AuthError as err:
                if self.on_refused is not None:
                    self.on_refused(method.split("/")[1], err.reason)
                return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, err.message)
        return _guard_decoding(handler, method.rsplit("/", 1)[-1])
