"""The scaling decision: desired replicas of one variant from measured demand and measured capacity.

Pure: inputs and the previous state in, a decision and the next state out. The operator calls it on a
timer for each `DiffusionGemma` with autoscaling on, `dgemma serve --autoscale` calls it for local worker
processes, and the simulation in `bench/` calls it on traces. No clock, no I/O.

The model of cost is the canvas: a replica finishes canvases at a measured rate, whatever their
length in useful tokens, so demand and capacity are compared in canvases per second. Tokens per second
are reported alongside for people.

Why it does not oscillate: demand is measured at the gateway, upstream of the replicas, so it does not
fall when replicas are added (unlike per-replica utilization, which halves after a scale-up and invites a
scale-down: the 2 <-> 1 flip seen in other autoscalers). A scale-down must also leave the remaining
replicas below the target utilization, and it is taken only as the highest recommendation over a long
window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class AutoscalingPolicy:
    """A variant's scaling settings (the resource's spec.autoscaling)."""

    min_replicas: int = 1
    max_replicas: int = 8
    target_utilization: float = 0.7  # of measured capacity, leaving headroom for bursts
    # Lowest recommendation over this window is used to scale up: a burst must last this long. Replicas of
    # a 50 GB model take minutes to start, so chasing a 15 s excursion costs a start-up and a flip; panic and
    # scale-from-zero do not wait. (Measured: 30 s removes the ramp trace's n <-> n+1 flip, docs/benchmarks.md.)
    scale_up_window_s: float = 30.0
    scale_down_window_s: float = 300.0  # highest recommendation over this window is used to scale down
    max_scale_up_step: int = 4  # replicas added per decision at most
    max_scale_down_step: int = 1  # replicas removed per decision at most
    tolerance: float = 0.1  # no change while needed/current capacity is within this ratio of 1 (up and down)
    panic_miss_ratio: float = 0.1  # share of requests missing their latency target that means panic
    panic_window_s: float = 60.0  # once in panic, no scale-down for this long
    backlog_drain_s: float = 30.0  # queued work should be gone within this time
    scale_to_zero_idle_s: float | None = None  # with min_replicas 0: idle this long -> 0 replicas


@dataclass(frozen=True)
class Measurements:
    """What the gateway and the workers measured for one variant, averaged over a recent window."""

    now: float
    replicas: int  # desired replicas right now (spec.replicas)
    ready_replicas: int
    demand_canvases_per_s: float  # canvases asked of this variant (routed, or preferred, to it), as replies run them
    demand_tokens_per_s: float
    waiting_requests: int  # held at the gateway or queued at workers
    waiting_canvases: float
    target_miss_ratio: float  # share of recent requests that missed their latency target
    capacity_canvases_per_s: float | None  # per replica, measured while meeting the target; None: not yet
    prior_canvases_per_s: float  # per replica, from the GPU profile: used until measured


@dataclass(frozen=True)
class Decision:
    """The outcome, recorded in the resource's status and as an Event."""

    desired_replicas: int
    reason: str
    recommendation: int  # before windows, steps and bounds
    utilization: float  # demand / current capacity
    panic: bool
    capacity_source: str  # "measured" | "prior"

    @property
    def changed(self) -> bool:
        return self.reason != "steady"


@dataclass(frozen=True)
class ScalerState:
    """What the decision function remembers between calls."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, recommended replicas)
    panic_until: float = -math.inf
    last_demand_at: float = -math.inf
    first_seen: float | None = None
    decisions: int = field(default=0, compare=False)


def capacity_per_replica(m: Measurements) -> tuple[float, str]:
    """Measured canvases/s per replica when known, else the GPU profile's prior."""
    if m.capacity_canvases_per_s is not None and m.capacity_canvases_per_s > 0:
        return m.capacity_canvases_per_s, "measured"
    return max(m.prior_canvases_per_s, 1e-9), "prior"


def needed_replicas(policy: AutoscalingPolicy, m: Measurements) -> float:
    """Replicas (fractional) that would carry the demand, plus the backlog, at the target utilization."""
    capacity, _ = capacity_per_replica(m)
    backlog_rate = m.waiting_canvases / policy.backlog_drain_s if policy.backlog_drain_s > 0 else 0.0
    return (m.demand_canvases_per_s + backlog_rate) / (capacity * policy.target_utilization)


def recommend(policy: AutoscalingPolicy, m: Measurements) -> int:
    """Replicas that would carry the demand, plus the backlog, at the target utilization."""
    return math.ceil(needed_replicas(policy, m) - 1e-9)


def decide(policy: AutoscalingPolicy, m: Measurements, state: ScalerState) -> tuple[Decision, ScalerState]:
    """Desired replicas now, and the state to pass next time."""
    capacity, source = capacity_per_replica(m)
    current = m.replicas
    utilization = m.demand_canvases_per_s / (capacity * max(current, 1)) if current else math.inf
    needed = needed_replicas(policy, m)
    raw = math.ceil(needed - 1e-9)
    busy = m.demand_canvases_per_s > 0 or m.waiting_requests > 0
    last_demand_at = m.now if busy else state.last_demand_at
    panic = m.target_miss_ratio >= policy.panic_miss_ratio and m.waiting_requests > 0
    panic_until = m.now + policy.panic_window_s if panic else state.panic_until
    if panic:
        # Targets are being missed with work waiting: the capacity estimate is too optimistic.
        raw = max(raw, current + max(1, math.ceil(current * 0.5)))
        needed = math.inf
    # The window keeps what would carry the demand with the tolerance's headroom on top: a scale-down must
    # leave the remaining replicas that far below the target, so noise around a boundary cannot flip n <-> n-1.
    kept = raw if panic else max(raw, math.ceil(needed * (1.0 + policy.tolerance) - 1e-9))
    span = max(policy.scale_up_window_s, policy.scale_down_window_s)
    history = _window((*state.recommendations, (m.now, kept)), m.now, span)
    first_seen = m.now if state.first_seen is None else state.first_seen
    # Until a whole down-window has been observed (a new variant, a restarted operator), the current size
    # counts as a recommendation, so a restart never triggers a scale-down on a single sample.
    floor = current if m.now - first_seen < policy.scale_down_window_s else 0
    desired, reason = _stabilize(policy, history, m.now, current, floor, panic_until, needed, raw, panic)
    desired, reason = _scale_to_zero(policy, desired, reason, m, busy, last_demand_at)
    desired, reason = _bound(policy, current, desired, reason)
    decision = Decision(desired, reason, raw, utilization, panic, source)
    next_state = replace(
        state,
        recommendations=history,
        panic_until=panic_until,
        last_demand_at=last_demand_at,
        first_seen=first_seen,
        decisions=state.decisions + 1,
    )
    return decision, next_state


def _window(history: tuple[tuple[float, int], ...], now: float, span: float) -> tuple[tuple[float, int], ...]:
    return tuple((t, r) for t, r in history if t >= now - span)


def _stabilize(
    policy: AutoscalingPolicy,
    history: tuple[tuple[float, int], ...],
    now: float,
    current: int,
    floor: int,
    panic_until: float,
    needed: float,
    raw: int,
    panic: bool,
) -> tuple[int, str]:
    """Fast up (lowest recommendation over the short window), slow down (highest over the long one).

    Up, to what carries the demand at the target, only when the demand exceeds the current replicas'
    capacity at the target by more than the tolerance; down only to what would carry every demand of the
    window with the tolerance's headroom. Demand measured over a window is noisy: without this band, an
    excursion just above a boundary adds a replica that the next scale-down removes (n <-> n+1 under
    constant load).
    """
    # Panic (targets missed now) and a variant at zero replicas (requests held) do not wait for the window.
    urgent = panic or current == 0
    up = raw if urgent else min(raw, *(r for t, r in history if t >= now - policy.scale_up_window_s))
    down = max([floor, *(r for t, r in history if t >= now - policy.scale_down_window_s)])
    if up > current and (current == 0 or needed > current * (1.0 + policy.tolerance)):
        return up, "scale up: demand exceeds capacity at the target utilization"
    if down < current:
        if now < panic_until:
            return current, "steady"  # no scale-down while targets were recently missed
        return down, "scale down: the remaining replicas carry the demand below the target utilization"
    return current, "steady"


def _scale_to_zero(
    policy: AutoscalingPolicy, desired: int, reason: str, m: Measurements, busy: bool, last_demand_at: float
) -> tuple[int, str]:
    """Zero replicas only when allowed and idle long enough; any waiting request brings one back."""
    if desired > 0:
        return desired, reason
    if busy:
        return 1, "scale from zero: requests are waiting"
    idle_s = policy.scale_to_zero_idle_s
    if policy.min_replicas == 0 and idle_s is not None and m.now - last_demand_at >= idle_s:
        return 0, f"scale to zero: no demand for {idle_s:g} s"
    return (1 if m.replicas > 0 else 0), reason


def _bound(policy: AutoscalingPolicy, current: int, desired: int, reason: str) -> tuple[int, str]:
    """Apply the per-decision steps and the min/max bounds (bounds win)."""
    target = _clamp(policy, desired)
    if desired > current:
        stepped = min(desired, current + policy.max_scale_up_step)
    else:
        stepped = max(desired, current - policy.max_scale_down_step)
    bounded = _clamp(policy, stepped)
    if bounded == current:
        return current, "steady"
    if bounded != target:
        # Say where it is heading, so "scale to zero" on a 2 -> 1 step does not read as a mistake.
        step = policy.max_scale_up_step if target > current else policy.max_scale_down_step
        reason = f"{reason} (towards {target}, {step} replica(s) per decision at most)"
    elif target != desired:
        reason = f"{reason} (bounded to [{policy.min_replicas}, {policy.max_replicas}])"
    return bounded, reason


def _clamp(policy: AutoscalingPolicy, replicas: int) -> int:
    return min(max(replicas, policy.min_replicas), policy.max_replicas)
