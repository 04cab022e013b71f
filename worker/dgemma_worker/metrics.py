"""Prometheus metrics of one worker (`dgemma_worker_*`), served on the metrics port.

Counters and histograms are fed by the engine's observer hooks (cheap, called on the engine thread)
and by the servicer for requests refused before they reach the engine. Gauges (queue depth, active
requests, moving averages) are read from the engine's load snapshot at scrape time, so they are never
stale and cost nothing between scrapes.

Every series carries the `variant` label the gateway uses for the same variant (`namespace/name` in a
cluster; the operator sets it), so one dashboard filter selects gateway and worker series alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dgemma_common.auth import INVALID, MISSING
from dgemma_common.looplag import LAG_BUCKETS
from dgemma_common.metrics import ConstantLabels, Kind, add_standard_collectors
from dgemma_common.types import LoadSnapshot, RequestStats, StopReason

PREFIX = "dgemma_worker"
# Decoder steps range from ~1 ms (tiny models) to ~1 s (large models on small GPUs).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The `api` label of refused calls, by gRPC service.
AUTH_APIS = {"dgemma.v1.Denoiser": "denoiser", "inference.GRPCInferenceService": "kserve"}
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class WorkerMetrics:
    """The worker's metrics on their own registry; also the engine's observer."""

    def __init__(self, load: Callable[[], LoadSnapshot | None], variant: str = "") -> None:
        r = add_standard_collectors(CollectorRegistry())
        if variant:
            self.registry = CollectorRegistry()
            self.registry.register(ConstantLabels(r, {"variant": variant}))
        else:
            self.registry = r
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests by outcome (stop reason, or why refused).", ["outcome"], registry=r
        )
        # Every way a request can end exists from the start at 0: a series born at 1 mid-window makes rate()
        # and increase() guess at what came before it.
        for reason in StopReason:
            self.requests.labels(reason.value)
        self.tokens = Counter(f"{PREFIX}_tokens_generated", "Committed completion tokens.", registry=r)
        self.decoder_passes = Counter(f"{PREFIX}_decoder_passes", "Decoder forward passes (steps).", registry=r)
        self.encoder_passes = Counter(f"{PREFIX}_encoder_passes", "Encoder forward passes.", registry=r)
        self.step_latency = Histogram(
            f"{PREFIX}_step_latency_seconds", "Duration of one engine step.", ["kind"],
            buckets=STEP_BUCKETS, registry=r,
        )
        self.ttfc = Histogram(
            f"{PREFIX}_time_to_first_commit_seconds", "From arrival to the first committed canvas.",
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time a request waited for an active slot.",
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "From arrival to the final event.",
            buckets=REQUEST_BUCKETS, registry=r,
        )
        # Calls refused for their API key, by service: refused Denoiser calls mean a gateway without the right
        # key (or someone else on the network); KServe is what a client reaching the worker directly would use.
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Calls refused for a missing or wrong API key.", ["api", "reason"], registry=r,
        )
        for api in AUTH_APIS.values():
            for why in (MISSING, INVALID):
                self.auth_failures.labels(api, why)
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds", "How late the gRPC event loop woke from a short sleep (blocked time).",
            buckets=LAG_BUCKETS, registry=r,
        )
        r.register(_LoadCollector(load))
        self._server: Any = None
        self.port: int | None = None
        self.recording = False  # engine hooks count only once the worker serves (not the warm-up)

    # EngineObserver
    def on_step(self, kind: str, seconds: float) -> None:
        """Record one engine step."""
        if not self.recording:
            return
        self.step_latency.labels(kind).observe(seconds)
        if kind == "decoder":
            self.decoder_passes.inc()
        elif kind == "encoder":
            self.encoder_passes.inc()

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None:
        """Record a request the engine finished, whatever the reason."""
        if not self.recording:
            return
        self.requests.labels(reason.value).inc()
        self.tokens.inc(stats.completion_tokens)
        self.queue_wait.observe(stats.queue_wait_s)
        self.duration.observe(stats.total_s)
        if stats.time_to_first_commit_s is not None:
            self.ttfc.observe(stats.time_to_first_commit_s)

    def on_refused(self, outcome: str) -> None:
        """Record a request refused before the engine took it (invalid, overloaded, unavailable)."""
        self.requests.labels(outcome).inc()

    def on_unauthenticated(self, service: str, reason: str) -> None:
        """Record a call refused for its API key (reason: missing or invalid)."""
        self.auth_failures.labels(AUTH_APIS.get(service, "other"), reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint on a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# How each metric adds up across workers (dgemma_common.metrics.Kind); tests/deploy check every query.
KINDS: dict[str, Kind] = {
    **{f"{PREFIX}_{name}": Kind.COUNTER for name in (
        "requests", "tokens_generated", "decoder_passes", "encoder_passes", "step_latency_seconds",
        "time_to_first_commit_seconds", "queue_wait_seconds", "request_duration_seconds",
        "event_loop_lag_seconds", "auth_failures", "busy_seconds")},
    **{f"{PREFIX}_{name}": Kind.SHARE for name in (
        "ready", "draining", "queue_depth", "active_requests", "capacity", "max_queue", "tokens_per_second")},
    **{f"{PREFIX}_{name}": Kind.LEVEL for name in (
        "step_latency_avg_seconds", "encoder_latency_avg_seconds", "busy_step_seconds", "canvas_length",
        "model_info")},
}


class _LoadCollector(Collector):
    """Gauges from the engine's load snapshot, read at scrape time."""

    def __init__(self, load: Callable[[], LoadSnapshot | None]) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        snap = self._load()
        gauges: list[tuple[str, str, float]] = [
            ("ready", "1 when loaded, warm and admitting.", float(bool(snap and snap.ready and not snap.draining))),
            ("draining", "1 while draining before shutdown.", float(bool(snap and snap.draining))),
        ]
        if snap is not None:
            gauges += [
                ("queue_depth", "Requests waiting for an active slot.", snap.queue_depth),
                ("active_requests", "Requests being denoised.", snap.active),
                ("capacity", "Maximum active requests.", snap.capacity),
                ("max_queue", "Maximum waiting requests.", snap.max_queue),
                ("step_latency_avg_seconds", "Moving average of a decoder step.", snap.step_latency_s),
                ("encoder_latency_avg_seconds", "Moving average of an encoder pass.", snap.encoder_latency_s),
                ("busy_step_seconds", "Engine wall time per decoder step while it has work, over its last 512 "
                 "turns: the step plus commits, scheduling and streaming between steps (encoder passes "
                 "excluded). What capacity is charged.", snap.busy_step_s),
                ("tokens_per_second", "Moving average of committed tokens per second.", snap.tokens_per_s),
                ("canvas_length", "Tokens per canvas.", snap.canvas_length),
            ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        if snap is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_busy_seconds", "Wall time the engine's step thread had work (rate: its busy share).",
                value=snap.busy_s_total)
            info = GaugeMetricFamily(f"{PREFIX}_model_info", "The served model.", labels=["model", "revision"])
            info.add_metric([snap.model_name, snap.model_revision], 1.0)
            yield info
