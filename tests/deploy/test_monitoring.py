"""Alerts and the dashboard use only metric names that gateway and workers export, and are documented."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dgemma_common.metrics import ALLOWED_AGGREGATIONS, Kind
from dgemma_common.types import LoadSnapshot
from dgemma_gateway import metrics as gateway_metrics
from dgemma_operator import metrics as operator_metrics
from dgemma_worker import metrics as worker_metrics
from tests.autoscaler.views import snapshot, view
from tests.deploy.helpers import CHART, EVERYTHING, NAMESPACE, ROOT, find, one, render
from tests.deploy.promql import base_name, uses

# What each component declares it exports, and how each metric adds up across replicas.
KINDS: dict[str, Kind] = {**gateway_metrics.KINDS, **worker_metrics.KINDS, **operator_metrics.KINDS}
# From Prometheus itself and kube-state-metrics.
OTHER = {"up", "kube_pod_container_status_restarts", "kube_pod_container_status_last_terminated_reason"}


def rule_expressions() -> dict[str, str]:
    rule = one(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule", "dgemma")
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


def dashboard_panels() -> dict[str, list[tuple[str, str]]]:
    """Each panel's title with its (legend, query) pairs."""
    board = json.loads((CHART / "files" / "dashboards" / "dgemma.json").read_text())
    return {p["title"]: [(t["legendFormat"], t["expr"]) for t in p["targets"]]
            for p in board["panels"] if p.get("targets")}


def dashboard_expressions() -> list[str]:
    return [expr for targets in dashboard_panels().values() for _, expr in targets]


def test_alerts_cover_targets_missed_no_ready_replicas_and_worker_errors() -> None:
    alerts = rule_expressions()
    assert {"DgemmaLatencyTargetsMissed", "DgemmaNoReadyReplicas", "DgemmaWorkerErrors"} <= set(alerts)
    assert 'result="missed"' in alerts["DgemmaLatencyTargetsMissed"]
    assert "dgemma_gateway_endpoints_ready" in alerts["DgemmaNoReadyReplicas"]
    assert 'outcome=~"error|oom"' in alerts["DgemmaWorkerErrors"]


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    used = {base_name(u.metric) for e in [*rule_expressions().values(), *dashboard_expressions()] for u in uses(e)}
    assert used, "no metric found: the reader is broken"
    unknown = used - set(KINDS) - OTHER
    assert not unknown, f"unknown metrics: {sorted(unknown)}"
    assert {"dgemma_gateway_endpoints_ready", "dgemma_worker_tokens_per_second"} <= used


def _exported(registry: CollectorRegistry) -> set[str]:
    return {m.name for m in registry.collect()}


def test_every_exported_metric_declares_how_it_adds_up_across_replicas() -> None:
    gateway = gateway_metrics.GatewayMetrics(lambda: snapshot({"ns/a": view(1.0)}))  # every gauge present
    worker = worker_metrics.WorkerMetrics(lambda: _LOAD, variant="ns/a")
    operator = operator_metrics.OperatorMetrics()
    operator.decided("ns/a", "steady", 1, 1, (1, 2), 0.0)
    operator.handler_duration.labels("reconcile_variant").observe(0.1)
    operator.handler_errors.labels("reconcile_variant", "temporary").inc()
    operator.reconciles.labels("ns/a", "applied").inc()
    for component, registry, kinds in (("gateway", gateway.registry, gateway_metrics.KINDS),
                                        ("worker", worker.registry, worker_metrics.KINDS),
                                        ("operator", operator.registry, operator_metrics.KINDS)):
        ours = {n for n in _exported(registry) if n.startswith("dgemma_")}
        assert ours == set(kinds), f"{component}: undeclared {ours - set(kinds)}, stale {set(kinds) - ours}"
        # prometheus_client's default collectors, which a private registry does not get by itself.
        assert {"process_resident_memory_bytes", "python_gc_objects_collected", "python_info"} <= _exported(
            registry), component


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_aggregates_each_metric_as_its_kind_allows(source: str) -> None:
    """Per-replica counters and shares are summed; a gauge every gateway replica reports for the whole fleet
    is not (N replicas would read N times too high), nor is a ratio or an average."""
    queries = dashboard_expressions() if source == "dashboard" else list(rule_expressions().values())
    checked = 0
    for expr in queries:
        for use in uses(expr):
            kind = KINDS.get(base_name(use.metric))
            if kind is None or use.aggregation is None:
                continue
            checked += 1
            allowed = ALLOWED_AGGREGATIONS[kind]
            assert use.aggregation in allowed, (
                f"{use.metric} is a {kind.value} metric: aggregate it with {sorted(allowed)}, "
                f"not {use.aggregation}, in: {expr}")
            if kind is Kind.COUNTER and "histogram_quantile" not in use.functions:
                assert {"rate", "increase", "irate"} & set(use.functions), f"a raw counter in: {expr}"
    assert checked >= 5


def test_the_aggregation_reader_sees_what_encloses_each_metric() -> None:
    found = uses('histogram_quantile(0.95, sum by (le, variant) (rate(a_bucket{x="(y)"}[5m]))) '
                 "/ on (variant) max(b) by (variant) + c")
    assert [(u.metric, u.aggregation, u.functions) for u in found] == [
        ("a_bucket", "sum", ("histogram_quantile", "sum", "rate")), ("b", "max", ("max",)), ("c", None, ())]


def test_every_variant_filter_uses_the_label_both_components_export() -> None:
    """Gateway and worker series name a variant the same way (`variant`, namespace/name): a dashboard filter
    on another label, or a worker with another name for it, blanks the worker panels."""
    filters = [f for e in dashboard_expressions() for f in re.findall(r'(\w+)=~"\$variant"', e)]
    assert filters and set(filters) == {"variant"}
    board = json.loads((CHART / "files" / "dashboards" / "dgemma.json").read_text())
    variable = next(v for v in board["templating"]["list"] if v["name"] == "variant")
    assert variable["definition"].endswith(", variant)")
    worker = worker_metrics.WorkerMetrics(lambda: _LOAD, variant="team-a/gemma")
    labels = {s.labels.get("variant") for m in worker.registry.collect() for s in m.samples}
    assert labels == {"team-a/gemma"}, "every worker series carries the variant"


def test_the_operator_tells_each_worker_the_gateways_name_for_its_variant() -> None:
    from dgemma_gateway.kube import variant_name
    from dgemma_operator import children, reconcile

    owner = _resource("team-a", "gemma")
    deployment = children.deployment(owner, reconcile.parse_spec(owner))
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DGEMMA_VARIANT"] == variant_name(owner["metadata"]) == "team-a/gemma"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] in ("In", "NotIn", "Exists", "DoesNotExist") for e in expressions)
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        (e["operator"] == "In" and labels.get(e["key"]) in e["values"])
        or (e["operator"] == "NotIn" and labels.get(e["key"]) not in e["values"])
        or (e["operator"] == "Exists" and e["key"] in labels)
        or (e["operator"] == "DoesNotExist" and e["key"] not in labels)
        for e in expressions
    )


def test_each_service_monitor_scrapes_each_pod_through_exactly_one_service() -> None:
    from dgemma_operator import children, reconcile

    objects = render(EVERYTHING)
    monitors = find(objects, "ServiceMonitor")
    services = find(objects, "Service")
    # The operator makes one worker Service per DiffusionGemma in the watched namespaces: one of each runtime
    # that runs pods (a dgemma worker's metrics port, a vLLM pod's http port).
    for owner in (_resource("team-a", "gemma"), _resource("team-a", "fast", runtime="vllm")):
        spec = reconcile.parse_spec(owner)
        services += [c for c in children.children(owner, spec) if c["kind"] == "Service"]
    assert {m["metadata"]["name"] for m in monitors} >= {"dgemma-gateway", "dgemma-workers"}
    for monitor in monitors:
        where = monitor["spec"].get("namespaceSelector", {})
        picked = [
            s for s in services
            if (where.get("any") or s["metadata"]["namespace"] in where.get("matchNames", [NAMESPACE]))
            and _selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        # Each set of pods (a Service's selector) through one Service only, however many variants there are.
        pods = [tuple(sorted(s["spec"]["selector"].items())) for s in picked]
        names = sorted(s["metadata"]["name"] for s in picked)
        assert picked and len(pods) == len(set(pods)), f"ServiceMonitor {monitor['metadata']['name']} selects {names}"
        ports = {p["name"] for s in picked for p in s["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # The headless gateway Service (same pods) exists, and is the one left out.
    assert one(objects, "Service", "dgemma-gateway-pods")


def _resource(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    from tests.operator.helpers import sample

    owner = sample(name, **spec)
    owner["metadata"].update(namespace=namespace, uid="u1")
    return owner


_LOAD = LoadSnapshot(queue_depth=0, active=0, capacity=2, max_queue=4, step_latency_s=0.01, tokens_per_s=1.0,
                     encoder_latency_s=0.01, canvas_length=16, model_name="tiny", model_revision="local",
                     ready=True, draining=False)


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
