"""Measured capacity per replica: a pure function of the workers' own load reports."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dgemma_gateway.demand import DemandTracker, measured_capacity, replica_canvases_per_s, snapshot
from dgemma_gateway.types import Candidate, EndpointLoad, Variant

NOW = 100.0
V = Variant("h100", "m", "h100", canvas_length=256, max_denoising_steps=48, tokens_per_s_prior=1100.0)


def load(step_s: float, encoder_s: float = 0.0, active: int = 0, canvas: int = 256) -> EndpointLoad:
    return EndpointLoad(0, active, 4, 8, step_s, encoder_s, 0.0, canvas, "m", True, False, NOW)


def test_one_replica_finishes_a_canvas_per_expected_steps_times_step_latency_plus_the_encoder() -> None:
    assert replica_canvases_per_s(load(0.01, encoder_s=0.02), 16) == pytest.approx(1 / (16 * 0.01 + 0.02))


def test_a_step_costs_the_replica_its_busy_time_per_step_where_the_worker_reports_one() -> None:
    # The worker spends 4 ms per step outside the step itself (commits, scheduling, streaming): a canvas of
    # 16 steps costs 16 x 14 ms, not 16 x 10 ms.
    busy = replace(load(0.01, encoder_s=0.02), busy_step_s=0.014)
    assert replica_canvases_per_s(busy, 16) == pytest.approx(1 / (16 * 0.014 + 0.02))
    cap = measured_capacity([Candidate("a", V, busy, steps_per_canvas=16.0)])
    assert (cap.step_latency_s, cap.step_cost_s) == (0.01, 0.014)
    assert cap.canvases_per_s_per_replica == pytest.approx(1 / (16 * 0.014 + 0.02))
    # An endpoint that reports no busy time (vLLM, an API, an older worker): the step latency stands in.
    assert measured_capacity([Candidate("a", V, load(0.01), steps_per_canvas=16.0)]).step_cost_s == 0.01


def test_the_rate_does_not_depend_on_how_many_requests_share_the_replica() -> None:
    assert replica_canvases_per_s(load(0.01, active=4), 16) == replica_canvases_per_s(load(0.01, active=1), 16)


def test_no_capacity_until_a_step_was_measured() -> None:
    assert replica_canvases_per_s(load(0.0), 16) is None
    assert measured_capacity([Candidate("a", V, load(0.0))]).canvases_per_s_per_replica is None


def test_capacity_uses_the_learned_share_of_steps_and_averages_over_measured_replicas() -> None:
    # step_fraction 0.25 of 48 steps: 12 steps per canvas.
    ready = [Candidate("a", V, load(0.01), step_fraction=0.25), Candidate("b", V, load(0.03), step_fraction=0.25),
             Candidate("c", V, load(0.0), step_fraction=0.25)]
    cap = measured_capacity(ready)
    expected = (1 / 0.12 + 1 / 0.36) / 2
    assert cap.canvases_per_s_per_replica == pytest.approx(expected)
    assert cap.tokens_per_s_per_replica == pytest.approx(expected * 256)
    assert (cap.steps_per_canvas, cap.replicas_measured) == (12.0, 2)


def test_the_snapshot_carries_capacity_and_requests_held_for_a_replica() -> None:
    idle = Variant("spark", "m", "dgx-spark", scale_from_zero=True)
    snap = snapshot(DemandTracker(10.0), [V, idle], [Candidate("a", V, load(0.01, canvas=128))], NOW,
                    held={"spark": (3, 6.0)})
    spark = snap.variants["spark"]
    assert snap.variants["h100"].capacity.tokens_per_s_per_replica == pytest.approx(128 / 0.48)
    assert spark.capacity.canvases_per_s_per_replica is None
    assert (spark.demand.requests_held, spark.replicas, spark.demand.canvases_held) == (3, 0, 6.0)
