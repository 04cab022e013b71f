"""The autoscaler's inputs and outputs around `autoscaler.decide`: pure mappings, no I/O.

- `policy_from_spec`: a resource's `spec.autoscaling` (and min/max replicas) as an `AutoscalingPolicy`.
- `measurements_from_snapshot`: one variant of the gateway's demand snapshot (`dgemma_common.demand`, from
  `GET /v1/dgemma/demand` or `Gateway.demand_snapshot()` in-process) as `Measurements`. Held requests (scale
  from zero) count as waiting. Capacity is the workers' measured rate; until there is one, the GPU profile's
  prior.
- `state_from_status` / `memory_status`: the decision function's state, kept in `status.autoscaling.memory`
  so that a restarted operator (or the instance that takes over through peering) carries on.
- `decision_status`: the record written to `status.autoscaling.lastDecision`.
- `scaling_condition`: the ScalingActive condition: False, with the reason, while there are no valid
  measurements (the gateway unreachable, its snapshot of another version or missing a field); the replicas are
  then kept, never scaled on a zero that stands for a missing number.
- `plan`: one tick of the operator's autoscaler from what it fetched: replicas to set, status, condition, event.

The operator (`handlers.autoscale`) and `dgemma serve --autoscale` both use these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dgemma_common.demand import VariantView
from dgemma_operator import children, models
from dgemma_operator.autoscaler import (
    AutoscalingPolicy,
    Decision,
    Measurements,
    ScalerState,
    capacity_per_replica,
    decide,
)
from dgemma_operator.status import condition, with_conditions

Body = dict[str, Any]
SCALING_ACTIVE = "ScalingActive"


@dataclass(frozen=True)
class Problem:
    """Why there are no measurements of a variant: a condition reason and a message a human can act on."""

    reason: str  # GatewayUnreachable, InvalidDemandSnapshot, VariantUnknown
    message: str


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


def measurements_from_snapshot(
    view: VariantView, replicas: int, ready_replicas: int, prior_canvases_per_s: float, now: float
) -> Measurements:
    """One variant of the gateway's demand snapshot as the decision function's inputs."""
    d = view.demand
    return Measurements(
        now=now,
        replicas=replicas,
        ready_replicas=ready_replicas,
        demand_canvases_per_s=d.canvases_per_s,
        demand_tokens_per_s=d.tokens_per_s,
        waiting_requests=d.requests_waiting + d.requests_held,
        waiting_canvases=d.canvases_waiting + d.canvases_held,
        target_miss_ratio=d.target_miss_ratio,
        capacity_canvases_per_s=view.capacity.canvases_per_s_per_replica,
        prior_canvases_per_s=prior_canvases_per_s,
    )


def state_from_status(status: models.DiffusionGemmaStatus | None) -> ScalerState:
    """The state kept in status.autoscaling.memory; an empty state when there is none."""
    memory = status.autoscaling.memory if status is not None and status.autoscaling is not None else None
    if memory is None:
        return ScalerState()
    return ScalerState(
        recommendations=tuple((r.time, r.replicas) for r in memory.recommendations or ()),
        panic_until=-math.inf if memory.panic_until is None else memory.panic_until,
        last_demand_at=-math.inf if memory.last_demand_at is None else memory.last_demand_at,
        first_seen=memory.first_seen,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def memory_status(state: ScalerState) -> models.ScalerMemory:
    """The state as status.autoscaling.memory (JSON has no infinities: absent times are null, which a merge
    patch turns into removal)."""
    return models.ScalerMemory(
        recommendations=[models.Recommendation(time=t, replicas=r) for t, r in state.recommendations],
        panic_until=_finite(state.panic_until),
        last_demand_at=_finite(state.last_demand_at),
        first_seen=state.first_seen,
    )


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


def decision_status(desired: int, reason: str, inputs: Body, time: str) -> models.ScalingDecision:
    """status.autoscaling.lastDecision."""
    return models.ScalingDecision(desired_replicas=desired, reason=reason, inputs=inputs, time=time)


def measured_status(view: VariantView, time: str) -> models.Measured:
    """status.measured from the gateway's view of the variant."""
    return models.Measured(tokens_per_second=view.delivered.tokens_per_s,
                           tokens_per_second_per_replica=view.capacity.tokens_per_s_per_replica, time=time)


def scaling_condition(status: models.DiffusionGemmaStatus, problem: Problem | None, gateways: int,
                      generation: int | None, stamp: str) -> models.Condition:
    """ScalingActive (as the HPA names it): True while the autoscaler reads valid measurements; False with the
    reason it cannot (then it keeps the replicas as they are)."""
    previous = status.conditions or []
    if problem is not None:
        return condition(SCALING_ACTIVE, False, problem.reason, problem.message, generation, previous, stamp)
    message = f"demand read from {gateways} gateway{'s' if gateways != 1 else ''}"
    return condition(SCALING_ACTIVE, True, "ValidMeasurements", message, generation, previous, stamp)


def changed_conditions(status: models.DiffusionGemmaStatus, mine: models.Condition
                       ) -> list[models.Condition] | None:
    """The conditions with `mine` in place, or None when the status already says the same."""
    old = next((c for c in status.conditions or [] if c.type == mine.type), None)
    if old is not None and (old.status, old.reason, old.message) == (mine.status, mine.reason, mine.message):
        return None
    return with_conditions(status.conditions or [], mine)


@dataclass(frozen=True)
class Plan:
    """What one autoscaler tick does: the replicas to set (None: leave them), the status fields to write, the
    conditions to write when ScalingActive changed (None: unchanged), the event."""

    replicas: int | None
    status: models.DiffusionGemmaStatus
    conditions: list[models.Condition] | None
    event: tuple[str, str, str] | None  # (type "Normal"|"Warning", reason, message)
    state: ScalerState


def plan(
    spec: models.DiffusionGemmaSpec,
    status: models.DiffusionGemmaStatus | None,
    view: VariantView | None,
    problem: Problem | None,
    state: ScalerState,
    now: float,
    stamp: str,
    generation: int | None = None,
) -> Plan:
    """One decision from what was fetched: `view` is the gateway fleet's view of this resource, or None with a
    `problem` saying why there is none (then the replicas are kept, and the reason recorded)."""
    status = status or models.DiffusionGemmaStatus()
    current = spec.replicas
    last = status.autoscaling.last_decision if status.autoscaling is not None else None
    if view is None:
        problem = problem or Problem("NoMeasurements", "no measurements")
        reason = f"kept {current} replicas: {problem.message}"
        record = decision_status(current, reason, {"replicas": current}, stamp)
        event = None if last is not None and last.reason == reason else ("Warning", "NoMeasurements", reason)
        held = scaling_condition(status, problem, 0, generation, stamp)
        return Plan(None, models.DiffusionGemmaStatus(autoscaling=models.AutoscalingStatus(last_decision=record)),
                    changed_conditions(status, held), event, state)
    m = measurements_from_snapshot(view, current, status.ready_replicas or 0, prior_canvases_per_s(spec), now)
    decision, state = decide(policy_from_spec(spec), m, state)
    record = decision_status(decision.desired_replicas, decision.reason, inputs_record(m, decision), stamp)
    new_status = models.DiffusionGemmaStatus(
        autoscaling=models.AutoscalingStatus(last_decision=record, memory=memory_status(state)),
        measured=measured_status(view, stamp),
    )
    active = changed_conditions(status, scaling_condition(status, None, view.gateways, generation, stamp))
    if decision.desired_replicas == current:
        return Plan(None, new_status, active, None, state)
    verb = "ScaledUp" if decision.desired_replicas > current else "ScaledDown"
    message = (
        f"{current} -> {decision.desired_replicas} replicas: {decision.reason} "
        f"(demand {m.demand_canvases_per_s:.3g} canvases/s, waiting {m.waiting_requests}, capacity "
        f"{capacity_per_replica(m)[0]:.3g} canvases/s per replica, {decision.capacity_source})"
    )
    return Plan(decision.desired_replicas, new_status, active, ("Normal", verb, message), state)
