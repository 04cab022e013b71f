"""Overflow to a hosted API during a burst: dgemma's autoscaler over four GPU variants (dgemma on H100, vLLM on
H100, RTX PRO 6000, DGX Spark), with and without an external OpenAI-compatible API that takes what the local
replicas cannot serve in time while new ones spend 90 s loading the model.

The vLLM-like variant runs at the figures vLLM's DiffusionGemma recipe publishes for one H100 at concurrency 1
(1282 tokens/s per request after a 489 ms time to first token; `--max-num-seqs 4`), modelled without any
batching gain. The hosted API serves each request like that too, plus 100 ms of network, up to 32 at once, and
is paid per request-second at twice an H100 replica-second. Every arrival is routed by the gateway's own
`route_with_overflow`; the autoscaler is the operator's `decide` on the gateway's demand snapshot, in which
overflowed requests count for the local variant they preferred.

    python bench/sim_overflow.py          # table to stdout, JSON to bench/out/sim_overflow.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dgemma_gateway.routing import load_profile_file
from dgemma_gateway.types import Variant
from dgemma_operator.autoscaler import AutoscalingPolicy
from dgemma_sim.routing import SimResult, SimVariant, three_variants
from dgemma_sim.scaling import Fleet, Phase, Report, TraceSpec, ours, run

ROOT = Path(__file__).resolve().parent.parent
# vLLM's recipe (models/Google/diffusiongemma-26B-A4B-it.yaml), one H100, concurrency 1, SPEED-Bench.
VLLM_TOKENS_PER_S = 1282.0
VLLM_TTFT_S = 0.489
STEPS_PER_CANVAS = 16  # the simulation's requests take 12-20 steps a canvas


def vllm_like(startup_s: float) -> SimVariant:
    """vLLM on one H100 at its published speed: a canvas every 256 / 1282 s, the rest of its first-token time
    once per request."""
    canvas_s = 256 / VLLM_TOKENS_PER_S
    step = canvas_s / (STEPS_PER_CANVAS + 1)
    variant = Variant("vllm-h100", "m", "h100", cost_weight=2.5, latency_target_ms=4000, canvas_length=256,
                      max_denoising_steps=48, tokens_per_s_prior=VLLM_TOKENS_PER_S, runtime="vllm",
                      allow_overflow=True)
    return SimVariant(variant, 1, step_s=step, encoder_s=step, capacity=4, max_queue=8, startup_s=startup_s,
                      request_overhead_s=VLLM_TTFT_S - canvas_s)


def hosted(concurrency: int = 32, cost_weight: float = 5.0) -> SimVariant:
    """An external API at vLLM's published speed plus 100 ms of network, paid per request-second."""
    base = vllm_like(0.0)
    variant = Variant("hosted", "m", "external", cost_weight=cost_weight, latency_target_ms=4000,
                      canvas_length=256, max_denoising_steps=48, tokens_per_s_prior=1000.0, runtime="external")
    return replace(base, variant=variant, capacity=concurrency, max_queue=0, shared=False,
                   request_overhead_s=base.request_overhead_s + 0.1)


def fleet(startup_s: float, overflow: bool) -> Fleet:
    """The three GPU-profile variants, a vLLM one, and (with `overflow`) the hosted API; local ones opt in."""
    local = [replace(sv, startup_s=startup_s, variant=replace(sv.variant, allow_overflow=True))
             for sv in three_variants()]
    variants = (*local, vllm_like(startup_s), *([hosted()] if overflow else []))
    maxes = {"h100": 3, "rtx-pro": 8, "spark": 16, "vllm-h100": 3}
    return Fleet(variants, {n: AutoscalingPolicy(min_replicas=1, max_replicas=m) for n, m in maxes.items()})


def burst(low: float, high: float, minutes: tuple[float, float, float] = (10, 10, 10)) -> TraceSpec:
    """Low, a burst to `high` requests/s, low again."""
    a, b, c = (m * 60 for m in minutes)
    return TraceSpec("burst", (Phase(a, low), Phase(b, high), Phase(c, low)))


def window_attainment(result: SimResult, start_s: float, end_s: float) -> float:
    """Share of targets met among the requests that arrived in [start, end)."""
    scored = [o for o in result.outcomes if start_s <= o.arrival_s < end_s]
    return sum(o.met for o in scored) / len(scored) if scored else float("nan")


def row(name: str, report: Report, result: SimResult, warmup_s: float, burst_at_s: float) -> dict[str, Any]:
    """One line of the table."""
    scored = [o for o in result.outcomes if o.arrival_s >= warmup_s]
    sent = sum(1 for o in scored if o.variant == "hosted")
    start = warmup_s + burst_at_s
    return {
        "fleet": name, "requests": report.requests, "attainment": report.attainment,
        "attainment_first_3_min_of_burst": window_attainment(result, start, start + 180),
        "overflowed": sent / len(scored) if scored else 0.0, "replica_hours": report.replica_hours,
        "cost": report.cost, "hosted_request_hours": report.by_variant.get("hosted", 0.0),
        "by_variant": report.by_variant,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table, the fleet without overflow first."""
    head = ("| fleet | targets met | in the burst's first 3 min | sent to the hosted API | GPU replica-hours "
            "| hosted request-hours | cost |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['fleet']} | {r['attainment'] * 100:.1f}% | {r['attainment_first_3_min_of_burst'] * 100:.1f}% "
            f"| {r['overflowed'] * 100:.1f}% | {r['replica_hours']:.2f} | {r['hosted_request_hours']:.3f} "
            f"| {r['cost']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Both fleets on the same burst."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-s", type=float, default=600.0)
    ap.add_argument("--startup-s", type=float, default=90.0)
    ap.add_argument("--low", type=float, default=1.5, help="requests/s before and after the burst")
    ap.add_argument("--high", type=float, default=10.0, help="requests/s during the burst")
    args = ap.parse_args()
    pipeline = load_profile_file("latency-target")
    trace = burst(args.low, args.high)
    started = time.monotonic()
    rows = []
    for name, overflow in (("local GPUs only", False), ("local GPUs + hosted overflow", True)):
        ((report, result),) = run(pipeline, fleet(args.startup_s, overflow), trace, {"dgemma": ours},
                                  seed=args.seed, warmup_s=args.warmup_s)
        rows.append(row(name, report, result, args.warmup_s, trace.phases[0].duration_s))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_overflow.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"\n{sum(r['requests'] for r in rows)} requests simulated in {time.monotonic() - started:.0f} s "
          f"(burst {args.low:g} -> {args.high:g} -> {args.low:g} requests/s, 10 min each, "
          f"{args.startup_s:g} s replica start-up)")


if __name__ == "__main__":
    main()
