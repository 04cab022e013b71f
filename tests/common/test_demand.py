"""The demand snapshot contract (dgemma_common.demand): what the gateway writes, the operator reads strictly."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dgemma_common.demand import (
    VERSION,
    DemandSnapshot,
    Merge,
    SnapshotError,
    VariantView,
    merge_views,
    parse_snapshot,
)
from dgemma_gateway.demand import DemandTracker, snapshot
from dgemma_gateway.types import Candidate, EndpointLoad, Variant
from tests.autoscaler.views import view

NOW = 1000.0
V = Variant("ml/gemma", "m", "h100", canvas_length=128)


def gateway_json() -> dict[str, Any]:
    """A snapshot as a gateway serves it: built by its own code, through JSON."""
    tracker = DemandTracker(window_s=10.0)
    for i in range(4):
        tracker.routed(V.name, NOW - i, max_tokens=200, canvases=2)
    tracker.finished(V.name, NOW, 150, met=True, canvases=2)
    load = EndpointLoad(queue_depth=1, active=2, capacity=4, max_queue=8, step_latency_s=0.01,
                        encoder_latency_s=0.005, tokens_per_s=300.0, canvas_length=128, model_name="m", ready=True,
                        draining=False, observed_at=NOW)
    snap = snapshot(tracker, [V], [Candidate("e", V, load)], NOW, time_unix_s=1.8e9)
    return dict(json.loads(json.dumps(snap.model_dump(mode="json"), allow_nan=False)))


def test_what_the_gateway_writes_reads_back_as_the_same_snapshot() -> None:
    data = gateway_json()
    assert data["version"] == VERSION and data["variants"]["ml/gemma"]["demand"]["target_miss_ratio"] == 0.0
    read = parse_snapshot(data)
    assert read.variants["ml/gemma"].demand.routed_canvases_per_s == pytest.approx(0.8)
    assert read.variants["ml/gemma"].capacity.replicas_measured == 1
    assert read.model_dump(mode="json") == data


@pytest.mark.parametrize(("change", "error"), [
    (lambda d: d.update(version=1), "has version 1; this reader knows version 2"),  # canvases allowed, not run
    (lambda d: d.update(version=3), "has version 3; this reader knows version 2"),
    (lambda d: d.pop("version"), "has no version"),
    (lambda d: d["variants"]["ml/gemma"]["demand"].update(canvas_per_s=d["variants"]["ml/gemma"]["demand"].pop(
        "canvases_per_s")), "variants.ml/gemma.demand.canvases_per_s: field required"),
    (lambda d: d["variants"]["ml/gemma"].pop("capacity"), "variants.ml/gemma.capacity: field required"),
    (lambda d: d["variants"]["ml/gemma"]["demand"].update(requests_waiting="3"), "requests_waiting: input should be"),
    (lambda d: d["variants"]["ml/gemma"]["demand"].update(requests_held=True), "requests_held: input should be"),
    (lambda d: d["variants"]["ml/gemma"]["demand"].update(tokens_per_s=-1.0), "tokens_per_s: input should be"),
    (lambda d: d["variants"]["ml/gemma"]["delivered"].update(tokens_per_s=math.nan), "input should be a finite"),
    (lambda d: d.update(variants=[]), "variants: input should be a valid dictionary"),
])
def test_another_version_or_a_missing_renamed_or_mistyped_field_is_an_error_naming_it(change: Any, error: str) -> None:
    data = gateway_json()
    change(data)
    with pytest.raises(SnapshotError, match=error.replace(".", r"\.").replace("(", r"\(")):
        parse_snapshot(data)


def test_a_snapshot_that_is_not_an_object_is_an_error() -> None:
    with pytest.raises(SnapshotError, match="is not a JSON object but list"):
        parse_snapshot([])


def test_a_field_added_by_a_newer_gateway_is_ignored() -> None:
    data = gateway_json()
    data["variants"]["ml/gemma"]["demand"]["new_signal"] = 1.0
    assert parse_snapshot(data) == parse_snapshot(gateway_json())


def test_every_field_says_how_gateway_replicas_views_combine() -> None:
    """A field added without a merge rule would fail the operator's merge; groups merged field by field
    (Merge.EACH) need a rule on each of theirs."""
    groups: list[type[Any]] = [VariantView]
    while groups:
        cls = groups.pop()
        for name, info in cls.model_fields.items():
            rules = [m for m in info.metadata if isinstance(m, Merge)]
            assert len(rules) == 1, f"{cls.__name__}.{name} has no merge rule"
            if rules[0] is Merge.EACH:
                groups.append(info.annotation)  # type: ignore[arg-type]
    assert "version" in DemandSnapshot.model_fields


def test_merging_sums_what_each_gateway_routed_and_takes_the_workers_reports_once() -> None:
    a = view(1.5, met=3, missed=1, waiting=2, held=1, canvases_held=1.0, delivered_tokens_per_s=500.0)
    b = view(0.5, met=1, missed=1, waiting=5, measured=2, capacity=3.0, delivered_tokens_per_s=500.0)
    m = merge_views([a, b])
    assert (m.demand.canvases_per_s, m.demand.requests_held, m.demand.requests_waiting) == (2.0, 1, 5)
    assert m.demand.target_miss_ratio == pytest.approx(2 / 6)
    assert m.delivered.tokens_per_s == 500.0 and m.capacity == b.capacity and m.gateways == 2
    with pytest.raises(ValueError, match="no views"):
        merge_views([])


def test_merging_averages_the_step_shares_each_gateway_learned_per_cap() -> None:
    a = view(1.0).model_copy(update={"step_shares": {"48": 0.5, "8": 1.0}})
    b = view(1.0).model_copy(update={"step_shares": {"48": 0.3}})
    merged = merge_views([a, b]).step_shares
    assert list(merged) == ["8", "48"] and merged == pytest.approx({"8": 1.0, "48": 0.4})
