"""Routing decisions as pure functions: predictions, filters, scorers, pickers and whole profiles."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from dgemma_gateway.demand import DemandTracker, snapshot
from dgemma_gateway.endpoints import Ejection, EndpointSpec, EndpointState, Work
from dgemma_gateway.routing import ProfileError, load_profile, load_profile_file, route
from dgemma_gateway.routing.predict import canvases_for, predict, prior_step_latency_s
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant

NOW = 1000.0
CHEAP = Variant("spark", "m", "dgx-spark", cost_weight=0.3, latency_target_ms=4000, canvas_length=256)
MID = Variant("rtx", "m", "rtx-pro-6000", cost_weight=1.5, latency_target_ms=4000, canvas_length=256)
FAST = Variant("h100", "m", "h100", cost_weight=4.0, latency_target_ms=4000, canvas_length=256)


def load(step_s: float = 0.01, active: int = 0, queue: int = 0, capacity: int = 4, max_queue: int = 8,
         ready: bool = True, draining: bool = False, age_s: float = 0.0, encoder_s: float = 0.0) -> EndpointLoad:
    return EndpointLoad(queue, active, capacity, max_queue, step_s, encoder_s, 100.0, 256, "m", ready, draining,
                        NOW - age_s)


def cand(variant: Variant, ld: EndpointLoad | None, n: int = 0, **kw: object) -> Candidate:
    return Candidate(f"{variant.name}/{n}", variant, ld, **kw)  # type: ignore[arg-type]


def req(max_tokens: int = 256, steps: int | None = 16, target_ms: float | None = None, **kw: object) -> RouteRequest:
    return RouteRequest("m", max_tokens, steps, target_ms, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_tokens", "canvas", "canvases"),
    [(1, 256, 1), (256, 256, 1), (257, 256, 2), (40, 16, 3), (0, 16, 1)],
)
def test_cost_is_per_canvas_not_per_token(max_tokens: int, canvas: int, canvases: int) -> None:
    assert canvases_for(max_tokens, canvas) == canvases


@pytest.mark.parametrize(
    ("active", "queue", "inflight", "expected_s"),
    [
        # own work = 2 canvases x (encoder 0.01 + 16 steps x 0.01) = 0.34 s
        (0, 0, 0, 0.34),  # idle: just its own work
        (1, 0, 0, 0.68),  # shares the worker with one other
        (3, 0, 0, 1.36),  # four active: a quarter of the worker each
        (4, 2, 0, 2.38),  # full, two queued: three requests' worth of waiting, then a quarter share
        (0, 0, 2, 1.02),  # the gateway's own in-flight count beats a lagging report
        (2, 0, 2, 1.02),  # the report and the in-flight count are the same two requests, not four
    ],
)
def test_interleaved_prediction_counts_queue_sharing_canvases_and_steps(
    active: int, queue: int, inflight: int, expected_s: float
) -> None:
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=active, queue=queue), inflight=inflight)
    p = predict(c, req(max_tokens=300, steps=16))
    assert p.canvases == 2 and p.steps_per_canvas == 16
    assert p.total_s == pytest.approx(expected_s)


def test_the_first_encoder_pass_grows_with_the_prompt_images_included() -> None:
    # 2 canvases, 16 steps of 0.01 s each; the worker measured 0.001 s of encoder per prompt token.
    measured = cand(FAST, replace(load(step_s=0.01, encoder_s=0.01), encoder_token_latency_s=0.001))
    text_only = predict(measured, req(max_tokens=300, steps=16, prompt_tokens=20)).total_s
    with_image = predict(measured, req(max_tokens=300, steps=16, prompt_tokens=20 + 282)).total_s
    assert text_only == pytest.approx(20 * 0.001 + 0.01 + 2 * 16 * 0.01)  # first pass, one canvas pass, steps
    assert with_image - text_only == pytest.approx(282 * 0.001)  # an image of 280 soft tokens and its markers
    # Unknown length or no per-token measurement: every pass costs the measured encoder latency, as before.
    assert predict(measured, req(max_tokens=300, steps=16)).total_s == pytest.approx(0.34)
    unmeasured = cand(FAST, load(step_s=0.01, encoder_s=0.01))
    assert predict(unmeasured, req(max_tokens=300, steps=16, prompt_tokens=302)).total_s == pytest.approx(0.34)


def test_prediction_uses_the_measured_step_share_and_the_prior_until_measured() -> None:
    half = cand(FAST, load(step_s=0.01, encoder_s=0.01), step_fraction=0.5)
    assert predict(half, req(steps=16)).total_s == pytest.approx(0.01 + 8 * 0.01)
    unmeasured = cand(replace(FAST, tokens_per_s_prior=1024.0, max_denoising_steps=16), load(step_s=0.0))
    p = predict(unmeasured, req(steps=None))
    assert not p.measured
    assert p.step_latency_s == pytest.approx(prior_step_latency_s(1024.0, 256, 16)) == pytest.approx(256 / 1024 / 16)


def test_batched_mode_only_waits_beyond_capacity() -> None:
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=3, capacity=4))
    assert predict(c, req(max_tokens=256), "batched").total_s == pytest.approx(0.17)
    full = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=4, queue=3, capacity=4))
    assert predict(full, req(max_tokens=256), "batched").queue_wait_s == pytest.approx(0.17)


def test_a_request_behind_a_nearly_finished_one_shares_only_its_remainder() -> None:
    # own = 0.34 s (2 canvases x (0.01 + 16 x 0.01)); the one request there has 0.05 s of work left.
    behind_one = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=1), inflight=1, ahead_s=(0.05,),
                      reported_mine=1)
    assert predict(behind_one, req(max_tokens=300, steps=16)).total_s == pytest.approx(0.34 + 0.05)
    # Processor sharing: a longer one ahead slows it only by the request's own work (they take turns).
    behind_long = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=1), inflight=1, ahead_s=(5.0,),
                       reported_mine=1)
    assert predict(behind_long, req(max_tokens=300, steps=16)).total_s == pytest.approx(0.34 + 0.34)


def test_a_lagging_report_of_a_request_that_has_ended_is_not_charged() -> None:
    # The last report counted one request there, this gateway's own, which has ended since: alone.
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=1), reported_mine=1)
    assert predict(c, req(max_tokens=300, steps=16)).total_s == pytest.approx(0.34)


def test_an_endpoint_tells_its_own_requests_in_a_lagging_report() -> None:
    state = EndpointState(EndpointSpec("w", "127.0.0.1:1", FAST), None, None)
    early, late = Work(0.3, 1.0, routed_at=NOW - 2), Work(0.3, 1.0, routed_at=NOW + 1)
    state.track(early)
    state.track(late)
    ended = Work(0.3, 1.0, routed_at=NOW - 1)
    state.track(ended)
    state.untrack(ended, now=NOW + 0.5)  # it ended after the report: the report still counts it
    gone = Work(0.3, 1.0, routed_at=NOW - 3)
    state.track(gone)
    state.untrack(gone, now=NOW - 0.5)  # it ended before the report: not in it
    state.load = load(active=3)  # taken at NOW
    assert state.reported_mine() == 2  # early and ended; late came after it
    assert state.inflight == 2 and state.work == [early, late]


def test_a_request_s_remaining_work_follows_its_commits_down_to_one_canvas() -> None:
    work = Work(own_s=0.3, canvases=3.0, routed_at=NOW)
    assert work.remaining_s == pytest.approx(0.3)
    work.committed = 2
    assert work.remaining_s == pytest.approx(0.1)
    work.committed = 5  # a reply longer than expected: one canvas's work until it ends
    assert work.remaining_s == pytest.approx(0.1)


def test_requests_the_gateway_did_not_send_are_charged_the_request_s_own_work() -> None:
    # The worker reports three there; this gateway knows one of them (0.1 s left): the other two are charged
    # as much as this request (ahead_share 1.0), the known one its remainder.
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=3), inflight=1, ahead_s=(0.1,), reported_mine=1)
    assert predict(c, req(max_tokens=300, steps=16)).total_s == pytest.approx(0.34 + 0.1 + 2 * 0.34)
    assert predict(c, req(max_tokens=300, steps=16), ahead_share=0.5).total_s == pytest.approx(
        0.34 + 0.1 + 2 * 0.17)


def test_beyond_capacity_it_waits_for_the_first_slot_with_the_known_remaining_works() -> None:
    # Capacity 2, both slots taken by this gateway's requests (0.1 s and 1.0 s left), one of its own queued
    # (0.34 s). Rounds: 2 active until 0.1 finishes (0.2 s); the queued one takes the slot; then this request
    # waits for the next to finish: 0.34 of work left vs 0.9 -> 0.68 s; at 0.88 s it takes that slot beside the
    # 0.56 s left of the long one, and finishes after 0.34 + 0.34 more.
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=2, queue=1, capacity=2), inflight=3,
             ahead_s=(0.1, 1.0, 0.34), reported_mine=3)
    p = predict(c, req(max_tokens=300, steps=16))
    assert p.queue_wait_s == pytest.approx(0.2 + 0.68)
    assert p.total_s == pytest.approx(0.2 + 0.68 + 0.68)
    assert p.service_s == pytest.approx(0.68)


def test_a_batching_worker_waits_only_for_the_first_known_slot() -> None:
    # Batched, capacity 2, full with 0.05 s and 1.0 s left: the request waits 0.05 s, then runs its own 0.17 s.
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=2, capacity=2), inflight=2, ahead_s=(0.05, 1.0),
             reported_mine=2)
    p = predict(c, req(max_tokens=256), "batched")
    assert p.queue_wait_s == pytest.approx(0.05) and p.total_s == pytest.approx(0.05 + 0.17)


def test_an_infinite_step_latency_ahead_predicts_never_rather_than_hanging() -> None:
    c = cand(FAST, load(step_s=float("inf"), encoder_s=0.01, active=2, capacity=2), inflight=2,
             ahead_s=(float("inf"), float("nan")), reported_mine=2)
    assert predict(c, req(max_tokens=300, steps=16)).total_s == math.inf


def test_the_variant_s_overhead_outside_the_worker_is_added_once() -> None:
    c = cand(FAST, load(step_s=0.01, encoder_s=0.01, active=1), inflight=1, ahead_s=(0.05,), overhead_s=0.09,
             reported_mine=1)
    p = predict(c, req(max_tokens=300, steps=16))
    assert p.total_s == pytest.approx(0.34 + 0.05 + 0.09)
    assert p.overhead_s == pytest.approx(0.09) and p.own_s == pytest.approx(0.34)


LT = load_profile_file("latency-target")


@pytest.mark.parametrize(
    ("loads", "target_ms", "chosen", "expect_met"),
    [
        # all idle and all meet a loose target: the cheapest
        ({"spark": 0.05, "rtx": 0.02, "h100": 0.01}, 4000, "spark", True),
        # the cheap one is too slow for a tight target: the next cheapest that meets it
        ({"spark": 0.05, "rtx": 0.02, "h100": 0.01}, 500, "rtx", True),
        ({"spark": 0.05, "rtx": 0.02, "h100": 0.01}, 250, "h100", True),
        # nobody can: the one that finishes first
        ({"spark": 0.05, "rtx": 0.02, "h100": 0.01}, 50, "h100", False),
    ],
)
def test_latency_target_picks_the_cheapest_endpoint_that_meets_the_target(
    loads: dict[str, float], target_ms: float, chosen: str, expect_met: bool
) -> None:
    cands = [cand(v, load(step_s=loads[v.name])) for v in (CHEAP, MID, FAST)]
    d = route(LT, req(max_tokens=256, steps=16, target_ms=target_ms), cands, NOW)
    assert d.endpoint is not None and d.endpoint.variant.name == chosen
    assert d.expect_met is expect_met
    assert d.target_s == pytest.approx(target_ms / 1000)


def test_a_busy_cheap_endpoint_loses_to_a_free_one_when_the_queue_would_miss_the_target() -> None:
    busy_cheap = cand(CHEAP, load(step_s=0.02, active=4, queue=4))
    idle_fast = cand(FAST, load(step_s=0.01))
    d = route(LT, req(target_ms=1000), [busy_cheap, idle_fast], NOW)
    assert d.endpoint is idle_fast


def test_the_cost_of_a_request_is_its_own_work_whatever_is_ahead_of_it() -> None:
    # The same variant on two replicas: the faster one already runs one of this gateway's requests. Both meet a
    # loose target; its work alone is cheaper on the faster one, so routing packs it there (the known work ahead
    # is the latency filter's business, not the cost's).
    busy_fast = cand(FAST, load(step_s=0.010, active=1), 1, inflight=1, reported_mine=1, ahead_s=(0.3,))
    idle_slow = cand(FAST, load(step_s=0.011), 2)
    d = route(LT, req(target_ms=4000), [idle_slow, busy_fast], NOW)
    assert d.endpoint is busy_fast


def test_the_variant_default_target_applies_without_a_request_target() -> None:
    tight = replace(CHEAP, latency_target_ms=100)
    d = route(LT, req(target_ms=None), [cand(tight, load(step_s=0.05)), cand(FAST, load(step_s=0.001))], NOW)
    assert d.endpoint is not None and d.endpoint.variant.name == "h100"


def test_strict_mode_refuses_with_a_retry_after_when_no_endpoint_meets_the_target() -> None:
    d = route(LT, req(target_ms=10, strict=True), [cand(FAST, load(step_s=0.01))], NOW)
    assert d.endpoint is None and "latency target of 10 ms" in d.reason
    assert d.retry_after_s is not None and d.retry_after_s >= 1.0


@pytest.mark.parametrize(
    ("candidate", "kept"),
    [
        (cand(FAST, load()), True),
        (cand(FAST, None), False),  # never reported
        (cand(FAST, load(ready=False)), False),
        (cand(FAST, load(draining=True)), False),
        (cand(FAST, load(age_s=6.0)), False),  # stale report
        (cand(FAST, load(), ejected=True), False),  # outlier ejection
        (cand(FAST, load(active=4, queue=8)), False),  # every slot taken
        (cand(replace(FAST, model="other"), load()), False),  # another model
    ],
)
def test_unusable_endpoints_drop_out(candidate: Candidate, kept: bool) -> None:
    for profile in ("latency-target", "least-loaded", "round-robin"):
        d = route(load_profile_file(profile), req(), [candidate], NOW)
        assert (d.endpoint is candidate) is kept, profile


def test_round_robin_rotates_and_least_loaded_prefers_the_emptiest() -> None:
    cands = [cand(FAST, load(active=a), n=i) for i, a in enumerate((3, 0, 1))]
    rr = load_profile_file("round-robin")
    picked = [route(rr, req(seq=s), cands, NOW).endpoint for s in range(6)]
    assert [c.endpoint_id for c in picked if c] == ["h100/0", "h100/1", "h100/2"] * 2
    ll = load_profile_file("least-loaded")
    assert route(ll, req(), cands, NOW).endpoint is cands[1]


def test_equal_endpoints_share_the_load_by_request_counter() -> None:
    cands = [cand(FAST, load(), n=i) for i in range(3)]
    chosen = {route(LT, req(seq=s), cands, NOW).endpoint.endpoint_id for s in range(3)}  # type: ignore[union-attr]
    assert len(chosen) == 3


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"filters": [{"type": "nope"}]}, "unknown filter 'nope'"),
        ({"scorers": [{"type": "healthy"}]}, "unknown scorer 'healthy'"),
        ({"filters": [{"type": "healthy", "params": {"stale": 1}}]}, "unknown parameter 'stale'"),
        ({"filters": [{"type": "healthy", "params": {"stale_after_s": "x"}}]}, "expected float"),
        ({"filters": [{"type": "latency-target", "params": {"mode": "magic"}}]}, "mode"),
        ({"scorers": [{"type": "cost", "weight": -1}]}, "weight"),
        ({"filterz": []}, "unknown profile key"),
    ],
)
def test_bad_profiles_are_refused_with_a_message_naming_the_problem(profile: dict[str, object], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load_profile(profile)


def test_ejection_backs_off_exponentially_up_to_a_maximum() -> None:
    e = Ejection(base_s=1.0, max_s=10.0)
    assert [e.period(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]


def test_demand_snapshot_reports_requested_canvases_waiting_and_delivered_per_replica() -> None:
    t = DemandTracker(window_s=10.0)
    t.routed("h100", NOW - 20, max_tokens=300, canvases=2)  # outside the window
    for i in range(5):
        t.routed("h100", NOW - 4 + i, max_tokens=300, canvases=2)
    t.finished("h100", NOW, 100, met=True)
    t.finished("h100", NOW, 100, met=False)
    cands = [cand(FAST, load(queue=3), n=0), cand(FAST, load(), n=1), cand(FAST, load(ready=False), n=2)]
    snap = snapshot(t, [FAST], cands, NOW)
    v = snap.variants["h100"]
    assert v.replicas == 3 and v.replicas_ready == 2
    assert v.demand.canvases_per_s == pytest.approx(1.0)
    assert v.demand.tokens_per_s == pytest.approx(150.0)
    assert v.demand.requests_waiting == 3
    assert v.demand.targets_missed == 1 and v.demand.target_miss_ratio == pytest.approx(0.5)
    assert v.delivered.tokens_per_s_per_replica == pytest.approx(100.0)


def test_cost_compares_what_serving_the_request_costs_not_the_hourly_price_alone() -> None:
    # Twice the price but four times as fast: the cheaper place for this request.
    slow_cheap = cand(replace(CHEAP, cost_weight=1.0), load(step_s=0.04))
    fast_pricey = cand(replace(FAST, cost_weight=2.0), load(step_s=0.01))
    d = route(LT, req(target_ms=60000), [slow_cheap, fast_pricey], NOW)
    assert d.endpoint is fast_pricey
    by_price = load_profile({"filters": ["model-match"], "scorers": [{"type": "cost", "params": {"per_work": False}}]})
    assert route(by_price, req(), [slow_cheap, fast_pricey], NOW).endpoint is slow_cheap


def test_the_simulation_runs_the_real_pipeline_and_the_target_policy_beats_round_robin() -> None:
    from dgemma_sim.routing import poisson_trace, simulate, three_variants

    trace = poisson_trace(3.0, 120.0, seed=1)
    ours = simulate(LT, three_variants(), trace).summary()
    rr = simulate(load_profile_file("round-robin"), three_variants(), trace).summary()
    assert ours["requests"] == rr["requests"] == len(trace)
    assert ours["attainment"] >= 0.95 > 0.8 > rr["attainment"]
