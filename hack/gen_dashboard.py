"""Generate the Grafana dashboard the chart ships (charts/dgemma/files/dashboards/dgemma.json).

Panels are declared below as (title, unit, queries); the JSON layout is derived, so adding a panel is
one line. Metric names are the real ones of the gateway (`dgemma_gateway_*`, gateway/dgemma_gateway/
metrics.py), the workers (`dgemma_worker_*`, worker/dgemma_worker/metrics.py) and the operator
(`dgemma_operator_*`, operator/dgemma_operator/metrics.py). tests/deploy check that every query names only
metrics those modules declare, aggregated as each metric's kind allows (KINDS there), and tests/monitoring
run every query against a real Prometheus scraping real processes.
Usage: python hack/gen_dashboard.py [--check]
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from _files import ROOT, write_or_check

OUTPUT = ROOT / "charts" / "dgemma" / "files" / "dashboards" / "dgemma.json"
UID = "dgemma-overview"
GW = 'variant=~"$variant"'
WK = GW  # the workers carry the gateway's variant name (namespace/name) as the same label
DECODER = WK + ', kind="decoder"'

# (title, unit, [(legend, expr)]); rows of panels in the order shown, two per row.
Panel = tuple[str, str, list[tuple[str, str]]]
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Service",
        [
            (
                "Ready replicas per variant",
                "short",
                [
                    ("{{variant}} ready", f"max by (variant) (dgemma_gateway_endpoints_ready{{{GW}}})"),
                    ("{{variant}} known", f"max by (variant) (dgemma_gateway_endpoints{{{GW}}})"),
                ],
            ),
            (
                "Requests per second by outcome",
                "reqps",
                [
                    (
                        "{{variant}} {{outcome}}",
                        "sum by (variant, outcome) "
                        f"(rate(dgemma_gateway_requests_total{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "End-to-end latency (p50, p95)",
                "s",
                [
                    (
                        "{{variant}} p50",
                        "histogram_quantile(0.5, sum by (le, variant) "
                        f"(rate(dgemma_gateway_request_duration_seconds_bucket{{{GW}}}[$__rate_interval])))",
                    ),
                    (
                        "{{variant}} p95",
                        "histogram_quantile(0.95, sum by (le, variant) "
                        f"(rate(dgemma_gateway_request_duration_seconds_bucket{{{GW}}}[$__rate_interval])))",
                    ),
                ],
            ),
            (
                "Latency targets missed",
                "percentunit",
                [
                    (
                        "{{variant}}",
                        "sum by (variant) (rate(dgemma_gateway_latency_target_total"
                        f'{{{GW}, result="missed"}}[$__rate_interval])) / sum by (variant) '
                        f"(rate(dgemma_gateway_latency_target_total{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "Time to first event (p95)",
                "s",
                [
                    (
                        "{{variant}}",
                        "histogram_quantile(0.95, sum by (le, variant) "
                        f"(rate(dgemma_gateway_time_to_first_event_seconds_bucket{{{GW}}}[$__rate_interval])))",
                    ),
                ],
            ),
            (
                "Retries and ejections",
                "short",
                [
                    (
                        "retry {{reason}}",
                        "sum by (reason) (rate(dgemma_gateway_retries_total[$__rate_interval]))",
                    ),
                    (
                        "ejected {{variant}}",
                        f"sum by (variant) (rate(dgemma_gateway_ejections_total{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
        ],
    ),
    (
        "Capacity and demand",
        [
            (
                "Tokens/s: asked for vs delivered",
                "short",
                [
                    (
                        "{{variant}} demand",
                        f"sum by (variant) (dgemma_gateway_demand_tokens_per_second{{{GW}}})",
                    ),
                    (
                        "{{variant}} delivered",
                        "sum by (variant) (rate(dgemma_gateway_completion_tokens_total"
                        f"{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "Capacity per ready replica (tokens/s)",
                "short",
                [
                    (
                        "{{variant}}",
                        f"max by (variant) (dgemma_gateway_delivered_tokens_per_second_per_replica{{{GW}}})",
                    ),
                ],
            ),
            (
                "Canvases and requests asked for",
                "short",
                [
                    (
                        "{{variant}} canvases/s",
                        f"sum by (variant) (dgemma_gateway_demand_canvases_per_second{{{GW}}})",
                    ),
                    (
                        "{{variant}} requests/s",
                        f"sum by (variant) (dgemma_gateway_demand_requests_per_second{{{GW}}})",
                    ),
                ],
            ),
            (
                "Requests waiting at the workers",
                "short",
                [
                    ("{{variant}}", f"max by (variant) (dgemma_gateway_requests_waiting{{{GW}}})"),
                ],
            ),
        ],
    ),
    (
        "Autoscaler and operator",
        [
            (
                "Replicas: asked for, ready, bounds",
                "short",
                [
                    ("{{variant}} desired", f"max by (variant) (dgemma_operator_desired_replicas{{{GW}}})"),
                    ("{{variant}} ready", f"max by (variant) (dgemma_operator_ready_replicas{{{GW}}})"),
                    ("{{variant}} max", f"max by (variant) (dgemma_operator_max_replicas{{{GW}}})"),
                ],
            ),
            (
                "Autoscaler decisions by reason",
                "short",
                [
                    (
                        "{{variant}} {{reason}}",
                        "sum by (variant, reason) "
                        f"(increase(dgemma_operator_autoscaler_decisions_total{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "Reconciles by outcome",
                "short",
                [
                    (
                        "{{variant}} {{outcome}}",
                        "sum by (variant, outcome) "
                        f"(increase(dgemma_operator_reconciles_total{{{GW}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "Operator handlers: p95 duration and errors",
                "s",
                [
                    (
                        "{{handler}} p95",
                        "histogram_quantile(0.95, sum by (le, handler) "
                        "(rate(dgemma_operator_handler_duration_seconds_bucket[$__rate_interval])))",
                    ),
                    (
                        "{{handler}} {{error}} errors/s",
                        "sum by (handler, error) (rate(dgemma_operator_handler_errors_total[$__rate_interval]))",
                    ),
                ],
            ),
        ],
    ),
    (
        "Workers",
        [
            (
                "Tokens/s per worker",
                "short",
                [
                    ("{{pod}}", f"dgemma_worker_tokens_per_second{{{WK}}}"),
                ],
            ),
            (
                "Active and queued requests",
                "short",
                [
                    ("{{pod}} active", f"dgemma_worker_active_requests{{{WK}}}"),
                    ("{{pod}} queued", f"dgemma_worker_queue_depth{{{WK}}}"),
                    ("{{pod}} capacity", f"dgemma_worker_capacity{{{WK}}}"),
                ],
            ),
            (
                "Engine busy share and what a step costs it",
                "short",
                [
                    ("{{pod}} busy share", f"rate(dgemma_worker_busy_seconds_total{{{WK}}}[$__rate_interval])"),
                    ("{{pod}} busy s per step / step s",
                     f"dgemma_worker_busy_step_seconds{{{WK}}} / dgemma_worker_step_latency_avg_seconds{{{WK}}}"),
                ],
            ),
            (
                "Decoder step latency (p50, p95)",
                "s",
                [
                    (
                        "{{variant}} p50",
                        "histogram_quantile(0.5, sum by (le, variant) "
                        f"(rate(dgemma_worker_step_latency_seconds_bucket{{{DECODER}}}[$__rate_interval])))",
                    ),
                    (
                        "{{variant}} p95",
                        "histogram_quantile(0.95, sum by (le, variant) "
                        f"(rate(dgemma_worker_step_latency_seconds_bucket{{{DECODER}}}[$__rate_interval])))",
                    ),
                ],
            ),
            (
                "Worker requests by outcome",
                "reqps",
                [
                    (
                        "{{variant}} {{outcome}}",
                        "sum by (variant, outcome) "
                        f"(rate(dgemma_worker_requests_total{{{WK}}}[$__rate_interval]))",
                    ),
                ],
            ),
            (
                "Queue wait and time to first commit (p95)",
                "s",
                [
                    (
                        "{{variant}} queue wait",
                        "histogram_quantile(0.95, sum by (le, variant) "
                        f"(rate(dgemma_worker_queue_wait_seconds_bucket{{{WK}}}[$__rate_interval])))",
                    ),
                    (
                        "{{variant}} first commit",
                        "histogram_quantile(0.95, sum by (le, variant) "
                        f"(rate(dgemma_worker_time_to_first_commit_seconds_bucket{{{WK}}}[$__rate_interval])))",
                    ),
                ],
            ),
            (
                "Decoder passes per second",
                "short",
                [
                    (
                        "{{variant}}",
                        "sum by (variant) "
                        f"(rate(dgemma_worker_decoder_passes_total{{{WK}}}[$__rate_interval]))",
                    ),
                ],
            ),
        ],
    ),
]

WIDTH, HEIGHT = 12, 8


def _panel(
    panel_id: int, title: str, unit: str, queries: list[tuple[str, str]], x: int, y: int
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(queries)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as a dict (Grafana schema 39)."""
    panels: list[dict[str, Any]] = []
    y = 0
    panel_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        for index, (title, unit, queries) in enumerate(row_panels):
            x = (index % 2) * WIDTH
            panels.append(_panel(panel_id, title, unit, queries, x, y))
            panel_id += 1
            if index % 2 == 1 or index == len(row_panels) - 1:
                y += HEIGHT
    return {
        "uid": UID,
        "title": "dgemma: DiffusionGemma serving",
        "description": "Routing, latency targets, demand and capacity per variant; worker internals.",
        "tags": ["dgemma", "llm", "inference"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "variant",
                    "label": "Variant",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": "label_values(dgemma_gateway_endpoints, variant)",
                        "refId": "variants",
                    },
                    "definition": "label_values(dgemma_gateway_endpoints, variant)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "sort": 1,
                    "current": {"text": "All", "value": "$__all"},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def outputs() -> dict[pathlib.Path, str]:
    """The dashboard file's exact text."""
    return {OUTPUT: json.dumps(dashboard(), indent=2) + "\n"}


if __name__ == "__main__":
    sys.exit(write_or_check(outputs()))
