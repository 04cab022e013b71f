"""The gateway's one error type and the one place upstream gRPC statuses become gateway errors.

Both front ends report a `GatewayError`: the HTTP API as an OpenAI error body with `status`, the
KServe gRPC front as the matching gRPC code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from dgemma_common.logsafe import clip

# OpenAI error `type` per HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class GatewayError(Exception):
    """An error a client sees: HTTP status, message, the offending field, and when to retry."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        """The OpenAI error type."""
        return ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, object]:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Retry-After for 429 and 503."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        """The gRPC status code for the KServe front."""
        return GRPC_CODES.get(self.status, grpc.StatusCode.INTERNAL)


def bad_request(param: str, message: str) -> GatewayError:
    """400 naming the field."""
    return GatewayError(400, f"{param}: {message}", param=param, code="invalid_value")


# Upstream codes worth trying on another endpoint, if nothing has reached the client yet.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.INTERNAL}
)
# Upstream codes that say the endpoint itself is failing (outlier ejection), not just busy or the request bad.
FAILING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


def retryable(code: grpc.StatusCode, error: GatewayError) -> bool:
    """Worth trying on another endpoint: the endpoint failed or was full, not the request itself too large."""
    return code in RETRYABLE and error.status != 413


def from_upstream(code: grpc.StatusCode, details: str, param_names: dict[str, str] | None = None) -> GatewayError:
    """A worker's gRPC status as the error the client sees (worker messages start with the field name)."""
    details = clip(details or code.name, 1024)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field, _, _ = details.partition(":")
        field = field.strip()
        if field.startswith("prompt") and "exceeds the limit" in details:
            return GatewayError(413, details, param="messages", code="prompt_too_long")
        shown = (param_names or {}).get(field, field)
        message = details if shown == field else f"{shown}:{details.partition(':')[2]}"
        return GatewayError(400, message, param=shown or None, code="invalid_value")
    if code is grpc.StatusCode.NOT_FOUND:
        return GatewayError(404, details, param="model", code="model_not_found")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in details:  # gRPC's own refusal of a message over the worker's --max-message-bytes
            return GatewayError(413, f"the request is larger than the worker accepts: {details}",
                                code="request_too_large")
        return GatewayError(429, f"no capacity: {details}", code="overloaded", retry_after_s=1.0)
    if code is grpc.StatusCode.UNAVAILABLE:
        return GatewayError(503, f"upstream unavailable: {details}", code="upstream_unavailable", retry_after_s=1.0)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(504, "the request's deadline passed upstream", code="upstream_timeout")
    return GatewayError(502, f"upstream error ({code.name})", code="upstream_error")
