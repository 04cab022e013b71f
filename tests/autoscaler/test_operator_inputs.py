"""The operator's autoscaler inputs and outputs: spec -> policy, gateway snapshot -> measurements, one tick."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dgemma_operator import models
from dgemma_operator.autoscale import (
    measurements_from_snapshot,
    memory_status,
    plan,
    policy_from_spec,
    prior_canvases_per_s,
    state_from_status,
)
from dgemma_operator.autoscaler import ScalerState

NOW = 1_800_000_000.0


def spec(**fields: Any) -> models.DiffusionGemmaSpec:
    base: dict[str, Any] = {"servedModelName": "m", "model": {"pvc": {"claimName": "c"}}, "image": "i",
                            "gpu": {"profile": "h100"}, "generation": {"canvasLength": 256}}
    return models.DiffusionGemmaSpec.model_validate({**base, **fields})


def variant(canvases_per_s: float = 0.0, capacity: float | None = 2.0, waiting: int = 0, held: int = 0,
            canvases_held: float = 0.0) -> dict[str, Any]:
    return {"canvas_length": 256,
            "demand": {"canvases_per_s": canvases_per_s, "tokens_per_s": canvases_per_s * 256,
                       "requests_waiting": waiting, "canvases_waiting": float(waiting), "target_miss_ratio": 0.0,
                       "requests_held": held, "canvases_held": canvases_held},
            "delivered": {"tokens_per_s": 300.0},
            "capacity": {"canvases_per_s_per_replica": capacity,
                         "tokens_per_s_per_replica": None if capacity is None else capacity * 256}}


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
    m = measurements_from_snapshot(variant(1.5, capacity=None, waiting=2, held=3, canvases_held=3.0), 2, 1,
                                   prior_canvases_per_s(spec()), NOW)
    assert (m.replicas, m.ready_replicas, m.demand_canvases_per_s) == (2, 1, 1.5)
    assert (m.waiting_requests, m.waiting_canvases) == (5, 5.0)
    assert m.capacity_canvases_per_s is None and m.prior_canvases_per_s == pytest.approx(1100 / 256)


def test_the_state_survives_a_round_trip_through_the_status() -> None:
    state = ScalerState(recommendations=((NOW - 5, 2), (NOW, 3)), panic_until=NOW + 60, first_seen=NOW - 100)
    stored = json.loads(json.dumps(memory_status(state)))  # JSON-safe: no infinities
    assert stored["lastDemandAt"] is None
    back = state_from_status({"autoscaling": {"memory": stored}})
    assert back == state
    assert state_from_status(None) == ScalerState() and math.isinf(state_from_status({}).panic_until)


def test_a_tick_without_measurements_keeps_the_replicas_and_says_why_once() -> None:
    s = spec(replicas=2, autoscaling={"enabled": True})
    step = plan(s, {}, None, "the gateway is unreachable", ScalerState(), NOW, "t")
    assert step.replicas is None and step.event is not None and step.event[:2] == ("Warning", "NoMeasurements")
    assert step.status["autoscaling"]["lastDecision"]["reason"] == "kept 2 replicas: the gateway is unreachable"
    again = plan(s, step.status, None, "the gateway is unreachable", ScalerState(), NOW + 1, "t")
    assert again.event is None  # the same problem is not reported again and again


def test_a_tick_scales_up_through_the_decision_and_records_its_inputs() -> None:
    s = spec(replicas=1, autoscaling={"enabled": True, "targetUtilization": 0.5})
    step = plan(s, {"readyReplicas": 1}, variant(1.6, capacity=2.0), None, ScalerState(), NOW, "t")
    assert step.replicas == 2 and step.event is not None and step.event[1] == "ScaledUp"
    record = step.status["autoscaling"]["lastDecision"]
    assert record["desiredReplicas"] == 2 and record["reason"].startswith("scale up")
    assert record["inputs"]["demand_canvases_per_s"] == 1.6 and record["inputs"]["capacitySource"] == "measured"
    assert step.status["measured"]["tokensPerSecondPerReplica"] == 512.0
    json.dumps(step.status, allow_nan=False)


def test_scale_from_zero_on_held_requests() -> None:
    s = spec(replicas=0, minReplicas=0, autoscaling={"enabled": True, "scaleToZero": True})
    step = plan(s, {}, variant(0.0, capacity=None, held=1, canvases_held=1.0), None, ScalerState(), NOW, "t")
    assert step.replicas == 1
    json.dumps(step.status, allow_nan=False)  # utilization is infinite with zero replicas: stored as null
