"""The operator's own metrics and Events, from the running operator (kopf's KopfRunner against the emulator):
handlers timed and their failures counted, reconciles by outcome, autoscaler decisions, Events from
dgemma-operator."""

from __future__ import annotations

import json
import urllib.request

from kopf.testing import KopfRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import DemandStub, apply, eventually, get, sample

FAST = {"enabled": True, "targetUtilization": 0.5, "scaleUpStabilizationSeconds": 0}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(port: int, name: str, **labels: str) -> float:
    """One sample's value (0 when absent, or while the endpoint is not up yet)."""
    try:
        return scrape(port).get((name, tuple(sorted(labels.items()))), 0.0)
    except OSError:
        return 0.0


def test_decisions_reconciles_and_handler_timings_are_exported(
    k8s: EmulatorThread, operator: KopfRunner, demand: DemandStub, metrics_port: int
) -> None:
    demand.demand("default/gemma", canvases_per_s=1.6, capacity=1.0)  # -> 4 replicas, bounded to 3
    apply(k8s, sample(replicas=1, maxReplicas=3, autoscaling=FAST))
    eventually(lambda: value(metrics_port, "dgemma_operator_desired_replicas", variant="default/gemma") == 3,
               timeout=40)
    assert value(metrics_port, "dgemma_operator_autoscaler_decisions_total", variant="default/gemma",
                 reason="scale_up") >= 1
    assert value(metrics_port, "dgemma_operator_max_replicas", variant="default/gemma") == 3
    assert value(metrics_port, "dgemma_operator_min_replicas", variant="default/gemma") == 1
    assert value(metrics_port, "dgemma_operator_last_decision", variant="default/gemma", reason="scale_up") == 1
    assert value(metrics_port, "dgemma_operator_reconciles_total", variant="default/gemma", outcome="applied") >= 1
    for handler in ("reconcile_variant", "autoscale"):
        assert value(metrics_port, "dgemma_operator_handler_duration_seconds_count", handler=handler) >= 1
    assert value(metrics_port, "process_resident_memory_bytes") > 0


def test_an_invalid_spec_counts_as_an_invalid_reconcile_and_a_permanent_handler_error(
    k8s: EmulatorThread, operator: KopfRunner, metrics_port: int
) -> None:
    apply(k8s, sample(gpu={"profile": "custom"}))  # a custom profile names no GPU product: invalid
    eventually(lambda: value(metrics_port, "dgemma_operator_reconciles_total", variant="default/gemma",
                             outcome="invalid") == 1)
    assert value(metrics_port, "dgemma_operator_handler_errors_total", handler="reconcile_variant",
                 error="permanent") == 1


def test_events_are_reported_by_dgemma_operator(k8s: EmulatorThread, operator: KopfRunner) -> None:
    apply(k8s, sample())
    eventually(lambda: get(k8s, "deployment", "gemma-worker"))

    def ours() -> list[dict[str, object]]:
        events = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
        return [e for e in events if e["involvedObject"]["name"] == "gemma"]

    events = eventually(ours)
    assert {e["source"]["component"] for e in events} == {"dgemma-operator"}  # kubectl describe: From
    assert {e["reportingComponent"] for e in events} == {"dgemma-operator"}
