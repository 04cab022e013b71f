"""Prometheus metrics of the operator (`dgemma_operator_*`), on a private registry served on the metrics port.

Handlers are timed and their failures counted by `observe_handler` (a decorator around each kopf handler);
reconciles are counted by outcome; every autoscaler tick records its decision, and the last decision per
variant (desired, ready, min and max replicas) stays readable as gauges, so an alert can tell "the queue
grows while the variant is already at its maximum" or "replicas were asked for that never became ready".
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dgemma_common.metrics import Kind, add_standard_collectors

PREFIX = "dgemma_operator"
# kopf handlers take from a millisecond (a status patch) to seconds (several API calls under throttling).
HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DEFAULT_PORT = 9090

# One active operator at a time (kopf peering or a single replica): its gauges are the fleet's.
KINDS: dict[str, Kind] = {
    **{f"{PREFIX}_{name}": Kind.COUNTER for name in (
        "handler_duration_seconds", "handler_errors", "reconciles", "autoscaler_decisions")},
    **{f"{PREFIX}_{name}": Kind.FLEET for name in (
        "desired_replicas", "ready_replicas", "min_replicas", "max_replicas",
        "last_decision_timestamp_seconds", "last_decision")},
}

# The autoscaler's reasons are sentences; the metrics label is their kind, a small fixed set.
DECISION_KINDS = (
    ("scale up", "scale_up"),
    ("scale down", "scale_down"),
    ("scale from zero", "scale_from_zero"),
    ("scale to zero", "scale_to_zero"),
    ("steady", "steady"),
    ("kept", "no_measurements"),
)


def decision_kind(reason: str) -> str:
    """The label for an autoscaler reason (`other` for a reason this list does not know yet)."""
    return next((kind for prefix, kind in DECISION_KINDS if reason.startswith(prefix)), "other")


def error_kind(error: BaseException) -> str:
    """How kopf treats a handler's failure: retried later, given up, or unexpected (retried with backoff)."""
    if isinstance(error, kopf.TemporaryError):
        return "temporary"
    if isinstance(error, kopf.PermanentError):
        return "permanent"
    return "unexpected"


class OperatorMetrics:
    """The operator's metrics on their own registry."""

    def __init__(self) -> None:
        self.registry = add_standard_collectors(CollectorRegistry())
        r = self.registry
        self.handler_duration = Histogram(
            f"{PREFIX}_handler_duration_seconds", "Time a kopf handler ran, by handler.", ["handler"],
            buckets=HANDLER_BUCKETS, registry=r)
        self.handler_errors = Counter(
            f"{PREFIX}_handler_errors", "Handler failures by handler and kind (temporary, permanent, unexpected).",
            ["handler", "error"], registry=r)
        self.reconciles = Counter(
            f"{PREFIX}_reconciles", "Reconciles of a DiffusionGemma by outcome (applied, invalid, retry, error).",
            ["variant", "outcome"], registry=r)
        self.decisions = Counter(
            f"{PREFIX}_autoscaler_decisions", "Autoscaler decisions by variant and kind of reason.",
            ["variant", "reason"], registry=r)
        self.desired = Gauge(f"{PREFIX}_desired_replicas", "Replicas the last decision asked for.", ["variant"],
                             registry=r)
        self.ready = Gauge(f"{PREFIX}_ready_replicas", "Ready worker replicas at the last decision.", ["variant"],
                           registry=r)
        self.min = Gauge(f"{PREFIX}_min_replicas", "The variant's minimum replicas.", ["variant"], registry=r)
        self.max = Gauge(f"{PREFIX}_max_replicas", "The variant's maximum replicas.", ["variant"], registry=r)
        self.decided_at = Gauge(f"{PREFIX}_last_decision_timestamp_seconds", "When the last decision was made.",
                                ["variant"], registry=r)
        self.last = Gauge(f"{PREFIX}_last_decision", "1 for the kind of the variant's last decision.",
                          ["variant", "reason"], registry=r)
        self._last_kind: dict[str, str] = {}
        self._server: Any = None

    def decided(self, variant: str, reason: str, desired: int, ready: int, bounds: tuple[int, int],
                when: float) -> None:
        """Record one autoscaler decision for a variant."""
        kind = decision_kind(reason)
        self.decisions.labels(variant, kind).inc()
        previous = self._last_kind.get(variant)
        if previous is not None and previous != kind:
            self.last.remove(variant, previous)
        self._last_kind[variant] = kind
        self.last.labels(variant, kind).set(1)
        self.desired.labels(variant).set(desired)
        self.ready.labels(variant).set(ready)
        self.min.labels(variant).set(bounds[0])
        self.max.labels(variant).set(bounds[1])
        self.decided_at.labels(variant).set(when)

    def forget(self, variant: str) -> None:
        """Drop a deleted variant's gauges (its counters stay: they are history)."""
        for gauge in (self.desired, self.ready, self.min, self.max, self.decided_at):
            if (variant,) in gauge._metrics:
                gauge.remove(variant)
        kind = self._last_kind.pop(variant, None)
        if kind is not None:
            self.last.remove(variant, kind)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint on a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


F = TypeVar("F", bound=Callable[..., Any])


def observe_handler(fn: F) -> F:
    """Time a kopf handler (sync or async) and count its failures; the error still reaches kopf.

    The metrics are the operator's, in kopf's memo (`memo.metrics`, set at startup); a handler run
    without them (a test calling it directly) is just run. Cancellation is not a failure.
    """
    label = fn.__name__

    @contextlib.contextmanager
    def observed(kwargs: dict[str, Any]) -> Iterator[None]:
        metrics: OperatorMetrics | None = getattr(kwargs.get("memo"), "metrics", None)
        started = time.monotonic()
        try:
            yield
        except Exception as e:
            if metrics is not None:
                metrics.handler_errors.labels(label, error_kind(e)).inc()
            raise
        finally:
            if metrics is not None:
                metrics.handler_duration.labels(label).observe(time.monotonic() - started)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with observed(kwargs):
                return await fn(*args, **kwargs)

        return cast(F, run_async)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with observed(kwargs):
            return fn(*args, **kwargs)

    return cast(F, run)
