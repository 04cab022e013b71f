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
    502: grpc.StatusCode.UNAVAILABLE,  # gRPC's own HTTP mapping: an upstream's fault is not INTERNAL (our bug)
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


# Upstream codes worth trying on another endpoint, if nothing has reached the client yet (a worker that refuses
# the gateway's key may be the only one with an old or new key during a rotation).
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
     grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAUTHENTICATED}
)
# Upstream codes that say the endpoint itself is failing (outlier ejection), not just busy or the request bad.
FAILING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                     grpc.StatusCode.UNAUTHENTICATED})


def worker_refused_key(details: str) -> GatewayError:
    """A worker refused the gateway's own API key: the gateway is misconfigured, not the client's request."""
    return GatewayError(502, f"the model's workers refuse the gateway's API key ({details}); the gateway needs "
                        "the workers' key (--worker-api-key-file, or the resource's spec.worker.apiKeySecret)",
                        code="upstream_misconfigured")


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
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return worker_refused_key(details)
    return GatewayError(502, f"upstream error ({code.name})", code="upstream_error")


@dataclass
class UpstreamFailure(Exception):
    """A failed upstream call: the error the client would see, and what the gateway should do about it."""

    error: GatewayError
    retryable: bool  # another endpoint may take the request (if nothing has reached the client yet)
    failing: bool  # the endpoint itself is failing: eject it for a while
    reason: str  # a short label for metrics: the gRPC code, the HTTP status, "connection"
    cooldown_s: float | None = None  # the upstream asked for this long a pause (429 with Retry-After)

    def __post_init__(self) -> None:
        super().__init__(self.error.message)


def grpc_failure(code: grpc.StatusCode, details: str, param_names: dict[str, str] | None = None) -> UpstreamFailure:
    """A worker's gRPC status as an upstream failure."""
    error = from_upstream(code, details, param_names)
    return UpstreamFailure(error, retryable=retryable(code, error), failing=code in FAILING, reason=code.name.lower())


def http_failure(status: int, message: str, param: str | None = None, retry_after_s: float | None = None
                 ) -> UpstreamFailure:
    """An OpenAI-compatible upstream's HTTP error as an upstream failure (`param` already in the client's names).

    The client's own mistakes (400, 413, 422) are passed on as such; the upstream refusing the gateway's key or
    model is the gateway's misconfiguration (502, and the endpoint is ejected); 429 is passed on with its
    Retry-After and pauses the endpoint without counting as a failure; 5xx is the upstream failing.
    """
    shown = f"upstream: {message}" if message else f"upstream answered HTTP {status}"
    reason = str(status)
    if status in (400, 413, 422):
        out = 413 if status == 413 else 400
        return UpstreamFailure(GatewayError(out, shown, param=param, code="invalid_value"), retryable=False,
                               failing=False, reason=reason)
    if status == 429:
        wait = 1.0 if retry_after_s is None else retry_after_s
        error = GatewayError(429, f"the upstream is rate limiting: {message or 'HTTP 429'}",
                             code="upstream_rate_limited", retry_after_s=wait)
        return UpstreamFailure(error, retryable=True, failing=False, reason=reason, cooldown_s=wait)
    if status in (401, 403, 404):
        what = "refused the gateway's credentials" if status != 404 else "does not serve the configured model"
        return UpstreamFailure(GatewayError(502, f"the upstream {what} (HTTP {status})", code="upstream_misconfigured"),
                               retryable=True, failing=True, reason=reason)
    if status in (408, 504):
        return UpstreamFailure(GatewayError(504, "the upstream timed out", code="upstream_timeout"),
                               retryable=True, failing=True, reason=reason)
    return UpstreamFailure(GatewayError(503, f"upstream unavailable: {shown}", code="upstream_unavailable",
                                        retry_after_s=1.0), retryable=True, failing=status >= 500, reason=reason)
