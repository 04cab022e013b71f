"""`dgemma serve --autoscale`: the operator's decision function scaling local worker processes.

Each tick reads the gateway's demand snapshot in-process, maps it to `Measurements` with the same
function the operator uses, calls `decide`, and starts `dgemma worker` processes (free ports) or retires
idle ones with SIGTERM, newest first (they drain, then exit); a busy worker is not retired until it is idle.
`LocalSource` reports the bound, live workers to the gateway, and the variant itself even when it has none
(scale from zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from dgemma_gateway.core import Gateway
from dgemma_gateway.endpoints import Sink
from dgemma_gateway.types import Variant
from dgemma_operator.autoscale import measurements_from_snapshot
from dgemma_operator.autoscaler import AutoscalingPolicy, Decision, ScalerState, decide
from dgemma_serve.workers import LocalWorker, LocalWorkers

log = logging.getLogger(__name__)


def retirable(live: list[LocalWorker], count: int, busy: Callable[[LocalWorker], bool]) -> list[LocalWorker]:
    """Up to `count` workers to retire: idle ones only, the newest first."""
    return [w for w in sorted(live, key=lambda w: -w.index) if not busy(w)][:count]


class LocalSource:
    """The local workers as endpoints of one variant; `report()` after every change."""

    def __init__(self, workers: LocalWorkers, variant: Variant, name: str = "local") -> None:
        self.name = name
        self.workers = workers
        self.variant = variant
        self._sink: Sink | None = None

    async def run(self, sink: Sink) -> None:
        """Report now, then wait to be cancelled (reports come from `report`)."""
        self._sink = sink
        self.report()
        await asyncio.Event().wait()

    def report(self) -> None:
        """Tell the gateway which workers exist now."""
        if self._sink is not None:
            self._sink(self.name, self.workers.endpoints(self.variant), [self.variant])


@dataclass(frozen=True)
class LocalScalingSettings:
    """How often to decide, and the policy (short windows suit a laptop)."""

    policy: AutoscalingPolicy
    interval_s: float = 2.0
    prior_canvases_per_s: float = 2.0


class LocalAutoscaler:
    """Runs `decide` on a timer over the gateway's demand for the local variant; starts and retires workers."""

    def __init__(self, gateway: Gateway, workers: LocalWorkers, source: LocalSource, settings: LocalScalingSettings,
                 clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> None:
        self.gateway = gateway
        self.workers = workers
        self.source = source
        self.settings = settings
        self.clock = clock
        self.say = say
        self.state = ScalerState()
        self.decisions: list[Decision] = []

    @property
    def live(self) -> list[LocalWorker]:
        """Workers that count as replicas: started and not retiring."""
        return [w for w in self.workers.workers if not w.stopping]

    def housekeeping(self) -> None:
        """Notice workers that bound their port or exited, and tell the gateway."""
        changed = bool(self.workers.reap())
        for w in self.workers.workers:
            if w.port is None and self.workers.poll_bound(w):
                changed = True
        if changed:
            self.source.report()

    def tick(self) -> Decision | None:
        """One decision, acted upon; None (the workers kept) while the gateway does not know the variant yet."""
        self.housekeeping()
        view = self.gateway.demand_snapshot().variants.get(self.source.variant.name)
        if view is None:
            return None
        current = len(self.live)
        m = measurements_from_snapshot(view, current, self.gateway.ready_count(self.source.variant.model),
                                       self.settings.prior_canvases_per_s, self.clock())
        decision, self.state = decide(self.settings.policy, m, self.state)
        self.decisions.append(decision)
        target = current
        if decision.desired_replicas > current:
            for _ in range(decision.desired_replicas - current):
                self.workers.spawn()
            target = decision.desired_replicas
        elif decision.desired_replicas < current:
            # Only idle workers are retired: a busy one would cut its streams at the end of its drain grace.
            # The decision stands, so the next ticks retire the others as they go idle.
            retired = retirable(self.live, current - decision.desired_replicas, self._busy)
            for w in retired:
                self.workers.retire(w)
            target = current - len(retired)
        if target != current:
            self.say(f"dgemma serve: {current} -> {target} workers: {decision.reason} "
                     f"(demand {m.demand_canvases_per_s:.2f} canvases/s, waiting {m.waiting_requests}, "
                     f"capacity {decision.capacity_source})")
            self.source.report()
        return decision

    def _busy(self, w: LocalWorker) -> bool:
        """The gateway has requests in flight there, or the worker's last report shows work."""
        state = self.gateway.registry.endpoints.get(f"{self.source.variant.name}/{w.address}")
        if state is None:
            return False
        return state.inflight > 0 or (state.load is not None and state.load.active + state.load.queue_depth > 0)

    async def run(self) -> None:
        """Decide every interval; between decisions, notice new and exited workers quickly."""
        next_at = self.clock()
        while True:
            if self.clock() >= next_at:
                try:
                    self.tick()
                except Exception:
                    log.exception("autoscaling decision failed; trying again next interval")
                next_at = self.clock() + self.settings.interval_s
            else:
                self.housekeeping()
            await asyncio.sleep(min(0.2, self.settings.interval_s))
