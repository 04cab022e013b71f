"""Measurements for autoscaling: what each variant is asked for and what its replicas deliver.

`DemandTracker` keeps sliding windows of routed requests and finished ones; `snapshot` is a pure
function of the tracker and the endpoints' canonical loads, building the versioned contract of
`dgemma_common.demand`, so the autoscaler can call it in-process (`Gateway.demand_snapshot()`) or read it
as JSON (`GET /v1/dgemma/demand`). A variant's demand is
attributed (see attribution.py): what it is preferred for plus the overflow it takes in; what was
routed to it is reported alongside. Canvases are counted as the replies are expected to run them
(`routing.predict.expected_canvases`: E[min(allowed, reply length)] from the variant's finished replies), the
unit capacity is measured in: counting all that max_tokens allows would over-provision for replies that end early.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dgemma_common.demand import VERSION, Capacity, Delivered, Demand, DemandSnapshot, VariantView
from dgemma_gateway.attribution import Shape, attribute, demand_fields
from dgemma_gateway.routing import Pipeline
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant


@dataclass
class _Window:
    """Timestamped amounts within the last `window_s` seconds."""

    window_s: float
    items: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, now: float, amount: float) -> None:
        self.items.append((now, amount))
        self.trim(now)

    def remove(self, at: float, amount: float) -> None:
        """Take back one amount added at `at` (gone already if it left the window)."""
        with contextlib.suppress(ValueError):
            self.items.remove((at, amount))

    def trim(self, now: float) -> None:
        while self.items and self.items[0][0] < now - self.window_s:
            self.items.popleft()

    def rate(self, now: float) -> float:
        self.trim(now)
        return sum(a for _, a in self.items) / self.window_s


@dataclass
class VariantDemand:
    """Counters and windows of one variant."""

    window_s: float
    tokens: _Window = field(init=False)
    canvases: _Window = field(init=False)
    requests: _Window = field(init=False)
    delivered: _Window = field(init=False)
    delivered_canvases: _Window = field(init=False)
    met: _Window = field(init=False)
    missed: _Window = field(init=False)
    targets_met_total: int = 0
    targets_missed_total: int = 0
    requests_total: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "canvases", "requests", "delivered", "delivered_canvases", "met", "missed"):
            setattr(self, name, _Window(self.window_s))


@dataclass(frozen=True)
class Routed:
    """One routing of a request, kept so that a retry elsewhere can take it back (a request is demand once)."""

    variant: str
    at: float
    max_tokens: int
    canvases: float
    entry: tuple[float, str, Shape | None, int, float]


class DemandTracker:
    """Per-variant demand and delivery, fed by the gateway as requests are routed and finish."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.variants: dict[str, VariantDemand] = {}
        self.unroutable: dict[str, int] = {}  # per model: requests no endpoint could take
        # Routed requests in the window, for attribution: (time, variant, shape, max_tokens, canvases there).
        self.recent: deque[tuple[float, str, Shape | None, int, float]] = deque()

    def _v(self, variant: str) -> VariantDemand:
        if variant not in self.variants:
            self.variants[variant] = VariantDemand(self.window_s)
        return self.variants[variant]

    def routed(
        self, variant: str, now: float, max_tokens: int, canvases: float, request: RouteRequest | None = None
    ) -> Routed:
        """A request was sent to a replica of this variant; `request` lets its demand be attributed.

        `canvases`: the canvases it is expected to run there (`expected_canvases`), not all it may.
        """
        v = self._v(variant)
        v.requests_total += 1
        v.requests.add(now, 1)
        v.tokens.add(now, max_tokens)
        v.canvases.add(now, canvases)
        entry = (now, variant, None if request is None else Shape.of(request), max_tokens, canvases)
        self.recent.append(entry)
        self._trim(now)
        return Routed(variant, now, max_tokens, canvases, entry)

    def withdraw(self, routed: Routed) -> None:
        """Take back a routing: the request failed there before its first event and is retried elsewhere."""
        v = self._v(routed.variant)
        v.requests_total -= 1
        v.requests.remove(routed.at, 1)
        v.tokens.remove(routed.at, routed.max_tokens)
        v.canvases.remove(routed.at, routed.canvases)
        with contextlib.suppress(ValueError):
            self.recent.remove(routed.entry)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()

    def routed_in_window(self, now: float) -> list[tuple[str, Shape | None, int, float]]:
        """Routed requests of the last window: (variant, shape, max_tokens, canvases)."""
        self._trim(now)
        return [(variant, shape, tokens, canvases) for _, variant, shape, tokens, canvases in self.recent]

    def refused(self, model: str) -> None:
        """No endpoint could take a request for this model."""
        self.unroutable[model] = self.unroutable.get(model, 0) + 1

    def finished(self, variant: str, now: float, completion_tokens: int, met: bool | None, canvases: int = 0) -> None:
        """A request finished; `met` says whether its latency target was met (None: no target)."""
        v = self._v(variant)
        v.delivered.add(now, completion_tokens)
        v.delivered_canvases.add(now, canvases)
        if met is True:
            v.targets_met_total += 1
            v.met.add(now, 1)
        elif met is False:
            v.targets_missed_total += 1
            v.missed.add(now, 1)


def step_cost_s(load: EndpointLoad) -> float:
    """What one decoder step costs a replica: its busy time per step where it reports one, else the step's
    own latency (a vLLM or API endpoint, an older worker); 0.0 until it has measured either.

    The step's own latency leaves out the work between steps (commits, scheduling, streaming, waiting for the
    CPU): with the small trained model on 2 shared cores that was ~10-40 % of a replica's time, and capacity
    charged only the steps was that much too high.
    """
    return load.busy_step_s if load.busy_step_s > 0 else max(0.0, load.step_latency_s)


def replica_canvases_per_s(load: EndpointLoad, steps_per_canvas: float) -> float | None:
    """Canvases/s one replica finishes, from its own load report; None until it has measured a step.

    The interleaving engine gives its active requests one decoder step at a time, so a replica finishes
    one canvas per (expected steps x step cost + encoder pass), however many requests share it.
    """
    step_s = step_cost_s(load)
    if step_s <= 0:
        return None
    return 1.0 / (max(1.0, steps_per_canvas) * step_s + max(0.0, load.encoder_latency_s))


def measured_capacity(ready: Sequence[Candidate]) -> Capacity:
    """Capacity per ready replica (mean over those that measured), in canvases/s and tokens/s; None if none did.

    A canvas costs an encoder pass plus its steps, each at the replica's step cost (`step_cost_s`), and the
    steps the variant's traffic really takes per canvas (its requests' own caps and
    adaptive stopping); before any finished, the variant's cap times its learned share (1.0: every step).
    """
    rates: list[float] = []
    tokens: list[float] = []
    steps_seen: list[float] = []
    latencies: list[tuple[float, float, float]] = []  # (step, encoder pass, step cost)
    for c in ready:
        if c.load is None:
            continue
        steps = (c.steps_per_canvas if c.steps_per_canvas is not None
                 else c.variant.max_denoising_steps * min(1.0, max(0.0, c.step_fraction)))
        rate = replica_canvases_per_s(c.load, steps)
        if rate is None:
            continue
        rates.append(rate)
        tokens.append(rate * (c.load.canvas_length or c.variant.canvas_length))
        steps_seen.append(max(1.0, steps))
        latencies.append((c.load.step_latency_s, max(0.0, c.load.encoder_latency_s), step_cost_s(c.load)))
    if not rates:
        return Capacity(canvases_per_s_per_replica=None, tokens_per_s_per_replica=None, steps_per_canvas=None,
                        step_latency_s=None, encoder_latency_s=None, step_cost_s=None, replicas_measured=0)
    n = len(rates)
    return Capacity(canvases_per_s_per_replica=sum(rates) / n, tokens_per_s_per_replica=sum(tokens) / n,
                    steps_per_canvas=sum(steps_seen) / n, step_latency_s=sum(s for s, _, _ in latencies) / n,
                    encoder_latency_s=sum(e for _, e, _ in latencies) / n,
                    step_cost_s=sum(c for _, _, c in latencies) / n, replicas_measured=n)


def snapshot(
    tracker: DemandTracker, variants: Sequence[Variant], candidates: Sequence[Candidate], now: float,
    stale_after_s: float = 5.0, held: Mapping[str, tuple[int, float]] | None = None,
    pipeline: Pipeline | None = None, time_unix_s: float | None = None,
) -> DemandSnapshot:
    """The autoscaler's view: per variant, demand and what each ready replica delivers.

    `held`: per variant, (requests, canvases) the gateway holds while no replica is ready (scale from zero).
    `pipeline`: the profile attribution asks where a request should go (default: `latency-target`).
    `time_unix_s`: when, on the wall clock (default: `now`, for simulations).
    """
    preferred, overflow = attribute(tracker.routed_in_window(now), variants, candidates, now, tracker.window_s,
                                    pipeline)
    views: dict[str, VariantView] = {}
    for variant in sorted(variants, key=lambda v: v.name):
        mine = [c for c in candidates if c.variant.name == variant.name]
        ready = [
            c for c in mine
            if c.load is not None and c.load.ready and not c.load.draining and not c.ejected
            and now - c.load.observed_at <= stale_after_s
        ]
        waiting = sum(
            max(c.load.queue_depth if c.load else 0, c.inflight - (c.load.capacity if c.load else 0)) for c in mine
        )
        v = tracker.variants.get(variant.name) or VariantDemand(tracker.window_s)
        delivered = sum(c.load.tokens_per_s for c in ready if c.load is not None)
        requests_rate = v.requests.rate(now)
        canvases_per_request = v.canvases.rate(now) / requests_rate if requests_rate > 0 else 1.0
        held_requests, held_canvases = (held or {}).get(variant.name, (0, 0.0))
        views[variant.name] = VariantView(
            model=variant.model,
            gpu_profile=variant.gpu_profile,
            cost_weight=variant.cost_weight,
            latency_target_ms=variant.latency_target_ms,
            canvas_length=variant.canvas_length,
            tokens_per_s_prior=variant.tokens_per_s_prior,
            replicas=len(mine),
            replicas_ready=len(ready),
            demand=Demand(
                # Attributed: preferred here plus overflow taken in (what the autoscaler scales on).
                **demand_fields(preferred, overflow, variant.name),
                routed_requests_per_s=requests_rate,
                routed_tokens_per_s=v.tokens.rate(now),
                routed_canvases_per_s=v.canvases.rate(now),
                requests_waiting=waiting,
                canvases_waiting=waiting * canvases_per_request,
                requests_in_flight=sum(c.inflight for c in mine),
                targets_met=round(v.met.rate(now) * tracker.window_s),
                targets_missed=round(v.missed.rate(now) * tracker.window_s),
                requests_total=v.requests_total,
                targets_met_total=v.targets_met_total,
                targets_missed_total=v.targets_missed_total,
                requests_held=held_requests,
                canvases_held=float(held_canvases),
            ),
            delivered=Delivered(
                tokens_per_s=delivered,
                tokens_per_s_per_replica=delivered / len(ready) if ready else 0.0,
                completion_tokens_per_s=v.delivered.rate(now),
                canvases_per_s_per_replica=v.delivered_canvases.rate(now) / len(ready) if ready else 0.0,
            ),
            capacity=measured_capacity(ready),
            step_shares={str(cap): share for cap, share in (mine[0].step_shares if mine else ())},
            gateways=1,
        )
    return DemandSnapshot(version=VERSION, time_unix_s=now if time_unix_s is None else time_unix_s,
                          window_s=tracker.window_s, variants=views, unroutable=dict(tracker.unroutable))
