"""The operator's autoscaler inputs and outputs: spec -> policy, gateway snapshot -> measurements, one tick."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dgemma_operator import models
from dgemma_operator.autoscale import (
    Problem,
    measurements_from_snapshot,
    memory_status,
    plan,
    policy_from_spec,
    prior_canvases_per_s,
    state_from_status,
)
from dgemma_operator.autoscaler import ScalerState
from dgemma_operator.status import as_patch
from tests.autoscaler.views import view

NOW = 1_800_000_000.0


def spec(**fields: Any) -> models.DiffusionGemmaSpec:
    base: dict[str, Any] = {"servedModelName": "m", "model": {"pvc": {"claimName": "c"}}, "image": "i",
                            "gpu": {"profile": "h100"}, "generation": {"canvasLength": 256}}
    return models.DiffusionGemmaSpec.model_validate({**base, **fields})


def test_the_resources_settings_become_the_policy() -> None:
    p = policy_from_spec(spec(minReplicas=0, maxReplicas=6, replicas=0, autoscaling={
        "enabled": True, "targetUtilization": 0.5, "scaleUpStabilizationSeconds": 10,
        "scaleDownStabilizationSeconds": 60, "scaleToZero": True, "scaleToZeroIdleSeconds": 30,
        "maxScaleUpStep": 2, "maxScaleDownStep": 3}))
    assert (p.min_replicas, p.max_replicas, p.target_utilization) == (0, 6, 0.5)
    assert (p.scale_up_window_s, p.scale_down_window_s, p.scale_to_zero_idle_s) == (10.0, 60.0, 30.0)
    assert (p.max_scale_up_step, p.max_scale_down_step) == (2, 3)
    assert policy_from_spec(spec()).scale_to_zero_idle_s is None  # scale to zero is opt-in


def test_the_snapshot_becomes_measurements_with_held_requests_counted_as_waiting() -> None:
    m = measurements_from_snapshot(view(1.5, capacity=None, waiting=2, held=3, canvases_held=3.0), 2, 1,
                                   prior_canvases_per_s(spec()), NOW)
    assert (m.replicas, m.ready_replicas, m.demand_canvases_per_s) == (2, 1, 1.5)
    assert (m.waiting_requests, m.waiting_canvases) == (5, 5.0)
    assert m.capacity_canvases_per_s is None and m.prior_canvases_per_s == pytest.approx(1100 / 256)


def test_the_state_survives_a_round_trip_through_the_status() -> None:
    state = ScalerState(recommendations=((NOW - 5, 2), (NOW, 3)), panic_until=NOW + 60, first_seen=NOW - 100)
    written = as_patch(models.DiffusionGemmaStatus(autoscaling=models.AutoscalingStatus(memory=memory_status(state))))
    stored = json.loads(json.dumps(written, allow_nan=False))  # JSON-safe: no infinities
    assert stored["autoscaling"]["memory"]["lastDemandAt"] is None  # null: a merge patch removes it
    back = state_from_status(models.DiffusionGemmaStatus.model_validate(stored))
    assert back == state
    assert state_from_status(None) == ScalerState()
    assert math.isinf(state_from_status(models.DiffusionGemmaStatus()).panic_until)


def test_a_tick_without_measurements_keeps_the_replicas_and_says_why_once() -> None:
    s = spec(replicas=2, autoscaling={"enabled": True})
    unreachable = Problem("GatewayUnreachable", "the gateway is unreachable")
    step = plan(s, None, None, unreachable, ScalerState(), NOW, "t")
    assert step.replicas is None and step.event is not None and step.event[:2] == ("Warning", "NoMeasurements")
    written = as_patch(step.status)
    assert written["autoscaling"]["lastDecision"]["reason"] == "kept 2 replicas: the gateway is unreachable"
    assert "memory" not in written["autoscaling"] and "measured" not in written  # left as they were
    assert step.conditions is not None
    (active,) = step.conditions
    assert (active.type, active.status, active.reason) == ("ScalingActive", "False", "GatewayUnreachable")
    now = models.DiffusionGemmaStatus(autoscaling=step.status.autoscaling, conditions=step.conditions)
    again = plan(s, now, None, unreachable, ScalerState(), NOW + 1, "t")
    assert again.event is None  # the same problem is not reported again and again
    assert again.conditions is None  # nor written again


def test_a_tick_scales_up_through_the_decision_and_records_its_inputs() -> None:
    s = spec(replicas=1, autoscaling={"enabled": True, "targetUtilization": 0.5})
    step = plan(s, models.DiffusionGemmaStatus(ready_replicas=1), view(1.6, capacity=2.0), None, ScalerState(),
                NOW, "t")
    assert step.replicas == 2 and step.event is not None and step.event[1] == "ScaledUp"
    written = as_patch(step.status)
    record = written["autoscaling"]["lastDecision"]
    assert record["desiredReplicas"] == 2 and record["reason"].startswith("scale up")
    assert record["inputs"]["demand_canvases_per_s"] == 1.6 and record["inputs"]["capacitySource"] == "measured"
    assert written["measured"]["tokensPerSecondPerReplica"] == 512.0
    json.dumps(written, allow_nan=False)
    assert step.conditions is not None and step.conditions[0].reason == "ValidMeasurements"


def test_scale_from_zero_on_held_requests() -> None:
    s = spec(replicas=0, minReplicas=0, autoscaling={"enabled": True, "scaleToZero": True})
    step = plan(s, None, view(0.0, capacity=None, held=1, canvases_held=1.0), None, ScalerState(), NOW, "t")
    assert step.replicas == 1
    json.dumps(as_patch(step.status), allow_nan=False)  # utilization is infinite with zero replicas: null
