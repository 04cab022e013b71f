"""Learning how many steps canvases take (adaptive stopping) from finished requests, per step cap."""

from __future__ import annotations

import pytest

from dgemma_gateway.demand import measured_capacity
from dgemma_gateway.endpoints import EndpointSpec, Registry, StepsTaken
from dgemma_gateway.routing.predict import expected_canvases, expected_steps, predict, reply_survival
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant

V = Variant("local", "m", max_denoising_steps=48, canvas_length=32)


def load(step_s: float = 0.01) -> EndpointLoad:
    return EndpointLoad(0, 0, 4, 8, step_s, 0.0, 0.0, 32, "m", True, False, 0.0)


async def learned(*finished: tuple[int, int, int]) -> Candidate:
    """The registry's candidate after requests finished with (decoder passes, canvases, step cap)."""
    registry = Registry()
    registry.apply("static", [EndpointSpec("local/0", "127.0.0.1:1", V)])
    try:
        for passes, canvases, cap in finished:
            registry.record_success("local/0", "local", StepsTaken.of(passes, canvases, cap))
        (candidate,) = registry.candidates()
        return candidate
    finally:
        await registry.close()


async def test_a_canvas_that_stops_early_at_the_default_cap_is_learned_as_a_share_of_it() -> None:
    c = await learned(*[(24, 2, 48)] * 30)  # 12 of 48 steps per canvas
    assert c.step_fraction == pytest.approx(0.25)
    assert expected_steps(c, 48) == pytest.approx(12)


async def test_requests_with_a_small_cap_do_not_drag_the_default_caps_share_up() -> None:
    # Adaptive stopping converges after ~12 steps whatever the cap: at cap 8 every step runs (share 1.0),
    # at cap 48 a quarter of them. A single share mixed across caps would predict neither.
    c = await learned(*[(24, 2, 48), (16, 2, 8)] * 30)
    assert expected_steps(c, 48) == pytest.approx(12, rel=0.01)
    assert expected_steps(c, 8) == pytest.approx(8)
    assert c.step_fraction == pytest.approx(0.25, rel=0.01)  # what capacity and attribution read


async def test_an_unseen_cap_borrows_the_nearest_learned_share_and_nothing_learned_means_every_step() -> None:
    c = await learned(*[(24, 2, 48), (16, 2, 8)] * 30)
    assert expected_steps(c, 40) == pytest.approx(40 * 0.25, rel=0.01)
    assert expected_steps(c, 4) == pytest.approx(4)
    fresh = await learned()
    assert expected_steps(fresh, 48) == 48 and fresh.step_shares == ()


async def test_the_prediction_reads_the_share_of_the_requests_own_cap() -> None:
    c = await learned(*[(24, 2, 48), (16, 2, 8)] * 30)
    c = Candidate(c.endpoint_id, c.variant, load(0.01), step_fraction=c.step_fraction, step_shares=c.step_shares)
    default = predict(c, RouteRequest("m", 64))  # two canvases at the variant's 48-step cap
    small = predict(c, RouteRequest("m", 64, max_denoising_steps=8))
    assert default.steps_per_canvas == pytest.approx(12, rel=0.01) and small.steps_per_canvas == 8
    assert default.total_s == pytest.approx(2 * 12 * 0.01 + 2 * 0.01, rel=0.01)  # no encoder measured: a step


def test_a_request_without_canvases_teaches_nothing() -> None:
    assert StepsTaken.of(0, 0, 48) is None and StepsTaken.of(10, 1, 0) is None


async def test_capacity_charges_a_canvas_what_the_traffic_really_took_whatever_its_caps() -> None:
    # Half the canvases at the default cap (12 of 48 steps), half at cap 8 (all 8): 10 steps per canvas on
    # average, not the default cap's 12. Capacity in canvases/s follows the traffic, not one cap.
    c = await learned(*[(24, 2, 48), (16, 2, 8)] * 30)
    assert c.steps_per_canvas == pytest.approx(10)
    ready = Candidate(c.endpoint_id, c.variant, load(0.01), step_fraction=c.step_fraction,
                      step_shares=c.step_shares, steps_per_canvas=c.steps_per_canvas)
    assert measured_capacity([ready]).canvases_per_s_per_replica == pytest.approx(1 / (10 * 0.01), rel=0.05)
    assert (await learned()).steps_per_canvas is None  # nothing finished: the cap's share (1.0) decides


async def test_capacity_counts_the_traffic_of_the_last_window_of_requests_alike_not_the_latest_most() -> None:
    # 50 requests at the default cap (all 48 steps), then 5 at cap 8. Capacity is about the traffic, so each
    # request of the window counts alike: 44.4 steps per canvas. A moving average over ~9 requests said 21.
    c = await learned(*[(48, 1, 48)] * 50, *[(8, 1, 8)] * 5)
    assert c.steps_per_canvas == pytest.approx((50 * 48 + 5 * 8) / 55)
    # The window is the registry's reply window (256 requests): older requests leave it.
    c = await learned(*[(48, 1, 48)] * 300, *[(16, 2, 8)] * 256)
    assert c.steps_per_canvas == pytest.approx(8)


def test_reply_lengths_censored_by_the_budget_do_not_make_long_replies_look_short() -> None:
    # Replies that end by themselves after 1 or 2 canvases, and requests cut at 1 canvas by their budget.
    replies = [(1, True)] * 4 + [(2, True)] * 4 + [(1, False)] * 4
    survival = reply_survival(replies)
    # All 12 need a first canvas; 4 of them end there, the 4 cut there say nothing more (a third of what is
    # known ended at 1), and every reply known to reach a second canvas ended in it.
    assert survival == pytest.approx((1.0, 2 / 3, 0.0))
    assert expected_canvases(survival, 1) == 1 and expected_canvases(survival, 3) == pytest.approx(5 / 3)
    # Counting the cut requests as replies of one canvas would have said 2/3 end at 1 instead of 1/3.
    assert expected_canvases((), 3) == 3  # nothing seen: every canvas it may take


async def test_the_gateway_predicts_replies_that_end_early_from_the_ones_it_saw() -> None:
    registry = Registry()
    registry.apply("static", [EndpointSpec("local/0", "127.0.0.1:1", V)])
    try:
        for _ in range(10):
            registry.record_reply("local", 1, True)  # every reply so far ended in its first canvas
        (c,) = registry.candidates()
    finally:
        await registry.close()
    c = Candidate(c.endpoint_id, V, load(0.01), reply_survival=c.reply_survival)
    p = predict(c, RouteRequest("m", 96, max_denoising_steps=8))
    assert p.canvases == 3 and p.expected_canvases == 1
    assert p.total_s == pytest.approx(1 * (0.01 + 8 * 0.01))
