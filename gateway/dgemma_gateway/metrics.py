"""Prometheus metrics of one gateway, on its own registry (no global state).

Request counters and latency histograms are updated as requests go; endpoint and demand gauges are
computed at scrape time from the gateway's state by a collector, so they can never go stale.

With several gateway replicas, each counts the requests it routed (sum them), but each sees the whole
fleet of workers: the endpoint and worker-queue gauges read alike on every replica (take the max).
`KINDS` says which is which; tests/deploy check every dashboard and rule query against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dgemma_common.demand import DemandSnapshot
from dgemma_common.looplag import LAG_BUCKETS
from dgemma_common.metrics import Kind, add_standard_collectors

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


PREFIX = "dgemma_gateway"
KINDS: dict[str, Kind] = {
    **{f"{PREFIX}_{name}": Kind.COUNTER for name in (
        "requests", "request_duration_seconds", "time_to_first_event_seconds", "latency_target", "retries",
        "ejections", "completion_tokens", "auth_failures", "upstream_throttled", "event_loop_lag_seconds")},
    # What this replica routed or holds.
    **{f"{PREFIX}_{name}": Kind.SHARE for name in (
        "demand_tokens_per_second", "demand_canvases_per_second", "demand_requests_per_second",
        "requests_held")},
    # From the workers' own reports, which every replica sees alike.
    **{f"{PREFIX}_{name}": Kind.FLEET for name in (
        "endpoints_ready", "endpoints", "requests_waiting", "delivered_tokens_per_second_per_replica",
        "capacity_tokens_per_second_per_replica")},
    f"{PREFIX}_latency_target_miss_ratio": Kind.LEVEL,
    # What this replica learned from the requests it routed (a share of the step cap): never summed.
    f"{PREFIX}_step_share": Kind.LEVEL,
}


class _StateCollector(Collector):
    def __init__(self, demand: Callable[[], DemandSnapshot]) -> None:
        self._demand = demand

    def collect(self) -> Iterator[Metric]:
        snap = self._demand()
        ready = GaugeMetricFamily("dgemma_gateway_endpoints_ready", "Ready endpoints per variant", labels=["variant"])
        total = GaugeMetricFamily("dgemma_gateway_endpoints", "Known endpoints per variant", labels=["variant"])
        gauges = {
            "tokens_per_s": GaugeMetricFamily(
                "dgemma_gateway_demand_tokens_per_second", "Tokens/s asked (attributed)", labels=["variant"]),
            "canvases_per_s": GaugeMetricFamily(
                "dgemma_gateway_demand_canvases_per_second",
                "Canvases/s asked (attributed; as many as the replies are expected to run)", labels=["variant"]),
            "requests_per_s": GaugeMetricFamily(
                "dgemma_gateway_demand_requests_per_second", "Requests/s asked (attributed)", labels=["variant"]),
            "requests_waiting": GaugeMetricFamily(
                "dgemma_gateway_requests_waiting", "Requests queued at the variant's workers", labels=["variant"]),
            "target_miss_ratio": GaugeMetricFamily(
                "dgemma_gateway_latency_target_miss_ratio", "Share of targets missed in the window",
                labels=["variant"]),
        }
        delivered = GaugeMetricFamily(
            "dgemma_gateway_delivered_tokens_per_second_per_replica", "Tokens/s one ready replica delivers",
            labels=["variant"])
        capacity = GaugeMetricFamily(
            "dgemma_gateway_capacity_tokens_per_second_per_replica",
            "Tokens/s one ready replica can finish, from its measured step latency (absent until measured)",
            labels=["variant"])
        held = GaugeMetricFamily(
            "dgemma_gateway_requests_held", "Requests held for a first replica (scale from zero)", labels=["variant"])
        shares = GaugeMetricFamily(
            "dgemma_gateway_step_share",
            "Share of the step cap a canvas takes (adaptive stopping), learned from finished requests, per cap",
            labels=["variant", "cap"])
        for name, v in snap.variants.items():
            ready.add_metric([name], v.replicas_ready)
            measured = v.capacity.tokens_per_s_per_replica
            if measured is not None:
                capacity.add_metric([name], measured)
            held.add_metric([name], v.demand.requests_held)
            for cap, share in v.step_shares.items():
                shares.add_metric([name, cap], share)
            total.add_metric([name], v.replicas)
            for key, g in gauges.items():
                g.add_metric([name], getattr(v.demand, key))
            delivered.add_metric([name], v.delivered.tokens_per_s_per_replica)
        yield ready
        yield total
        yield from gauges.values()
        yield delivered
        yield capacity
        yield held
        yield shares


class GatewayMetrics:
    """The gateway's metrics on a private registry."""

    def __init__(self, demand: Callable[[], DemandSnapshot]) -> None:
        self.registry = add_standard_collectors(CollectorRegistry(auto_describe=True))
        r = self.registry
        self.requests = Counter(
            "dgemma_gateway_requests", "Requests by API, variant and outcome", ["api", "variant", "outcome"],
            registry=r)
        self.latency = Histogram(
            "dgemma_gateway_request_duration_seconds", "End-to-end request time at the gateway", ["variant"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram(
            "dgemma_gateway_time_to_first_event_seconds", "Time to the first upstream event", ["variant"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.targets = Counter(
            "dgemma_gateway_latency_target", "Latency targets met or missed", ["variant", "result"], registry=r)
        self.retries = Counter("dgemma_gateway_retries", "Requests retried on another endpoint", ["reason"],
                               registry=r)
        self.ejections = Counter("dgemma_gateway_ejections", "Endpoints ejected after failures", ["variant"],
                                 registry=r)
        self.throttled = Counter("dgemma_gateway_upstream_throttled", "Upstream answers of 429 (the endpoint pauses)",
                                 ["variant"], registry=r)
        self.tokens = Counter("dgemma_gateway_completion_tokens", "Completion tokens delivered", ["variant"],
                              registry=r)
        self.auth_failures = Counter(
            "dgemma_gateway_auth_failures", "Requests refused for a missing or wrong API key", ["api", "reason"],
            registry=r)
        self.loop_lag = Histogram(
            "dgemma_gateway_event_loop_lag_seconds", "How late the event loop woke from a short sleep (blocked time)",
            buckets=LAG_BUCKETS, registry=r)
        r.register(_StateCollector(demand))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
