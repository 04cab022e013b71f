"""The dashboard's panels and the alert rules, evaluated by a real Prometheus over real scrapes of two gateway
replicas in front of two workers (and the operator's metrics endpoint): each panel shows the number the fleet
actually served, and no alert fires on a healthy fleet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from dgemma_operator.metrics import OperatorMetrics
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.deploy.test_monitoring import dashboard_panels, rule_expressions
from tests.gateway.gateway_harness import MODEL, RunningGateway, static, variant
from tests.monitoring.prom import SCRAPE_INTERVAL_S, Prometheus, binary

pytestmark = pytest.mark.timeout(300)

VARIANT = "team-a/tiny"  # as a cluster names it: namespace/name
# Requests sent through each gateway replica once Prometheus watches (one more each before, see below).
SENT = (6, 4)
OBSERVED_S = 14.0
# As prometheus-operator labels the targets (the Dgemma*Down rules select on them).
TARGET_LABELS = {
    "gateway": {"namespace": "dgemma-system", "service": "dgemma-gateway"},
    "operator": {"namespace": "dgemma-system", "service": "dgemma-operator-metrics"},
}


@dataclass
class Fleet:
    prometheus: Prometheus
    gateways: list[RunningGateway]
    started: float  # when Prometheus began scraping (monotonic clock)
    completion_tokens: int
    decoder_passes: int


def _send(gateway: RunningGateway, count: int) -> tuple[int, int]:
    """`count` completions through one gateway; returns (completion tokens, decoder passes) they report."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)
    tokens = passes = 0
    for i in range(count):
        r = client.completions.create(model=MODEL, prompt=f"Count {i}", max_tokens=12,
                                      extra_body={"max_denoising_steps": 2, "ignore_eos": True})
        assert r.usage is not None
        tokens += r.usage.completion_tokens
        passes += r.model_extra["dgemma"]["decoder_passes"]  # type: ignore[index]
    return tokens, passes


def _metrics_port(worker_port_file: Path) -> int:
    import json

    return int(json.loads(worker_port_file.read_text())["metrics_port"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary("prometheus")
    workers = LocalWorkers(str(tiny_model_dir()), 2, MODEL, ["--max-active", "2", "--metrics-port", "0"],
                           workdir=tmp_path_factory.mktemp("workers"), variant=VARIANT)
    gateways: list[RunningGateway] = []
    prometheus: Prometheus | None = None
    # The operator's metrics endpoint, with what one autoscaler tick and one reconcile record (the operator
    # tests check that kopf's handlers record them).
    operator = OperatorMetrics()
    operator.decided(VARIANT, "steady", 2, 2, (1, 4), time.time())
    operator.reconciles.labels(VARIANT, "applied").inc()
    operator.handler_duration.labels("reconcile_variant").observe(0.02)
    try:
        workers.start()
        workers.wait_bound()
        v = variant(VARIANT)
        for _ in range(2):
            gateways.append(RunningGateway([static(*((w.address, v) for w in workers.workers))]))
        for g in gateways:
            g.wait_ready(2)
            # Every series exists before the first scrape, so rates over the measured load are exact.
            _send(g, 1)
        prometheus = Prometheus(
            tmp_path_factory.mktemp("prometheus"),
            {"gateway": [g.url.removeprefix("http://") for g in gateways],
             "workers": [f"127.0.0.1:{_metrics_port(w.port_file)}" for w in workers.workers],
             "operator": [f"127.0.0.1:{operator.serve('127.0.0.1', 0)}"]},
            labels=TARGET_LABELS,
        )
        started = time.monotonic()
        prometheus.wait_for("count(up == 1)", 5)
        time.sleep(2 * SCRAPE_INTERVAL_S)  # a sample of every counter before the load
        tokens = passes = 0
        for g, n in zip(gateways, SENT, strict=True):
            t, p = _send(g, n)
            tokens, passes = tokens + t, passes + p
        prometheus.wait_for("sum(dgemma_gateway_requests_total)", sum(SENT) + 2)
        prometheus.wait_for("sum(dgemma_worker_requests_total)", sum(SENT) + 2)
        # A rate is extrapolated by about a scrape interval beyond the samples in its window: over a span of
        # OBSERVED_S that is a few percent, well apart from the factor of two the bugs this guards against.
        time.sleep(max(0.0, started + OBSERVED_S - time.monotonic()))
        yield Fleet(prometheus, gateways, started, tokens, passes)
    finally:
        if prometheus is not None:
            prometheus.close()
        for g in gateways:
            g.close()
        workers.stop(timeout=5)
        operator.close()


def _panel_query(expr: str, window_s: int) -> str:
    """The query as Grafana sends it with the variant picked and a rate window over the whole load."""
    return expr.replace("$variant", VARIANT).replace("$__rate_interval", f"{window_s}s")


def _window(fleet: Fleet) -> int:
    """From well before Prometheus's first sample to now: the whole load."""
    return int(time.monotonic() - fleet.started) + 5


def _panel(fleet: Fleet, title: str, legend: str, window_s: int) -> list[float]:
    targets = dashboard_panels()[title]
    expr = next(e for shown, e in targets if shown == legend)
    return [float(r["value"][1]) for r in fleet.prometheus.query(_panel_query(expr, window_s))]


def test_ready_replicas_read_the_fleets_count_however_many_gateways_report_it(fleet: Fleet) -> None:
    window = _window(fleet)
    assert _panel(fleet, "Ready replicas per variant", "{{variant}} ready", window) == [2.0]
    assert _panel(fleet, "Ready replicas per variant", "{{variant}} known", window) == [2.0]
    assert _panel(fleet, "Requests waiting at the workers", "{{variant}}", window) == [0.0]
    assert _panel(fleet, "Replicas: asked for, ready, bounds", "{{variant}} desired", window) == [2.0]
    assert _panel(fleet, "Replicas: asked for, ready, bounds", "{{variant}} max", window) == [4.0]


def test_request_and_token_rates_add_up_what_every_gateway_and_worker_served(fleet: Fleet) -> None:
    window = _window(fleet)
    # A rate over the window times the window is the count, give or take the extrapolation (OBSERVED_S).
    slack = 0.25

    def total(title: str, legend: str) -> float:
        values = _panel(fleet, title, legend, window)
        assert values, f"{title}: no data"
        return sum(values) * window

    assert total("Requests per second by outcome", "{{variant}} {{outcome}}") == pytest.approx(sum(SENT), rel=slack)
    assert total("Worker requests by outcome", "{{variant}} {{outcome}}") == pytest.approx(sum(SENT), rel=slack)
    delivered = total("Tokens/s: asked for vs delivered", "{{variant}} delivered")
    assert delivered == pytest.approx(fleet.completion_tokens, rel=slack)
    assert total("Decoder passes per second", "{{variant}}") == pytest.approx(fleet.decoder_passes, rel=slack)


def test_gateway_and_worker_series_name_the_variant_alike(fleet: Fleet) -> None:
    for metric in ("dgemma_gateway_requests_total", "dgemma_worker_requests_total", "dgemma_worker_ready",
                   "dgemma_operator_desired_replicas"):
        labels = [r["metric"].get("variant") for r in fleet.prometheus.query(f"group by (variant) ({metric})")]
        assert labels == [VARIANT], metric


def test_every_panel_shows_data_for_the_picked_variant(fleet: Fleet) -> None:
    """No blank panel: each query returns series unless the metric it reads has none at all (no retries,
    ejections or held requests on a healthy fleet)."""
    window = _window(fleet)
    quiet = {"dgemma_gateway_retries_total", "dgemma_gateway_ejections_total", "dgemma_operator_handler_errors_total"}
    for title, targets in dashboard_panels().items():
        for legend, expr in targets:
            if any(name in expr for name in quiet):
                continue
            assert fleet.prometheus.query(_panel_query(expr, window)), f"{title} / {legend} shows nothing"


def test_no_alert_fires_on_a_healthy_fleet(fleet: Fleet) -> None:
    for alert, expr in rule_expressions().items():
        assert fleet.prometheus.query(expr) == [], f"{alert} fires on a healthy fleet"
