"""Demand attribution: a request's demand belongs to the cheapest variant that meets its target."""

from __future__ import annotations

import pytest

from dgemma_gateway.attribution import Shape, attribute, idle_candidates, preferred
from dgemma_gateway.demand import DemandTracker, snapshot
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant

NOW = 1000.0
# Per 256-token canvas of 16 steps plus an encoder pass: spark 1.81 s, rtx 0.39 s, h100 0.25 s (measured).
SPARK = Variant("spark", "m", "dgx-spark", cost_weight=0.3, latency_target_ms=4000, tokens_per_s_prior=150.0)
RTX = Variant("rtx", "m", "rtx-pro-6000", cost_weight=1.5, latency_target_ms=4000, tokens_per_s_prior=700.0)
H100 = Variant("h100", "m", "h100", cost_weight=2.5, latency_target_ms=4000, tokens_per_s_prior=1100.0)
VARIANTS = [SPARK, RTX, H100]
STEP = {"spark": 256 / (150 * 16), "rtx": 256 / (700 * 16), "h100": 256 / (1100 * 16)}


def busy(variant: Variant, n: int, active: int = 4) -> Candidate:
    """A replica with all its slots taken: routing would not send a tight-target request there now."""
    step = STEP[variant.name]
    load = EndpointLoad(0, active, 4, 8, step, step, 0.0, 256, "m", True, False, NOW)
    return Candidate(f"{variant.name}/{n}", variant, load, inflight=active, step_fraction=16 / 48)


FLEET = [busy(SPARK, 0), busy(RTX, 0), busy(H100, 0)]


@pytest.mark.parametrize(
    ("max_tokens", "target_ms", "expected"),
    [
        (256, 15000.0, "spark"),  # everything fits the slow cheap variant
        (1024, 15000.0, "spark"),  # 4 canvases x 1.81 s = 7.3 s < 0.9 x 15 s
        (256, 4000.0, "spark"),  # 1.81 s < 3.6 s
        (512, 4000.0, "rtx"),  # 3.63 s on spark misses 0.9 x 4 s
        (256, 1500.0, "rtx"),  # 0.39 s, cheaper per request than the H100's 0.25 s
        (1024, 1500.0, "h100"),  # 1.55 s on rtx misses 1.35 s; 0.99 s on the H100
        (1024, 500.0, "h100"),  # nothing meets it: the fastest
        (256, None, "spark"),  # no target: each variant's default (4 s)
    ],
)
def test_the_preferred_variant_is_the_cheapest_meeting_the_target_with_an_idle_replica(
    max_tokens: int, target_ms: float | None, expected: str
) -> None:
    idle = idle_candidates(VARIANTS, FLEET, NOW)  # all busy now: the preference ignores that
    choice = preferred(Shape("m", max_tokens, 48, target_ms), idle, NOW)
    assert choice is not None and choice.variant == expected
    assert choice.canvases == max(1, -(-max_tokens // 256))


def test_a_variant_without_replicas_is_preferred_on_its_prior_and_measurements_beat_priors() -> None:
    idle = idle_candidates(VARIANTS, [busy(RTX, 0), busy(H100, 0)], NOW)  # no spark replica at all
    by_name = {c.variant.name: c for c in idle}
    assert by_name["spark"].load is not None and by_name["spark"].load.step_latency_s == 0.0  # the prior
    assert by_name["rtx"].load is not None and by_name["rtx"].load.step_latency_s == pytest.approx(STEP["rtx"])
    assert all(c.load is not None and c.load.active == 0 and c.inflight == 0 for c in idle)
    choice = preferred(Shape("m", 256, 48, 4000.0), idle, NOW)
    assert choice is not None and choice.variant == "spark"
    # A variant measured much slower than its prior loses the request it would have won on paper.
    slow_load = EndpointLoad(0, 4, 4, 8, STEP["spark"] * 2, STEP["spark"] * 2, 0.0, 256, "m", True, False, NOW)
    slow = Candidate("spark/0", SPARK, slow_load, inflight=4, step_fraction=16 / 48)
    choice = preferred(Shape("m", 256, 48, 4000.0), idle_candidates(VARIANTS, [slow, *FLEET[1:]], NOW), NOW)
    assert choice is not None and choice.variant == "rtx"


def test_overflow_counts_where_it_was_preferred_and_where_it_landed() -> None:
    shape = Shape("m", 256, 48, 4000.0)  # preferred: spark
    routed = [("spark", shape, 256, 1)] * 3 + [("rtx", shape, 256, 1)] * 2 + [("rtx", None, 256, 1)]
    pref, overflow = attribute(routed, VARIANTS, FLEET, NOW, window_s=1.0)
    assert pref["spark"].canvases == 5  # all five that spark should serve
    assert pref["rtx"].canvases == 1  # the one without a target stays where it was routed
    assert overflow["rtx"].canvases == 2 and overflow["spark"].canvases == 0


def test_snapshot_scales_on_attributed_demand_and_keeps_the_routed_one() -> None:
    tracker = DemandTracker(window_s=10.0)
    for i in range(10):  # 4 s targets of one canvas, routed to the rtx because the spark was full
        tracker.routed("rtx", NOW - 5 + i * 0.5, 256, 1, request=RouteRequest("m", 256, 48, 4000.0))
    tracker.routed("rtx", NOW - 1, 256, 1)  # a caller that does not pass the request: stays routed
    snap = snapshot(tracker, VARIANTS, FLEET, NOW)
    spark, rtx = snap.variants["spark"].demand, snap.variants["rtx"].demand
    assert spark.canvases_per_s == pytest.approx(1.0) and spark.routed_canvases_per_s == 0.0
    assert spark.tokens_per_s == pytest.approx(256.0) and spark.preferred_canvases_per_s == pytest.approx(1.0)
    assert rtx.routed_canvases_per_s == pytest.approx(1.1)
    assert rtx.preferred_canvases_per_s == pytest.approx(0.1)
    assert rtx.overflow_in_canvases_per_s == pytest.approx(1.0)
    assert rtx.canvases_per_s == pytest.approx(1.1)  # what it is preferred for plus the overflow it carries


def test_attributed_demand_counts_the_canvases_replies_run_even_on_a_variant_with_no_replica() -> None:
    # Replies of this model end in their first canvas half the time and in their second the rest: a request
    # allowed four canvases (max_tokens 1024) is expected to run 1.5. The spark, scaled to zero, has no
    # candidate to carry what was learned; the model's other variants do.
    survival = (1.0, 0.5, 0.0)
    fleet = [Candidate(c.endpoint_id, c.variant, c.load, inflight=c.inflight, step_fraction=c.step_fraction,
                       reply_survival=survival) for c in FLEET if c.variant is not SPARK]
    routed = [("rtx", Shape("m", 1024, 48, 15000.0), 1024, 1.5)]
    pref, _ = attribute(routed, VARIANTS, fleet, NOW, window_s=1.0)
    assert pref["spark"].canvases == pytest.approx(1.5) and pref["spark"].tokens == 1024
    unlearned, _ = attribute(routed, VARIANTS, [busy(RTX, 0), busy(H100, 0)], NOW, window_s=1.0)
    assert unlearned["spark"].canvases == 4  # nothing learned: every canvas max_tokens allows
