"""When would a request finish on an endpoint? Pure functions of the canonical load.

Cost is per canvas and per step, not per token: a request asking for `max_tokens` may take up to
ceil(max_tokens / canvas_length) canvases, fewer when its reply ends first (`expected_canvases`), each
an encoder pass plus the expected number of decoder steps (`expected_steps`). The worker engine
interleaves its active requests one step at a time (processor sharing), so a request of work x among
active requests with remaining work r_j finishes after x + sum_j min(r_j, x) ("interleaved"); requests
beyond the worker's `capacity` wait in its queue for a slot. The remaining work of this gateway's own
requests there is known (`Candidate.ahead_s`); the others the worker reports (other gateways') are charged
`ahead_share` x this request's work.
A batching worker ("batched") runs up to `capacity` requests per step at the measured step latency,
so only the queue beyond capacity waits.
Work outside the worker (HTTP, routing, the gRPC round trip, streaming) is the variant's learned
`overhead_s`, added once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dgemma_gateway.types import Candidate, RouteRequest, Variant

Mode = Literal["interleaved", "batched"]


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds until the request finishes, and its parts."""

    total_s: float
    queue_wait_s: float
    service_s: float
    canvases: int  # at most (what max_tokens allows)
    steps_per_canvas: float
    expected_canvases: float  # before the reply ends, as the variant's replies have
    step_latency_s: float
    encoder_s: float
    measured: bool  # False: the variant's prior stood in for a measurement
    own_s: float = 0.0  # the request's own work on the worker, alone
    overhead_s: float = 0.0  # outside the worker (the variant's learned per-request overhead)


def canvases_for(max_tokens: int, canvas_length: int) -> int:
    """Canvases a request of max_tokens needs (at least one)."""
    return max(1, math.ceil(max_tokens / max(1, canvas_length)))


def prior_step_latency_s(tokens_per_s: float, canvas_length: int, steps_per_canvas: float) -> float:
    """The step latency that a tokens/s prior implies: one canvas of tokens per steps_per_canvas steps."""
    return canvas_length / max(1e-9, tokens_per_s) / max(1.0, steps_per_canvas)


def expected_steps(candidate: Candidate, cap: int) -> float:
    """Decoder steps a canvas is expected to take on this candidate at a step cap of `cap`.

    Adaptive stopping ends a canvas once it has converged, and that point does not scale with the cap:
    a canvas that stops after 12 of 48 steps takes all 8 of 8. So the share is learned per cap, and a
    request is predicted from its own cap's share; a cap not yet seen takes the share of the nearest one
    that was (then the variant's own share, 1.0 until measured).
    """
    nearest = min(candidate.step_shares, key=lambda cs: (abs(cs[0] - cap), cs[0]), default=None)
    share = candidate.step_fraction if nearest is None else nearest[1]
    return max(1.0, cap * min(1.0, max(0.0, share)))


def reply_survival(replies: Sequence[tuple[int, bool]]) -> tuple[float, ...]:
    """P(a reply needs at least k canvases) for k = 1, 2, ..., from finished replies (Kaplan-Meier).

    `replies`: (canvases used, ended by itself). A reply that ended at EOS or a stop string shows its
    length; one cut by its token budget only shows that it needed more than it got (censored), so
    requests that asked for little do not make long ones look short. Ends one past the longest reply seen.
    """
    if not replies:
        return ()
    longest = max(used for used, _ in replies)
    survival, alive = [1.0], 1.0
    for k in range(1, longest + 1):
        at_risk = sum(1 for used, _ in replies if used >= k)
        ended = sum(1 for used, done in replies if used == k and done)
        alive *= 1.0 - ended / at_risk if at_risk else 1.0
        survival.append(alive)
    return tuple(survival)


def expected_canvases(survival: Sequence[float], at_most: int) -> float:
    """Canvases a request allowed `at_most` is expected to take: E[min(at_most, reply length)], from the
    variant's `reply_survival` (a candidate's).

    Every allowed canvas until replies have been seen; past the longest seen, the last survival holds.
    """
    if not survival:
        return float(at_most)
    return sum(survival[min(k, len(survival) - 1)] for k in range(at_most))


def target_s(request: RouteRequest, variant: Variant) -> float:
    """The latency target that applies: the request's own, else the variant's default."""
    ms = request.latency_target_ms if request.latency_target_ms is not None else variant.latency_target_ms
    return ms / 1000.0


def predict(
    candidate: Candidate, request: RouteRequest, mode: Mode = "interleaved", ahead_share: float = 1.0
) -> Prediction:
    """Predict the request's finish time on this candidate.

    `ahead_share`: how much of this request's work each request there that this gateway did not send still
    has left, on average (1.0 assumes as much as this one: conservative; 0.5 assumes they are half done).
    Its own requests there count with their known remaining work (`Candidate.ahead_s`).
    """
    variant = candidate.variant
    load = candidate.load
    canvas = (load.canvas_length if load is not None and load.canvas_length > 0 else 0) or variant.canvas_length
    max_steps = request.max_denoising_steps or variant.max_denoising_steps
    steps = expected_steps(candidate, max_steps)
    canvases = canvases_for(request.max_tokens, canvas)
    expected = expected_canvases(candidate.reply_survival, canvases)
    measured = load is not None and load.step_latency_s > 0
    if load is not None and load.step_latency_s > 0:
        step_s = load.step_latency_s
    else:
        prior_steps = expected_steps(candidate, variant.max_denoising_steps)
        step_s = prior_step_latency_s(variant.tokens_per_s_prior, canvas, prior_steps)
    encoder_s = load.encoder_latency_s if load is not None and load.encoder_latency_s > 0 else step_s
    # The first encoder pass reads the whole prompt (images included): it grows with its length when the
    # worker has measured its encoder cost per token. Later passes each encode one committed canvas, as many
    # as the reply is expected to run (`expected` >= 1).
    per_token = load.encoder_token_latency_s if load is not None else 0.0
    first_s = request.prompt_tokens * per_token if request.prompt_tokens > 0 and per_token > 0 else encoder_s
    own = first_s + (expected - 1) * encoder_s + expected * steps * step_s
    capacity = max(1, load.capacity if load is not None and load.capacity > 0 else 1)
    # This gateway's own requests there, with their known remaining work, then the others: those the worker
    # reports beyond this gateway's; at least as many in all as this gateway has in flight (some of its own
    # may have no known work: routed without a prediction, or a caller that tracks none).
    known = [max(0.0, r) for r in candidate.ahead_s]
    reported = 0 if load is None else load.active + load.queue_depth
    n = max(len(known) + max(0, reported - candidate.reported_mine), candidate.inflight)
    ahead = (*known, *[own * ahead_share] * (n - len(known)))
    wait, total = finish_behind(ahead, own, capacity, shared=mode == "interleaved")
    overhead = max(0.0, candidate.overhead_s)
    return Prediction(total + overhead, wait, total - wait, canvases, steps, expected, step_s, encoder_s, measured,
                      own, overhead)


def finish_behind(ahead: Sequence[float], own: float, capacity: int, shared: bool) -> tuple[float, float]:
    """(seconds until a slot takes it, seconds until it finishes) for a new request of `own` work behind
    requests with remaining work `ahead`, in the worker's order: the first `capacity` active, the rest queued.

    `shared`: the active requests take turns, one step each (processor sharing: m active each progress at
    1/m); otherwise they progress together (a batch). Each round runs until the next request finishes; a
    freed slot takes the first queued one, so a round ends at least one request: as many rounds as requests at
    most (a non-finite work, e.g. from a worker reporting an infinite latency, never finishes).
    """
    remaining = [*ahead, own]
    me = len(remaining) - 1
    active = list(range(min(capacity, len(remaining))))
    queued = list(range(len(active), len(remaining)))
    now, wait = 0.0, 0.0 if me in active else math.inf
    for _ in range(len(remaining)):
        done = min(remaining[i] for i in active)
        now += done * len(active) if shared else done
        for i in active:
            remaining[i] -= done
        finished = {i for i in active if remaining[i] <= 1e-12}
        if me in finished:
            return wait, now
        active = [i for i in active if i not in finished]
        while queued and len(active) < capacity:
            active.append(queued.pop(0))
            if active[-1] == me:
                wait = now
    return wait, math.inf
