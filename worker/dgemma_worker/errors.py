"""The one place where engine outcomes become gRPC status codes.

Every RPC of the worker (dgemma.v1 and KServe v2) reports failures through `status_for_exception`
and `status_for_final`, so a client sees the same code and message whichever front end it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from dgemma_common.logsafe import clip
from dgemma_common.params import ParamError
from dgemma_common.types import (
    FinalEvent,
    NotReadyError,
    OverloadedError,
    PromptTooLongError,
    StopReason,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RpcError:
    """A status code, a message safe to show the client, and the metrics outcome label."""

    code: grpc.StatusCode
    message: str
    outcome: str


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could start."""


def status_for_exception(exc: BaseException, request_id: str = "") -> RpcError:
    """Map an exception raised while admitting or running a request to what the client sees."""
    if isinstance(exc, ParamError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid")
    if isinstance(exc, PromptTooLongError):
        return RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid")
    if isinstance(exc, OverloadedError):
        return RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker is at capacity: {exc}".rstrip(": "), "overloaded"
        )
    if isinstance(exc, NotReadyError):
        return RpcError(
            grpc.StatusCode.UNAVAILABLE, f"worker is not ready: {exc}".rstrip(": "), "unavailable"
        )
    if isinstance(exc, UnknownModelError):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(exc), "invalid")
    if isinstance(exc, DeadlineExceeded):
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded", "deadline")
    if isinstance(exc, MemoryError) or _is_cuda_oom(exc):
        log.error("out of memory in request %s", clip(request_id), exc_info=exc)
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker ran out of memory; retry later", "oom")
    # Anything else is a bug or an environment failure: the details go to the log, not the client.
    log.error("internal error in request %s", clip(request_id), exc_info=exc)
    return RpcError(grpc.StatusCode.INTERNAL, _internal_message(request_id), "error")


def status_for_final(final: FinalEvent, request_id: str = "") -> RpcError | None:
    """The error a final event stands for, or None when the request ended normally."""
    if final.stop_reason is StopReason.DEADLINE:
        return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while generating", "deadline")
    if final.stop_reason is StopReason.CANCELLED:
        return RpcError(grpc.StatusCode.CANCELLED, "request cancelled", "cancelled")
    if final.stop_reason is StopReason.ERROR:
        if getattr(final, "error_kind", None) == "oom":
            log.error("out of memory in request %s: %s", clip(request_id), final.error)
            return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "worker ran out of memory; retry later", "oom")
        log.error("internal error in request %s: %s", clip(request_id), final.error)
        return RpcError(grpc.StatusCode.INTERNAL, _internal_message(request_id), "error")
    return None


def _internal_message(request_id: str) -> str:
    suffix = f" (request {clip(request_id, 64)})" if request_id else ""
    return f"internal error{suffix}; details are in the worker log"


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(exc, torch.OutOfMemoryError)


class UnknownModelError(Exception):
    """A KServe request named a model (or version) this worker does not serve."""

    def __init__(self, name: str, version: str, served: str) -> None:
        shown = f"{name!r} version {version!r}" if version else repr(name)
        super().__init__(f"unknown model {shown}; this worker serves {served!r} (version 1)")
