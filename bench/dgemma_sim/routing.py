"""A trace-driven simulation of routing (and, through a controller hook, scaling) across variants.

The simulated workers behave like the dgemma engine: up to `capacity` requests share the worker by
interleaving their denoising steps (processor sharing), more wait in a FIFO queue, beyond that the
worker refuses. A request's work is canvases x (encoder + steps x step latency), with steps per canvas
drawn per request (adaptive stopping) and step times noisy, so predictions are never exact.

Routing uses the gateway's real code: each arrival builds the same `Candidate`s the gateway builds
(load reports refreshed every `report_interval_s`, the gateway's exact in-flight counts) and calls
`dgemma_gateway.routing.route_with_overflow` with a real profile. An external API (a variant with runtime
`external`, `shared=False`) serves each request at its own speed up to its concurrency limit; its load is what
the gateway would measure of its own requests there (`dgemma_gateway.measured_load`). The autoscaler reuses
this module: pass a `controller` that is called every `control_interval_s` with the demand snapshot and
returns replicas per variant. A replica it adds is paid for at once but takes `startup_s` (loading the model) before it
reports ready; one it removes drains its work first. `dgemma_sim.scaling` builds the controllers and traces.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dgemma_common.demand import DemandSnapshot
from dgemma_gateway.demand import DemandTracker, snapshot
from dgemma_gateway.measured_load import MeasuredLatency
from dgemma_gateway.routing import Pipeline, route_with_overflow
from dgemma_gateway.routing.predict import canvases_for
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant


@dataclass(frozen=True)
class SimVariant:
    """A variant's simulated hardware: measured step latency, slots, replicas."""

    variant: Variant
    replicas: int
    step_s: float  # mean decoder step latency of one request
    encoder_s: float  # mean encoder pass per canvas
    capacity: int = 4
    max_queue: int = 8
    noise: float = 0.15  # step times vary by +-noise (uniform)
    startup_s: float = 0.0  # from scheduling a replica until it reports ready (the model loading)
    shared: bool = True  # False: each request runs at full speed (an external API), up to `capacity` at once
    request_overhead_s: float = 0.0  # once per request (vLLM's time to first canvas beyond one canvas's work)


@dataclass(frozen=True)
class SimRequest:
    """One request of a trace."""

    arrival_s: float
    max_tokens: int
    latency_target_ms: float | None
    steps_per_canvas: int  # how many steps this request's canvases really take (adaptive stopping)
    max_denoising_steps: int = 48


@dataclass
class _Job:
    req: SimRequest
    seq: int
    variant: str
    work_s: float
    remaining_s: float
    target_s: float
    started: float
    concurrency: int = 1  # requests at its endpoint when it arrived, itself included


@dataclass
class _Worker:
    endpoint_id: str
    sv: SimVariant
    active: list[_Job] = field(default_factory=list)
    queue: deque[_Job] = field(default_factory=deque)
    last_t: float = 0.0
    report: EndpointLoad | None = None
    retired: bool = False
    ready_at: float = 0.0
    measured: MeasuredLatency | None = None  # an external API's load, as the gateway measures it

    def advance(self, t: float) -> None:
        n = len(self.active)
        if n:
            share = (t - self.last_t) / (n if self.sv.shared else 1)
            for j in self.active:
                j.remaining_s -= share
        self.last_t = t

    def next_completion(self) -> float:
        if not self.active:
            return math.inf
        return self.last_t + min(j.remaining_s for j in self.active) * (len(self.active) if self.sv.shared else 1)

    @property
    def in_system(self) -> int:
        return len(self.active) + len(self.queue)


@dataclass(frozen=True)
class Outcome:
    """What happened to one request."""

    seq: int
    variant: str | None  # None: refused
    latency_s: float | None
    target_s: float
    met: bool
    cost: float  # work seconds x the variant's cost weight
    arrival_s: float = 0.0


@dataclass
class SimResult:
    """Per-request outcomes and a summary."""

    outcomes: list[Outcome]
    duration_s: float
    replicas_log: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # after each control
    replica_seconds: dict[str, float] = field(default_factory=dict)  # per variant, starting and draining too
    request_seconds: dict[str, float] = field(default_factory=dict)  # per external variant: paid per use

    def summary(self) -> dict[str, Any]:
        """Attainment, cost and latency percentiles."""
        n = len(self.outcomes)
        done = sorted(o.latency_s for o in self.outcomes if o.latency_s is not None)
        by_variant: dict[str, int] = {}
        for o in self.outcomes:
            by_variant[o.variant or "refused"] = by_variant.get(o.variant or "refused", 0) + 1

        def pct(p: float) -> float:
            return done[min(len(done) - 1, int(p * len(done)))] if done else math.nan

        return {
            "requests": n,
            "attainment": sum(o.met for o in self.outcomes) / n if n else math.nan,
            "cost_per_request": sum(o.cost for o in self.outcomes) / n if n else math.nan,
            "refused": by_variant.get("refused", 0) / n if n else 0.0,
            "p50_s": pct(0.5),
            "p99_s": pct(0.99),
            "by_variant": by_variant,
        }


TOKENS_MIX: tuple[tuple[int, float], ...] = ((256, 0.6), (512, 0.3), (1024, 0.1))
TARGETS_MIX: tuple[tuple[float | None, float], ...] = ((1500.0, 0.5), (4000.0, 0.35), (15000.0, 0.15))


def poisson_trace(
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    tokens_mix: Sequence[tuple[int, float]] = TOKENS_MIX,
    targets_mix: Sequence[tuple[float | None, float]] = TARGETS_MIX,
    steps_range: tuple[int, int] = (12, 20),
) -> list[SimRequest]:
    """Poisson arrivals with a mix of lengths and latency targets."""
    return piecewise_trace([(duration_s, rate_per_s)], seed, tokens_mix, targets_mix, steps_range)


def piecewise_trace(
    segments: Sequence[tuple[float, float]],
    seed: int = 0,
    tokens_mix: Sequence[tuple[int, float]] = TOKENS_MIX,
    targets_mix: Sequence[tuple[float | None, float]] = TARGETS_MIX,
    steps_range: tuple[int, int] = (12, 20),
) -> list[SimRequest]:
    """Poisson arrivals whose rate is constant within each `(duration_s, rate_per_s)` segment, in order.

    An arrival drawn past a segment's end is dropped and drawing restarts at the boundary with the next
    rate (exact, as the exponential has no memory).
    """
    rng = random.Random(seed)
    out: list[SimRequest] = []
    t = 0.0
    start = 0.0
    for duration_s, rate_per_s in segments:
        end = start + duration_s
        while rate_per_s > 0:
            t += rng.expovariate(rate_per_s)
            if t >= end:
                break
            tokens = rng.choices([m for m, _ in tokens_mix], [w for _, w in tokens_mix])[0]
            target = rng.choices([m for m, _ in targets_mix], [w for _, w in targets_mix])[0]
            out.append(SimRequest(t, tokens, target, rng.randint(*steps_range)))
        t = start = end
    return out


@dataclass(frozen=True)
class ControlInput:
    """What a controller sees at a control tick: the gateway's demand snapshot, and per variant what the
    simulated fleet measured besides: requests in ready replicas per slot, averaged since the last control
    (what a utilization rule such as the HPA's reads)."""

    snapshot: DemandSnapshot
    slot_utilization: Mapping[str, float]


Controller = Callable[[float, ControlInput], Mapping[str, int]]


def simulate(
    pipeline: Pipeline,
    variants: Sequence[SimVariant],
    trace: Sequence[SimRequest],
    *,
    report_interval_s: float = 0.5,
    step_fraction: float | None = None,
    seed: int = 0,
    controller: Controller | None = None,
    control_interval_s: float = 15.0,
    model: str = "m",
    count_from_s: float = 0.0,
) -> SimResult:
    """Run the trace through the pipeline; every decision is the gateway's `route`.

    `count_from_s`: replica-seconds are counted from this time on (a warm-up before it is not scored).
    """
    rng = random.Random(seed)
    workers: list[_Worker] = []
    counters = {sv.variant.name: 0 for sv in variants}
    by_name = {sv.variant.name: sv for sv in variants}

    def add(sv: SimVariant, t: float, startup_s: float) -> None:
        counters[sv.variant.name] += 1
        workers.append(_Worker(f"{sv.variant.name}/{counters[sv.variant.name]}", sv, last_t=t,
                               ready_at=t + startup_s, measured=None if sv.shared else MeasuredLatency()))

    for sv in variants:
        for _ in range(sv.replicas):
            add(sv, 0.0, 0.0)
    if step_fraction is None:
        step_fraction = (sum(r.steps_per_canvas / r.max_denoising_steps for r in trace) / len(trace)) if trace else 1.0
    tracker = DemandTracker(window_s=60.0)
    outcomes: list[Outcome] = []
    replicas_log: list[tuple[float, dict[str, int]]] = []
    replica_s = {name: 0.0 for name, sv in by_name.items() if sv.shared}
    request_s = {name: 0.0 for name, sv in by_name.items() if not sv.shared}
    # Since the last control: seconds of ready replicas and of requests in them, for utilization rules.
    ready_s = {name: 0.0 for name in by_name}
    busy_s = {name: 0.0 for name in by_name}
    clock = 0.0
    next_report = 0.0
    next_control = control_interval_s
    arrivals = deque(sorted(trace, key=lambda r: r.arrival_s))
    seq = 0
    end_t = trace[-1].arrival_s if trace else 0.0

    def refresh_reports(t: float) -> None:
        for w in workers:
            if w.measured is not None:
                w.report = w.measured.load(w.sv.variant, w.in_system, w.sv.capacity, 0, t)
                continue
            w.report = EndpointLoad(
                queue_depth=len(w.queue), active=len(w.active), capacity=w.sv.capacity, max_queue=w.sv.max_queue,
                # A per-request overhead shows up in measured timings; charged per canvas here (conservative).
                step_latency_s=w.sv.step_s, encoder_latency_s=w.sv.encoder_s + w.sv.request_overhead_s,
                tokens_per_s=0.0,
                canvas_length=w.sv.variant.canvas_length, model_name=w.sv.variant.model,
                ready=not w.retired and t >= w.ready_at, draining=w.retired, observed_at=t)

    def candidates() -> list[Candidate]:
        # The gateway learns a variant's steps per canvas from its workers' stats; an external API reports none.
        return [Candidate(w.endpoint_id, w.sv.variant, w.report, inflight=w.in_system,
                          step_fraction=step_fraction if w.sv.shared else 1.0)
                for w in workers if not w.retired]

    def finish(w: _Worker, job: _Job, t: float) -> None:
        latency = t - job.req.arrival_s
        met = latency <= job.target_s
        if w.measured is not None:
            canvases = canvases_for(job.req.max_tokens, w.sv.variant.canvas_length)
            w.measured.observe(latency, canvases, job.req.max_tokens, job.concurrency)
            w.report = w.measured.load(w.sv.variant, w.in_system, w.sv.capacity, 0, t)
        outcomes.append(Outcome(job.seq, job.variant, latency, job.target_s, met,
                                job.work_s * w.sv.variant.cost_weight, job.req.arrival_s))
        tracker.finished(job.variant, t, job.req.max_tokens, met,
                         canvases_for(job.req.max_tokens, w.sv.variant.canvas_length))

    while arrivals or any(w.active or w.queue for w in workers):
        t_arrival = arrivals[0].arrival_s if arrivals else math.inf
        t_done = min((w.next_completion() for w in workers), default=math.inf)
        t_next = min(t_arrival, t_done, next_report if arrivals else math.inf,
                     next_control if controller and arrivals else math.inf)
        dt = max(0.0, min(t_next, end_t) - clock)
        counted = max(0.0, min(t_next, end_t) - max(clock, count_from_s))
        for w in workers:
            if not w.sv.shared:  # paid per request-second, not per replica
                request_s[w.sv.variant.name] += counted * len(w.active)
            elif dt > 0:
                replica_s[w.sv.variant.name] += counted
            w.advance(t_next)
            if dt > 0 and not w.retired and t_next >= w.ready_at:
                ready_s[w.sv.variant.name] += dt
                busy_s[w.sv.variant.name] += dt * w.in_system
        clock = max(clock, min(t_next, end_t))
        if t_next == t_done:
            for w in workers:
                done = [j for j in w.active if j.remaining_s <= 1e-9]
                for j in done:
                    w.active.remove(j)
                    finish(w, j, t_next)
                while w.queue and len(w.active) < w.sv.capacity:
                    w.active.append(w.queue.popleft())
            workers[:] = [w for w in workers if not (w.retired and not w.active and not w.queue)]
            continue
        if t_next == next_report:
            refresh_reports(t_next)
            next_report += report_interval_s
            continue
        if controller is not None and t_next == next_control:
            snap = snapshot(tracker, [sv.variant for sv in variants], candidates(), t_next, pipeline=pipeline)
            wanted = controller(t_next, ControlInput(snap, _slot_utilization(snap, workers, ready_s, busy_s)))
            for name, n in wanted.items():
                live = [w for w in workers if w.sv.variant.name == name and not w.retired]
                for _ in range(n - len(live)):
                    add(by_name[name], t_next, by_name[name].startup_s)
                for w in live[n:] if n < len(live) else []:
                    w.retired = True  # the newest first: replicas still starting go before serving ones
            workers[:] = [w for w in workers if not (w.retired and not w.active and not w.queue)]
            ready_s = dict.fromkeys(ready_s, 0.0)
            busy_s = dict.fromkeys(busy_s, 0.0)
            replicas_log.append((t_next, {sv.variant.name: sum(1 for w in workers if w.sv is sv and not w.retired)
                                          for sv in variants}))
            next_control += control_interval_s
            continue
        req = arrivals.popleft()
        rr = RouteRequest(model, req.max_tokens, req.max_denoising_steps, req.latency_target_ms, seq=seq)
        decision = route_with_overflow(pipeline, rr, candidates(), t_next, [sv.variant for sv in variants])
        target_s = (req.latency_target_ms or 0) / 1000.0
        if decision.endpoint is None:
            outcomes.append(Outcome(seq, None, None, target_s, False, 0.0, req.arrival_s))
            tracker.refused(model)
        else:
            w = next(w for w in workers if w.endpoint_id == decision.endpoint.endpoint_id)
            sv = w.sv
            canvases = canvases_for(req.max_tokens, sv.variant.canvas_length)
            work = sv.request_overhead_s + sum(
                sv.encoder_s + sum(sv.step_s * rng.uniform(1 - sv.noise, 1 + sv.noise)
                                   for _ in range(req.steps_per_canvas))
                for _ in range(canvases))
            job = _Job(req, seq, sv.variant.name, work, work,
                       decision.target_s if decision.target_s is not None else target_s, t_next, w.in_system + 1)
            tracker.routed(sv.variant.name, t_next, req.max_tokens, canvases, request=rr)
            (w.active if len(w.active) < sv.capacity else w.queue).append(job)
        seq += 1
    return SimResult(outcomes, end_t, replicas_log, replica_s, request_s)


def _slot_utilization(
    snap: DemandSnapshot, workers: Sequence[_Worker], ready_s: Mapping[str, float], busy_s: Mapping[str, float],
) -> dict[str, float]:
    """Per variant: requests in ready replicas per slot, averaged since the last control."""
    out: dict[str, float] = {}
    for name in snap.variants:
        slots = max((w.sv.capacity for w in workers if w.sv.variant.name == name), default=1)
        out[name] = busy_s[name] / (slots * ready_s[name]) if ready_s[name] > 0 else 0.0
    return out


def three_variants(scale: int = 1) -> list[SimVariant]:
    """H100, RTX PRO 6000 and DGX Spark with the GPU-profile priors (canvas 256, ~16 steps a canvas).

    Step latency follows from the profile's tokens/s prior: 256 / (tokens/s x 16 steps). Cost weights
    are relative hourly prices of one replica.
    """

    def v(name: str, profile: str, tps: float, cost: float, replicas: int) -> SimVariant:
        step = 256 / (tps * 16)
        return SimVariant(Variant(name, "m", profile, cost_weight=cost, latency_target_ms=4000, canvas_length=256,
                                  max_denoising_steps=48, tokens_per_s_prior=tps),
                          replicas * scale, step_s=step, encoder_s=step)

    return [v("h100", "h100", 1100.0, 2.5, 2), v("rtx-pro", "rtx-pro-6000", 700.0, 1.5, 2),
            v("spark", "dgx-spark", 150.0, 0.3, 4)]


def run_sweep(
    pipelines: Mapping[str, Pipeline],
    variants: Sequence[SimVariant],
    rates: Sequence[float],
    duration_s: float = 300.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every pipeline at every arrival rate on the same traces."""
    rows = []
    for rate in rates:
        trace = poisson_trace(rate, duration_s, seed=seed)
        for name, pipeline in pipelines.items():
            s = simulate(pipeline, variants, trace, seed=seed).summary()
            rows.append({"policy": name, "rate_per_s": rate, **s})
    return rows

