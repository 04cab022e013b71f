"""Each alert of the chart's PrometheusRule, unit-tested with `promtool test rules`: it fires on the series
that should fire it, with the labels an on-call engineer routes on, and stays silent on a healthy fleet."""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import EVERYTHING, NAMESPACE, one, render
from tests.monitoring.prom import binary

V = "team-a/gemma"
GW = f'variant="{V}", namespace="{NAMESPACE}", pod="dgemma-gateway-1"'
OP = f'variant="{V}", namespace="{NAMESPACE}", pod="dgemma-operator-1"'
POD = 'namespace="team-a", pod="gemma-7d9f-abcde", container="worker"'
Series = list[tuple[str, str]]  # (series, promtool values notation, one sample a minute)


@dataclass(frozen=True)
class Case:
    """Series that must fire the alert at `at` (with `labels`), and healthy ones that must not."""

    firing: Series
    healthy: Series
    labels: dict[str, str]
    at: str = "30m"
    severity: str = "warning"
    extra: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "DgemmaLatencyTargetsMissed": Case(
        firing=[(f'dgemma_gateway_latency_target_total{{{GW}, result="missed"}}', "0+30x40"),
                (f'dgemma_gateway_latency_target_total{{{GW}, result="met"}}', "0+70x40")],
        healthy=[(f'dgemma_gateway_latency_target_total{{{GW}, result="missed"}}', "0+2x40"),
                 (f'dgemma_gateway_latency_target_total{{{GW}, result="met"}}', "0+98x40")],
        labels={"variant": V}),
    "DgemmaNoReadyReplicas": Case(
        firing=[(f"dgemma_gateway_endpoints_ready{{{GW}}}", "0x40"), (f"dgemma_gateway_endpoints{{{GW}}}", "2x40"),
                (f"dgemma_gateway_demand_requests_per_second{{{GW}}}", "1x40")],
        # Scaled to zero and idle is not an incident.
        healthy=[(f"dgemma_gateway_endpoints_ready{{{GW}}}", "0x40"), (f"dgemma_gateway_endpoints{{{GW}}}", "0x40"),
                 (f"dgemma_gateway_demand_requests_per_second{{{GW}}}", "0x40")],
        labels={"variant": V}, severity="critical"),
    "DgemmaWorkerErrors": Case(
        firing=[(f'dgemma_worker_requests_total{{variant="{V}", pod="w1", outcome="oom"}}', "0+5x40"),
                (f'dgemma_worker_requests_total{{variant="{V}", pod="w1", outcome="length"}}', "0+20x40")],
        healthy=[(f'dgemma_worker_requests_total{{variant="{V}", pod="w1", outcome="oom"}}', "0x40"),
                 (f'dgemma_worker_requests_total{{variant="{V}", pod="w1", outcome="length"}}', "0+20x40")],
        labels={"variant": V}),
    "DgemmaWorkerAuthFailures": Case(
        # A gateway without the key: its load watch is refused every 2 s.
        firing=[(f'dgemma_worker_auth_failures_total{{variant="{V}", pod="w1", api="denoiser", reason="missing"}}',
                 "0x10 0+30x30"),
                (f'dgemma_worker_auth_failures_total{{variant="{V}", pod="w1", api="kserve", reason="invalid"}}',
                 "0x40")],
        healthy=[(f'dgemma_worker_auth_failures_total{{variant="{V}", pod="w1", api="denoiser", reason="missing"}}',
                  "0x40")],
        labels={"variant": V, "api": "denoiser"}),
    "DgemmaWorkerQueueSaturated": Case(
        firing=[(f'dgemma_worker_queue_depth{{variant="{V}", pod="w1"}}', "15x40"),
                (f'dgemma_worker_max_queue{{variant="{V}", pod="w1"}}', "16x40")],
        healthy=[(f'dgemma_worker_queue_depth{{variant="{V}", pod="w1"}}', "3x40"),
                 (f'dgemma_worker_max_queue{{variant="{V}", pod="w1"}}', "16x40")],
        labels={"variant": V}),
    "DgemmaGatewayErrors": Case(
        firing=[(f'dgemma_gateway_requests_total{{{GW}, api="openai", outcome="502"}}', "0+10x40"),
                (f'dgemma_gateway_requests_total{{{GW}, api="openai", outcome="200"}}', "0+90x40")],
        healthy=[(f'dgemma_gateway_requests_total{{{GW}, api="openai", outcome="429"}}', "0+10x40"),
                 (f'dgemma_gateway_requests_total{{{GW}, api="openai", outcome="200"}}', "0+90x40")],
        labels={"variant": V}, severity="critical"),
    "DgemmaQueueGrowingAtMaxReplicas": Case(
        firing=[(f"dgemma_gateway_requests_waiting{{{GW}}}", "0+1x40"),
                (f"dgemma_operator_desired_replicas{{{OP}}}", "4x40"),
                (f"dgemma_operator_max_replicas{{{OP}}}", "4x40")],
        # The same growth below the maximum is the autoscaler's to handle.
        healthy=[(f"dgemma_gateway_requests_waiting{{{GW}}}", "0+1x40"),
                 (f"dgemma_operator_desired_replicas{{{OP}}}", "3x40"),
                 (f"dgemma_operator_max_replicas{{{OP}}}", "4x40")],
        labels={"variant": V}),
    "DgemmaReplicasNotReady": Case(
        firing=[(f"dgemma_operator_desired_replicas{{{OP}}}", "3x40"),
                (f"dgemma_operator_ready_replicas{{{OP}}}", "1x40")],
        # Two replicas being added for a few minutes (normal scale-up), then ready.
        healthy=[(f"dgemma_operator_desired_replicas{{{OP}}}", "3x40"),
                 (f"dgemma_operator_ready_replicas{{{OP}}}", "1x5 3x35")],
        labels={"variant": V}),
    "DgemmaWorkerRestarting": Case(
        # A restart every other minute, then none.
        firing=[(f"kube_pod_container_status_restarts_total{{{POD}}}", "0 0 1 1 2 2 3 3 4 4 5 5 6x28")],
        healthy=[(f"kube_pod_container_status_restarts_total{{{POD}}}", "0x10 1x30")],
        labels={"namespace": "team-a", "pod": "gemma-7d9f-abcde"}, at="15m"),
    "DgemmaWorkerOOMKilled": Case(
        firing=[(f"kube_pod_container_status_restarts_total{{{POD}}}", "0x20 1x20"),
                (f'kube_pod_container_status_last_terminated_reason{{{POD}, reason="OOMKilled"}}', "_x20 1x20")],
        healthy=[(f"kube_pod_container_status_restarts_total{{{POD}}}", "0x20 1x20"),
                 (f'kube_pod_container_status_last_terminated_reason{{{POD}, reason="Error"}}', "_x20 1x20")],
        labels={"namespace": "team-a", "pod": "gemma-7d9f-abcde"}, at="25m"),
    "DgemmaOperatorReconcileErrors": Case(
        firing=[(f'dgemma_operator_reconciles_total{{{OP}, outcome="error"}}', "0x20 1x20"),
                (f'dgemma_operator_reconciles_total{{{OP}, outcome="applied"}}', "0+1x40")],
        healthy=[(f'dgemma_operator_reconciles_total{{{OP}, outcome="retry"}}', "0x20 1x20"),
                 (f'dgemma_operator_reconciles_total{{{OP}, outcome="applied"}}', "0+1x40")],
        labels={"variant": V}, at="25m"),
    "DgemmaGatewayDown": Case(
        firing=[(f'up{{namespace="{NAMESPACE}", service="dgemma-gateway", pod="dgemma-gateway-1"}}', "1x5 0x35")],
        healthy=[(f'up{{namespace="{NAMESPACE}", service="dgemma-gateway", pod="dgemma-gateway-1"}}', "1x40")],
        labels={}, severity="critical"),
    "DgemmaOperatorDown": Case(
        firing=[(f'up{{namespace="{NAMESPACE}", service="dgemma-operator-metrics", pod="dgemma-operator-1"}}',
                 "1x5 0x35")],
        healthy=[(f'up{{namespace="{NAMESPACE}", service="dgemma-operator-metrics", pod="dgemma-operator-1"}}',
                 "1x40")],
        labels={}),
}


def _rules() -> dict[str, Any]:
    values = copy.deepcopy(EVERYTHING)
    rule = one(render(values), "PrometheusRule", "dgemma")
    return {"groups": rule["spec"]["groups"]}


def _without_annotations(rules: dict[str, Any]) -> dict[str, Any]:
    """The rules as promtool's unit tests compare them: annotation text is checked by `promtool check rules`."""
    out = copy.deepcopy(rules)
    for group in out["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return out


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_every_alert_has_a_unit_test_here() -> None:
    alerts = {r["alert"] for g in _rules()["groups"] for r in g["rules"]}
    assert alerts == set(CASES)


def test_the_rules_and_their_annotation_templates_are_valid(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_rules()))
    result = _promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", CASES)
def test_the_alert_fires_on_its_condition_and_not_on_a_healthy_fleet(alert: str, tmp_path: Path) -> None:
    case = CASES[alert]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_without_annotations(_rules())))

    def test(series: Series, fires: bool) -> dict[str, Any]:
        expected = [{"exp_labels": {**case.labels, "severity": case.severity, **case.extra}}] if fires else []
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [{"eval_time": case.at, "alertname": alert, "exp_alerts": expected}],
        }

    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
             "tests": [test(case.firing, True), test(case.healthy, False)]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
