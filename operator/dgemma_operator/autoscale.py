"""The autoscaler's inputs and outputs around `autoscaler.decide`: pure mappings, no I/O.

- `policy_from_spec`: a resource's `spec.autoscaling` (and min/max replicas) as an `AutoscalingPolicy`.
- `measurements_from_snapshot`: one variant of the gateway's demand snapshot (`GET /v1/dgemma/demand`,
  or `Gateway.demand_snapshot()` in-process) as `Measurements`. Held requests (scale from zero) count as
  waiting. Capacity is the workers' measured rate; until there is one, the GPU profile's prior.
- `state_from_status` / `memory_status`: the decision function's state, kept in `status.autoscaling.memory`
  so that a restarted operator (or the instance that takes over through peering) carries on.
- `decision_status`: the record written to `status.autoscaling.lastDecision`.
- `plan`: one tick of the operator's autoscaler from what it fetched: replicas to set, status, event.

The operator (`handlers.autoscale`) and `dgemma serve --autoscale` both use these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dgemma_operator import children, models
from dgemma_operator.autoscaler import (
    AutoscalingPolicy,
    Decision,
    Measurements,
    ScalerState,
    capacity_per_replica,
    decide,
)

Body = dict[str, Any]


def policy_from_spec(spec: models.DiffusionGemmaSpec) -> AutoscalingPolicy:
    """The resource's scaling settings."""
    a = spec.autoscaling
    return AutoscalingPolicy(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        target_utilization=a.target_utilization,
        scale_up_window_s=float(a.scale_up_stabilization_seconds),
        scale_down_window_s=float(a.scale_down_stabilization_seconds),
        max_scale_up_step=a.max_scale_up_step,
        max_scale_down_step=a.max_scale_down_step,
        scale_to_zero_idle_s=float(a.scale_to_zero_idle_seconds) if a.scale_to_zero else None,
        # After missed targets, no scale-down for a while; never longer than the scale-down window itself.
        panic_window_s=min(60.0, float(a.scale_down_stabilization_seconds)),
    )


def prior_canvases_per_s(spec: models.DiffusionGemmaSpec) -> float:
    """Canvases/s per replica that the GPU profile's tokens/s prior implies."""
    return children.tokens_per_second_prior(spec) / spec.generation.canvas_length


def _number(value: Any, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def measurements_from_snapshot(
    variant: Mapping[str, Any], replicas: int, ready_replicas: int, prior_canvases_per_s: float, now: float
) -> Measurements:
    """One variant of the gateway's demand snapshot as the decision function's inputs."""
    demand = variant.get("demand") or {}
    capacity = (variant.get("capacity") or {}).get("canvases_per_s_per_replica")
    canvas = _number(variant.get("canvas_length"), 256.0) or 256.0
    canvases_per_s = _number(demand.get("canvases_per_s"))
    return Measurements(
        now=now,
        replicas=replicas,
        ready_replicas=ready_replicas,
        demand_canvases_per_s=canvases_per_s,
        demand_tokens_per_s=_number(demand.get("tokens_per_s"), canvases_per_s * canvas),
        waiting_requests=int(_number(demand.get("requests_waiting")) + _number(demand.get("requests_held"))),
        waiting_canvases=_number(demand.get("canvases_waiting")) + _number(demand.get("canvases_held")),
        target_miss_ratio=_number(demand.get("target_miss_ratio")),
        capacity_canvases_per_s=None if capacity is None else _number(capacity) or None,
        prior_canvases_per_s=prior_canvases_per_s,
    )


def state_from_status(status: Mapping[str, Any] | None) -> ScalerState:
    """The state kept in status.autoscaling.memory; an empty state when there is none."""
    memory = ((status or {}).get("autoscaling") or {}).get("memory") or {}
    recs = tuple(
        (float(r["time"]), int(r["replicas"]))
        for r in memory.get("recommendations") or []
        if isinstance(r, Mapping) and "time" in r and "replicas" in r
    )
    panic_until, last_demand_at = memory.get("panicUntil"), memory.get("lastDemandAt")
    first_seen = memory.get("firstSeen")
    return ScalerState(
        recommendations=recs,
        panic_until=-math.inf if panic_until is None else float(panic_until),
        last_demand_at=-math.inf if last_demand_at is None else float(last_demand_at),
        first_seen=None if first_seen is None else float(first_seen),
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def memory_status(state: ScalerState) -> Body:
    """The state as status.autoscaling.memory (JSON has no infinities: absent times are null)."""
    return {
        "recommendations": [{"time": t, "replicas": r} for t, r in state.recommendations],
        "panicUntil": _finite(state.panic_until),
        "lastDemandAt": _finite(state.last_demand_at),
        "firstSeen": state.first_seen,
    }


def inputs_record(m: Measurements, decision: Decision | None = None) -> Body:
    """The measured inputs (and the decision's derived numbers), JSON-safe, for status and events."""
    record: Body = {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(m).items() if k != "now"}
    if decision is not None:
        record.update(
            recommendation=decision.recommendation,
            utilization=_finite(decision.utilization),
            panic=decision.panic,
            capacitySource=decision.capacity_source,
        )
    return record


def decision_status(desired: int, reason: str, inputs: Body, time: str) -> Body:
    """status.autoscaling.lastDecision."""
    return {"desiredReplicas": desired, "reason": reason, "inputs": inputs, "time": time}


def measured_status(variant: Mapping[str, Any], time: str) -> Body:
    """status.measured from the gateway's view of the variant."""
    delivered = variant.get("delivered") or {}
    capacity = (variant.get("capacity") or {}).get("tokens_per_s_per_replica")
    return {
        "tokensPerSecond": _number(delivered.get("tokens_per_s")),
        "tokensPerSecondPerReplica": None if capacity is None else _number(capacity),
        "time": time,
    }


@dataclass(frozen=True)
class Plan:
    """What one autoscaler tick does: the replicas to set (None: leave them), the status to write, the event."""

    replicas: int | None
    status: Body
    event: tuple[str, str, str] | None  # (type "Normal"|"Warning", reason, message)
    state: ScalerState


def plan(
    spec: models.DiffusionGemmaSpec,
    status: Mapping[str, Any] | None,
    variant: Mapping[str, Any] | None,
    problem: str | None,
    state: ScalerState,
    now: float,
    stamp: str,
) -> Plan:
    """One decision from what was fetched: `variant` is the gateway's view of this resource, or None with a
    `problem` saying why there is none (then the replicas are kept and the reason recorded)."""
    status = status or {}
    current = spec.replicas
    previous = ((status.get("autoscaling") or {}).get("lastDecision") or {}).get("reason")
    if variant is None:
        reason = f"kept {current} replicas: {problem or 'no measurements'}"
        record = decision_status(current, reason, {"replicas": current}, stamp)
        event = None if previous == reason else ("Warning", "NoMeasurements", reason)
        return Plan(None, {"autoscaling": {"lastDecision": record}}, event, state)
    m = measurements_from_snapshot(
        variant, current, int(status.get("readyReplicas") or 0), prior_canvases_per_s(spec), now
    )
    decision, state = decide(policy_from_spec(spec), m, state)
    record = decision_status(decision.desired_replicas, decision.reason, inputs_record(m, decision), stamp)
    new_status: Body = {
        "autoscaling": {"lastDecision": record, "memory": memory_status(state)},
        "measured": measured_status(variant, stamp),
    }
    if decision.desired_replicas == current:
        return Plan(None, new_status, None, state)
    verb = "ScaledUp" if decision.desired_replicas > current else "ScaledDown"
    message = (
        f"{current} -> {decision.desired_replicas} replicas: {decision.reason} "
        f"(demand {m.demand_canvases_per_s:.3g} canvases/s, waiting {m.waiting_requests}, capacity "
        f"{capacity_per_replica(m)[0]:.3g} canvases/s per replica, {decision.capacity_source})"
    )
    return Plan(decision.desired_replicas, new_status, ("Normal", verb, message), state)
