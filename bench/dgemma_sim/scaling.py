"""Autoscaling on simulated traces: dgemma's decision function, an HPA-style rule and a fixed fleet.

Every controller sees the same thing the operator would: the gateway's demand snapshot, every
`control_interval_s`, from `sim.simulate`, where each arrival is routed by the gateway's real `route`.
Ours builds `Measurements` from the snapshot and calls the operator's own `decide` per variant; the
HPA-style rule scales each variant on its replicas' averaged slot utilization with Kubernetes' default
behaviour; the fixed fleet runs every variant at its maximum. Replicas take `startup_s` to load the
model, and are paid for from the moment they are scheduled until they have drained.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from dgemma_common.demand import VariantView
from dgemma_gateway.routing import Pipeline
from dgemma_operator.autoscale import measurements_from_snapshot
from dgemma_operator.autoscaler import AutoscalingPolicy, Decision, Measurements, ScalerState, decide
from dgemma_sim.routing import (
    ControlInput,
    Controller,
    SimRequest,
    SimResult,
    SimVariant,
    piecewise_trace,
    simulate,
    three_variants,
)


@dataclass(frozen=True)
class Phase:
    """A stretch of a trace whose arrival rate goes linearly from `start` to `end` requests/s."""

    duration_s: float
    start: float
    end: float | None = None  # None: constant

    @property
    def constant(self) -> bool:
        return self.end is None or self.end == self.start


@dataclass(frozen=True)
class TraceSpec:
    """A named load shape; the rate changes every `resolution_s` along linear phases."""

    name: str
    phases: tuple[Phase, ...]
    resolution_s: float = 30.0

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def segments(self) -> list[tuple[float, float]]:
        """Piecewise-constant (duration, rate) segments: each linear phase in `resolution_s` steps."""
        out = []
        for p in self.phases:
            if p.constant:
                out.append((p.duration_s, p.start))
                continue
            end = p.start if p.end is None else p.end
            n = max(1, math.ceil(p.duration_s / self.resolution_s))
            out.extend((p.duration_s / n, p.start + (end - p.start) * (i + 0.5) / n) for i in range(n))
        return out

    def constant_spans(self) -> list[tuple[float, float]]:
        """(start, end) times of the constant-load phases."""
        spans, t = [], 0.0
        for p in self.phases:
            if p.constant:
                spans.append((t, t + p.duration_s))
            t += p.duration_s
        return spans

    def requests(self, seed: int = 0) -> list[SimRequest]:
        """The arrivals (the request mix of `sim.poisson_trace`)."""
        return piecewise_trace(self.segments(), seed)


def step_trace(low: float, high: float, minutes: tuple[float, float, float] = (20, 40, 30)) -> TraceSpec:
    """Low, then a step up to high, then back down to low."""
    a, b, c = (m * 60 for m in minutes)
    return TraceSpec("step", (Phase(a, low), Phase(b, high), Phase(c, low)))


def ramp_trace(low: float, high: float, minutes: tuple[float, float, float, float, float] = (15, 40, 20, 20, 15)
               ) -> TraceSpec:
    """Low, a linear ramp up to high, a plateau, a ramp back down, low."""
    a, b, c, d, e = (m * 60 for m in minutes)
    return TraceSpec("ramp", (Phase(a, low), Phase(b, low, high), Phase(c, high), Phase(d, high, low), Phase(e, low)))


# Share of the daily peak by hour of day (0-23): a quiet night, a morning rise, a midday peak with a dip,
# an evening decline. The shape of interactive traffic in one region.
DAILY_SHAPE = (0.15, 0.1, 0.08, 0.08, 0.1, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0,
               0.9, 0.85, 0.95, 1.0, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.3, 0.2)


def daily_trace(peak: float, hours_per_day: float = 3.0) -> TraceSpec:
    """A day compressed into `hours_per_day`: linear between hourly rates of `DAILY_SHAPE` x peak."""
    hour_s = hours_per_day * 3600 / 24
    shape = (*DAILY_SHAPE, DAILY_SHAPE[0])
    phases = tuple(Phase(hour_s, peak * a, peak * b) for a, b in itertools.pairwise(shape))
    return TraceSpec("daily", phases, resolution_s=hour_s / 8)


def measurements(v: VariantView, now: float, replicas: int) -> Measurements:
    """The decision function's inputs from one variant of the demand snapshot, built as the operator builds
    them (`measurements_from_snapshot`); `replicas`: its spec."""
    prior = v.tokens_per_s_prior / v.canvas_length
    return measurements_from_snapshot(v, replicas, v.replicas_ready, prior, now)


@dataclass
class DgemmaController:
    """`decide` per variant on the snapshot, as the operator runs it; remembers spec.replicas and state."""

    policies: Mapping[str, AutoscalingPolicy]
    spec: dict[str, int]
    states: dict[str, ScalerState] = field(default_factory=dict)
    decisions: list[tuple[float, str, Decision]] = field(default_factory=list)
    # Which demand the decision reads: "canvases_per_s" (attributed) or "routed_canvases_per_s".
    demand_field: str = "canvases_per_s"

    def __call__(self, now: float, seen: ControlInput) -> dict[str, int]:
        for name, v in seen.snapshot.variants.items():
            if name not in self.policies:
                continue
            if self.demand_field != "canvases_per_s":
                d = v.demand
                v = v.model_copy(update={"demand": d.model_copy(update={
                    "canvases_per_s": getattr(d, self.demand_field),
                    "tokens_per_s": getattr(d, self.demand_field.replace("canvases", "tokens"))})})
            m = measurements(v, now, self.spec[name])
            decision, self.states[name] = decide(self.policies[name], m, self.states.get(name, ScalerState()))
            self.decisions.append((now, name, decision))
            self.spec[name] = decision.desired_replicas
        return dict(self.spec)


@dataclass(frozen=True)
class HpaBehavior:
    """Kubernetes HPA (autoscaling/v2) defaults: tolerance, scale-down stabilization, rate limits per 15 s."""

    target_utilization: float = 0.7
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0
    scale_up_stabilization_s: float = 0.0
    scale_up_percent: float = 100.0  # per period: max(+100 %, +4 pods)
    scale_up_pods: int = 4
    scale_down_percent: float = 100.0


@dataclass
class HpaController:
    """desired = ceil(ready x utilization / target) per variant, the HPA's way.

    Utilization is requests in the variant's ready replicas per slot, averaged since the last sync.
    Replicas still starting count as idle when the rule wants to scale up (so a scale-up is not repeated
    while the first one loads), as the HPA treats unready pods.
    """

    behavior: HpaBehavior
    bounds: Mapping[str, tuple[int, int]]
    spec: dict[str, int]
    history: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def __call__(self, now: float, seen: ControlInput) -> dict[str, int]:
        b = self.behavior
        for name, v in seen.snapshot.variants.items():
            if name not in self.bounds:
                continue
            current = self.spec[name]
            ready = v.replicas_ready
            utilization = seen.slot_utilization[name]
            recommendation = current
            if ready > 0:
                ratio = utilization / b.target_utilization
                pods = ready
                unready = max(0, current - ready)
                if ratio > 1.0 and unready:
                    ratio, pods = utilization * ready / (ready + unready) / b.target_utilization, ready + unready
                if abs(ratio - 1.0) > b.tolerance and not (ratio < 1.0 and pods > ready):
                    recommendation = math.ceil(ratio * pods - 1e-9)
            hist = [(t, r) for t, r in self.history.get(name, [])
                    if t > now - max(b.scale_down_stabilization_s, b.scale_up_stabilization_s)]
            hist.append((now, recommendation))
            self.history[name] = hist
            up = min(r for t, r in hist if t >= now - b.scale_up_stabilization_s)
            down = max(r for t, r in hist if t >= now - b.scale_down_stabilization_s)
            desired = max(current, up) if up > current else min(current, down)
            up_limit = max(math.ceil(current * (1 + b.scale_up_percent / 100)), current + b.scale_up_pods)
            down_limit = math.floor(current * (1 - b.scale_down_percent / 100))
            desired = min(max(desired, down_limit), up_limit)
            lo, hi = self.bounds[name]
            self.spec[name] = min(max(desired, lo), hi)
        return dict(self.spec)


@dataclass(frozen=True)
class Fleet:
    """The variants and each one's scaling policy (min and max replicas, targets)."""

    variants: tuple[SimVariant, ...]
    policies: Mapping[str, AutoscalingPolicy]

    def at(self, which: str) -> list[SimVariant]:
        """The variants starting at their minimum or maximum replicas (an external API, with no policy, as is)."""
        return [replace(sv, replicas=getattr(self.policies[sv.variant.name], f"{which}_replicas"))
                if sv.variant.name in self.policies else sv for sv in self.variants]


ControllerFactory = Callable[[Fleet], tuple[list[SimVariant], Controller | None]]


def ours(fleet: Fleet, demand_field: str = "canvases_per_s") -> tuple[list[SimVariant], Controller | None]:
    """dgemma's autoscaler, starting at the minimum."""
    start = fleet.at("min")
    return start, DgemmaController(fleet.policies, {sv.variant.name: sv.replicas for sv in start},
                                   demand_field=demand_field)


def hpa(fleet: Fleet, behavior: HpaBehavior | None = None) -> tuple[list[SimVariant], Controller | None]:
    """The HPA-style rule, starting at the minimum."""
    start = fleet.at("min")
    bounds = {n: (p.min_replicas, p.max_replicas) for n, p in fleet.policies.items()}
    return start, HpaController(behavior or HpaBehavior(), bounds, {sv.variant.name: sv.replicas for sv in start})


def fixed(fleet: Fleet) -> tuple[list[SimVariant], Controller | None]:
    """Every variant at its maximum, no scaling."""
    return fleet.at("max"), None


@dataclass(frozen=True)
class Report:
    """One controller on one trace."""

    trace: str
    controller: str
    requests: int
    attainment: float
    replica_hours: float
    cost: float  # replica-hours x cost weight, plus an external API's request-hours x its cost weight
    actions: int  # per variant, each change of desired replicas
    reversals: int  # direction changes of a variant's replicas within constant-load phases
    max_reversals: int  # the most of one variant in one phase: 1 is an overshoot that settles, 2+ a flip-flop
    by_variant: dict[str, float]  # replica-hours


def reversals(log: Sequence[tuple[float, Mapping[str, int]]], spans: Sequence[tuple[float, float]]) -> list[int]:
    """Per variant and span: direction changes (up then down, or down then up) of its replicas."""
    out = []
    names = sorted({n for _, r in log for n in r})
    for lo, hi in spans:
        for name in names:
            series = [r[name] for t, r in log if lo <= t < hi and name in r]
            deltas = [b - a for a, b in itertools.pairwise(series) if b != a]
            out.append(sum(1 for a, b in itertools.pairwise(deltas) if (a > 0) != (b > 0)))
    return out


def actions(log: Sequence[tuple[float, Mapping[str, int]]], start: Mapping[str, int]) -> int:
    """Changes of desired replicas, counted per variant."""
    prev, n = dict(start), 0
    for _, replicas in log:
        n += sum(1 for k, v in replicas.items() if prev.get(k) != v)
        prev.update(replicas)
    return n


def report(trace: TraceSpec, name: str, fleet: Fleet, result: SimResult, warmup_s: float = 0.0) -> Report:
    """Attainment, replica-hours, cost, scaling actions and reversals of one run, from `warmup_s` on."""
    scored = [o for o in result.outcomes if o.arrival_s >= warmup_s]
    weights = {sv.variant.name: sv.variant.cost_weight for sv in fleet.variants}
    hours = {k: v / 3600 for k, v in result.replica_seconds.items()}
    used = {k: v / 3600 for k, v in result.request_seconds.items()}  # external APIs: paid per request-hour
    log = [(t - warmup_s, r) for t, r in result.replicas_log if t >= warmup_s]
    start = next((r for t, r in reversed(result.replicas_log) if t < warmup_s), log[0][1] if log else {})
    flips = reversals(log, trace.constant_spans())
    return Report(
        trace=trace.name, controller=name, requests=len(scored),
        attainment=sum(o.met for o in scored) / len(scored) if scored else math.nan,
        replica_hours=sum(hours.values()),
        cost=sum(h * weights[k] for k, h in hours.items()) + sum(h * weights[k] for k, h in used.items()),
        actions=actions(log, start), reversals=sum(flips), max_reversals=max(flips, default=0),
        by_variant={**hours, **used})


def run(
    pipeline: Pipeline, fleet: Fleet, trace: TraceSpec, controllers: Mapping[str, ControllerFactory],
    seed: int = 0, control_interval_s: float = 15.0, warmup_s: float = 0.0,
) -> list[tuple[Report, SimResult]]:
    """Every controller on the same arrivals.

    `warmup_s`: the trace is preceded by this long at its first rate, not scored, so that each controller
    starts from its own steady state rather than from its minimum.
    """
    spec = trace
    if warmup_s > 0:
        spec = replace(trace, phases=(Phase(warmup_s, trace.phases[0].start), *trace.phases))
    requests = spec.requests(seed)
    out = []
    for name, factory in controllers.items():
        start, controller = factory(fleet)
        result = simulate(pipeline, start, requests, seed=seed, controller=controller,
                          control_interval_s=control_interval_s, count_from_s=warmup_s)
        if controller is None:  # still log the (constant) fleet, for plots
            result.replicas_log[:] = [(t, {sv.variant.name: sv.replicas for sv in start})
                                      for t in (0.0, warmup_s, result.duration_s)]
        out.append((report(trace, name, fleet, result, warmup_s), result))
    return out


def default_fleet(startup_s: float = 90.0) -> Fleet:
    """`sim.three_variants` (H100, RTX PRO 6000, DGX Spark priors), autoscaled between 1 and a maximum
    about 1.2x what the benchmark's peak needs, each replica taking `startup_s` to load the model."""
    maxes = {"h100": 3, "rtx-pro": 8, "spark": 16}
    variants = tuple(replace(sv, startup_s=startup_s) for sv in three_variants())
    return Fleet(variants, {n: AutoscalingPolicy(min_replicas=1, max_replicas=m) for n, m in maxes.items()})
