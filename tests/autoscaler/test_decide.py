"""The scaling decision as a pure function: table tests and multi-step runs."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from dgemma_operator.autoscaler import (
    AutoscalingPolicy,
    Decision,
    Measurements,
    ScalerState,
    decide,
    recommend,
)

# Fast up (no window) so that single decisions show the recommendation; the window has its own test.
POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=10, target_utilization=0.7, scale_up_window_s=0,
                           scale_down_window_s=300)


def measure(now: float = 0.0, replicas: int = 2, demand: float = 1.0, **kw: object) -> Measurements:
    base = Measurements(
        now=now,
        replicas=replicas,
        ready_replicas=replicas,
        demand_canvases_per_s=demand,
        demand_tokens_per_s=demand * 256,
        waiting_requests=0,
        waiting_canvases=0.0,
        target_miss_ratio=0.0,
        capacity_canvases_per_s=1.0,
        prior_canvases_per_s=4.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def once(m: Measurements, policy: AutoscalingPolicy = POLICY, state: ScalerState | None = None) -> Decision:
    return decide(policy, m, state or ScalerState())[0]


@pytest.mark.parametrize(
    ("replicas", "demand", "expected", "reason_start"),
    [
        (2, 1.0, 2, "steady"),  # 1.0 / (1.0 * 0.7) -> 2 replicas: what runs
        (2, 5.0, 6, "scale up"),  # wants 8, at most 4 more per decision
        (6, 5.0, 8, "scale up"),
        (8, 20.0, 10, "scale up"),  # bounded by max_replicas
        (3, 0.0, 3, "steady"),  # a scale-down waits for the down window
        (1, 0.0, 1, "steady"),  # never below min_replicas
    ],
)
def test_table_of_single_decisions(replicas: int, demand: float, expected: int, reason_start: str) -> None:
    d = once(measure(replicas=replicas, demand=demand))
    assert d.desired_replicas == expected
    assert d.reason.startswith(reason_start)


def test_recommendation_counts_the_backlog_to_drain() -> None:
    assert recommend(POLICY, measure(demand=0.7)) == 1
    # 60 waiting canvases to drain in 30 s: +2 canvases/s.
    assert recommend(POLICY, measure(demand=0.7, waiting_canvases=60.0, waiting_requests=5)) == 4


def test_the_profile_prior_is_used_until_capacity_is_measured() -> None:
    measured = once(measure(demand=4.0, capacity_canvases_per_s=1.0))
    prior = once(measure(demand=4.0, capacity_canvases_per_s=None))
    assert (measured.capacity_source, prior.capacity_source) == ("measured", "prior")
    assert prior.recommendation == 2  # 4.0 / (4.0 * 0.7)
    assert measured.recommendation == 6


def test_fast_up_slow_down() -> None:
    state = ScalerState()
    replicas = 2
    trace: list[int] = []
    for t in range(0, 1200, 15):
        demand = 5.0 if t < 300 else 1.0
        d, state = decide(POLICY, measure(now=t, replicas=replicas, demand=demand), state)
        replicas = d.desired_replicas
        trace.append(replicas)
    assert trace[1] == 8  # two decisions (30 s) to reach the 8 that 5 canvases/s need
    drop = 300 // 15
    assert trace[drop + 19] == 8  # still 8 just under 300 s after the drop (stabilization window)
    assert trace[-1] == 2  # then one replica at a time down to what 1 canvas/s needs
    downs = [b for a, b in itertools.pairwise(trace) if b < a]
    assert all(a - b <= 1 for a, b in itertools.pairwise(trace))  # max_scale_down_step
    assert len(downs) == 6


@pytest.mark.parametrize("demand", [0.69, 0.71, 1.39, 1.41, 2.1, 3.3])
def test_no_oscillation_under_constant_load(demand: float) -> None:
    """Replicas settle and stay: no 2 <-> 1 flipping at a utilization boundary."""
    state = ScalerState()
    replicas = 1
    trace = []
    for t in range(0, 3600, 15):
        d, state = decide(POLICY, measure(now=t, replicas=replicas, demand=demand), state)
        replicas = d.desired_replicas
        trace.append(replicas)
    changes = sum(1 for a, b in itertools.pairwise(trace) if a != b)
    assert changes <= 1
    # The settled fleet carries the load at the target, or within the tolerance of it (0.71 on one replica
    # is 101 % of the target: no change).
    assert trace[-1] * 1.0 * 0.7 * (1 + POLICY.tolerance) >= demand - 1e-9
    assert trace[-1] in (recommend(POLICY, measure(demand=demand)), recommend(POLICY, measure(demand=demand)) - 1)


def test_panic_scales_up_beyond_the_estimate_and_blocks_scale_down() -> None:
    panicking = measure(replicas=4, demand=1.0, target_miss_ratio=0.3, waiting_requests=6)
    d, state = decide(POLICY, panicking, ScalerState())
    assert d.panic and d.desired_replicas == 6  # +50 %: the capacity estimate was too optimistic
    calm = measure(now=400, replicas=6, demand=0.1)
    d2, _ = decide(POLICY, calm, replace(state, recommendations=()))
    assert d2.desired_replicas == 5  # panic window (60 s) is over by t=400
    d3, _ = decide(POLICY, replace(calm, now=30), replace(state, recommendations=()))
    assert d3.desired_replicas == 6 and d3.reason == "steady"


def test_scale_to_zero_after_the_idle_window_and_back_on_demand() -> None:
    policy = replace(POLICY, min_replicas=0, scale_to_zero_idle_s=120, scale_down_window_s=0)
    state = ScalerState()
    d, state = decide(policy, measure(now=0, replicas=1, demand=0.5), state)
    assert d.desired_replicas == 1
    d, state = decide(policy, measure(now=60, replicas=1, demand=0.0), state)
    assert d.desired_replicas == 1  # idle, but not for long enough
    d, state = decide(policy, measure(now=121, replicas=1, demand=0.0), state)
    assert (d.desired_replicas, d.reason) == (0, "scale to zero: no demand for 120 s")
    d, state = decide(policy, measure(now=130, replicas=0, demand=0.0), state)
    assert (d.desired_replicas, d.reason) == (0, "steady")
    d, state = decide(policy, measure(now=140, replicas=0, demand=0.0, waiting_requests=1), state)
    assert (d.desired_replicas, d.reason) == (1, "scale from zero: requests are waiting")


def test_without_scale_to_zero_an_idle_variant_keeps_one_replica() -> None:
    policy = replace(POLICY, min_replicas=0, scale_down_window_s=0)
    d = once(measure(now=10_000, replicas=1, demand=0.0), policy)
    assert d.desired_replicas == 1


def test_small_changes_within_tolerance_are_ignored() -> None:
    policy = replace(POLICY, scale_down_window_s=0, max_replicas=20)
    # 8.99 replicas needed: 9 would be loaded within the tolerance of the target, too close to the boundary
    assert once(measure(replicas=10, demand=6.3 - 0.01), policy).desired_replicas == 10
    assert once(measure(replicas=10, demand=5.5), policy).desired_replicas == 9  # 7.9 needed: one step down


@pytest.mark.parametrize("mean", [0.6, 0.63, 0.66, 0.7, 0.74])
def test_noisy_constant_load_near_a_boundary_does_not_flip(mean: float) -> None:
    """Demand measured over a window is noisy (+-15 % here): excursions across the 1 <-> 2 boundary must not
    add a replica that the next scale-down removes, again and again."""
    rng = random.Random(7)
    state = ScalerState()
    replicas = 1
    trace = []
    for t in range(0, 4 * 3600, 15):
        demand = mean * rng.uniform(0.85, 1.15)
        d, state = decide(POLICY, measure(now=t, replicas=replicas, demand=demand), state)
        replicas = d.desired_replicas
        trace.append(replicas)
    changes = sum(1 for a, b in itertools.pairwise(trace) if a != b)
    assert changes <= 1, trace


def test_a_step_limited_decision_says_where_it_is_heading() -> None:
    policy = replace(POLICY, min_replicas=0, scale_to_zero_idle_s=10, scale_down_window_s=0)
    state = ScalerState()
    _, state = decide(policy, measure(now=0, replicas=2, demand=0.5), state)
    d, _ = decide(policy, measure(now=20, replicas=2, demand=0.0), state)
    assert d.desired_replicas == 1
    assert d.reason == "scale to zero: no demand for 10 s (towards 0, 1 replica(s) per decision at most)"
    up = once(measure(replicas=2, demand=20.0))
    assert up.desired_replicas == 6 and "(towards 10, 4 replica(s) per decision at most)" in up.reason


def test_a_burst_shorter_than_the_scale_up_window_adds_nothing_a_lasting_one_does() -> None:
    policy = replace(POLICY, scale_up_window_s=30)
    state = ScalerState()
    trace = []
    for t, demand in [(0, 1.0), (10, 3.0), (20, 1.0), (30, 1.0), (40, 3.0), (50, 3.0), (60, 3.0), (70, 3.0)]:
        d, state = decide(policy, measure(now=t, replicas=trace[-1] if trace else 2, demand=demand), state)
        trace.append(d.desired_replicas)
    assert trace[:7] == [2] * 7  # the 10 s burst, and the lasting one until it has filled the window
    assert trace[7] == 5  # 3.0 canvases/s at every sample of the last 30 s (t=40..70) -> 5 replicas


def test_panic_and_scale_from_zero_do_not_wait_for_the_scale_up_window() -> None:
    policy = replace(POLICY, scale_up_window_s=300, min_replicas=0)
    _, state = decide(policy, measure(now=0, replicas=4, demand=1.0), ScalerState())
    d, _ = decide(policy, measure(now=10, replicas=4, demand=1.0, target_miss_ratio=0.5, waiting_requests=8), state)
    assert d.panic and d.desired_replicas == 6
    zero = once(measure(now=0, replicas=0, demand=0.2, waiting_requests=1), policy)
    assert zero.desired_replicas == 1
