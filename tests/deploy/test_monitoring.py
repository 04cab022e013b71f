"""Alerts and the dashboard use only metric names that gateway and workers export, and are documented."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.helpers import CHART, ROOT, one, render

# Names from gateway/dgemma_gateway/metrics.py and worker/dgemma_worker/metrics.py (counters with _total,
# histograms with _bucket); kube_* and up come from kube-state-metrics and Prometheus itself.
GATEWAY = {
    "dgemma_gateway_requests_total",
    "dgemma_gateway_request_duration_seconds_bucket",
    "dgemma_gateway_time_to_first_event_seconds_bucket",
    "dgemma_gateway_latency_target_total",
    "dgemma_gateway_retries_total",
    "dgemma_gateway_ejections_total",
    "dgemma_gateway_completion_tokens_total",
    "dgemma_gateway_endpoints",
    "dgemma_gateway_endpoints_ready",
    "dgemma_gateway_demand_tokens_per_second",
    "dgemma_gateway_demand_canvases_per_second",
    "dgemma_gateway_demand_requests_per_second",
    "dgemma_gateway_requests_waiting",
    "dgemma_gateway_latency_target_miss_ratio",
    "dgemma_gateway_delivered_tokens_per_second_per_replica",
}
WORKER = {
    "dgemma_worker_requests_total",
    "dgemma_worker_tokens_generated_total",
    "dgemma_worker_decoder_passes_total",
    "dgemma_worker_encoder_passes_total",
    "dgemma_worker_step_latency_seconds_bucket",
    "dgemma_worker_time_to_first_commit_seconds_bucket",
    "dgemma_worker_queue_wait_seconds_bucket",
    "dgemma_worker_request_duration_seconds_bucket",
    "dgemma_worker_queue_depth",
    "dgemma_worker_active_requests",
    "dgemma_worker_capacity",
    "dgemma_worker_max_queue",
    "dgemma_worker_step_latency_avg_seconds",
    "dgemma_worker_tokens_per_second",
    "dgemma_worker_ready",
    "dgemma_worker_draining",
}
OTHER = {"up", "kube_deployment_status_replicas_available"}
SOURCES = {
    "gateway": ROOT / "gateway" / "dgemma_gateway" / "metrics.py",
    "worker": ROOT / "worker" / "dgemma_worker" / "metrics.py",
}
METRIC = re.compile(r"\b(dgemma_(?:gateway|worker)_[a-z_]+|kube_[a-z_]+|up)\b(?=\s*[{\[)]|\s*$|\s*[/=<>])")


def names_in(expr: str) -> set[str]:
    return {m.group(1) for m in METRIC.finditer(expr)}


def rule_expressions() -> dict[str, str]:
    rule = one(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule", "dgemma")
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def dashboard_expressions() -> list[str]:
    board = json.loads((CHART / "files" / "dashboards" / "dgemma.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_alerts_cover_targets_missed_no_ready_replicas_and_worker_errors() -> None:
    alerts = rule_expressions()
    assert {"DgemmaLatencyTargetsMissed", "DgemmaNoReadyReplicas", "DgemmaWorkerErrors"} <= set(alerts)
    assert 'result="missed"' in alerts["DgemmaLatencyTargetsMissed"]
    assert "dgemma_gateway_endpoints_ready" in alerts["DgemmaNoReadyReplicas"]
    assert 'outcome=~"error|oom"' in alerts["DgemmaWorkerErrors"]


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    used = set().union(*(names_in(e) for e in [*rule_expressions().values(), *dashboard_expressions()]))
    assert used, "no metric found: the pattern is broken"
    assert used <= GATEWAY | WORKER | OTHER, f"unknown metrics: {sorted(used - GATEWAY - WORKER - OTHER)}"
    assert {"dgemma_gateway_endpoints_ready", "dgemma_worker_tokens_per_second"} <= used


@pytest.mark.parametrize("component", SOURCES)
def test_the_known_names_match_the_components_sources_when_present(component: str) -> None:
    source = SOURCES[component]
    if not source.exists():
        pytest.skip(f"{source.relative_to(ROOT)} is not on this branch yet")
    text = source.read_text()
    known = GATEWAY if component == "gateway" else WORKER
    for name in known:
        base = re.sub(r"_(total|bucket)$", "", name)
        short = base.removeprefix(f"dgemma_{component}_")
        assert base in text or f'"{short}"' in text or f"_{short}" in text, f"{name} not in {source.name}"


def test_every_alert_is_documented_in_operations() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for alert in rule_expressions():
        assert f"`{alert}`" in text, f"{alert} is not in docs/operations.md"


def test_the_dashboard_is_valid_grafana_json_with_unique_panel_ids() -> None:
    board = json.loads((CHART / "files" / "dashboards" / "dgemma.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["schemaVersion"] >= 36
    for panel in board["panels"]:
        assert panel["gridPos"]["w"] <= 24
    configmap = one(render(), "ConfigMap", "dgemma-dashboard")
    assert json.loads(configmap["data"]["dgemma.json"]) == board
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
