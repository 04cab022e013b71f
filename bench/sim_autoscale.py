"""Trace-driven autoscaling simulation: dgemma's autoscaler vs an HPA-style utilization rule vs a fixed
maximum fleet, side by side on a step, a ramp and a daily-shaped trace over three variants (H100, RTX
PRO 6000, DGX Spark priors). Every arrival is routed by the gateway's own `route`; our controller is
the operator's own `decide` on the gateway's demand snapshot (`dgemma_sim.scaling`).

    python bench/sim_autoscale.py          # table to stdout, JSON to bench/out/, plot to docs/
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dgemma_gateway.routing import load_profile_file
from dgemma_sim.routing import SimResult
from dgemma_sim.scaling import (
    ControllerFactory,
    Report,
    TraceSpec,
    daily_trace,
    default_fleet,
    fixed,
    hpa,
    ours,
    ramp_trace,
    run,
    step_trace,
)

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS: dict[str, ControllerFactory] = {
    "dgemma": ours,
    "dgemma, routed demand": lambda fleet: ours(fleet, "routed_canvases_per_s"),
    "HPA-style": hpa,
    "fixed max": fixed,
}


def traces() -> list[TraceSpec]:
    """The three load shapes (requests/s)."""
    return [step_trace(3.0, 10.0), ramp_trace(2.0, 11.0), daily_trace(11.0, hours_per_day=3.0)]


def table(reports: list[Report]) -> str:
    """A markdown table: per trace, the controllers side by side with the fixed fleet as reference."""
    head = ("| trace | controller | targets met | replica-hours (vs fixed) | cost (vs fixed) | scaling actions "
            "| reversals at constant load (most per variant and phase) | replica-hours H100 / RTX / Spark |")
    lines = [head, "|" + "---|" * 8]
    for trace in dict.fromkeys(r.trace for r in reports):
        mine = [r for r in reports if r.trace == trace]
        ref = next(r for r in mine if r.controller == "fixed max")
        for r in mine:
            split = " / ".join(f"{r.by_variant[k]:.1f}" for k in ("h100", "rtx-pro", "spark"))
            lines.append(
                f"| {trace} | {r.controller} | {r.attainment * 100:.1f}% | {r.replica_hours:.1f} "
                f"({r.replica_hours / ref.replica_hours * 100:.0f}%) | {r.cost:.1f} ({r.cost / ref.cost * 100:.0f}%) "
                f"| {r.actions} | {r.reversals} ({r.max_reversals}) | {split} |")
    return "\n".join(lines)


def plot(specs: list[TraceSpec], runs: list[list[tuple[Report, SimResult]]], warmup_s: float, path: Path) -> None:
    """Per trace: offered load and total replicas per controller, ours per variant, attainment per 5 min."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(specs), figsize=(5.2 * len(specs), 10), squeeze=False)
    colors = {"dgemma": "C0", "dgemma, routed demand": "C9", "HPA-style": "C3", "fixed max": "grey"}
    for col, (spec, results) in enumerate(zip(specs, runs, strict=True)):
        top, mid, bottom = axes[0][col], axes[1][col], axes[2][col]
        for report, result in results:
            log = [(t - warmup_s, sum(r.values())) for t, r in result.replicas_log if t >= warmup_s]
            top.step([t / 60 for t, _ in log], [n for _, n in log], where="post", label=report.controller,
                     color=colors.get(report.controller), lw=1.2)
            bins: dict[int, list[int]] = {}
            for o in result.outcomes:
                if o.arrival_s >= warmup_s:
                    bins.setdefault(int((o.arrival_s - warmup_s) // 300), []).append(o.met)
            xs = sorted(bins)
            bottom.plot([5 * b + 2.5 for b in xs], [100 * sum(bins[b]) / len(bins[b]) for b in xs], marker=".",
                        label=report.controller, color=colors.get(report.controller), lw=1)
            if report.controller == "dgemma":
                names = sorted({n for _, r in result.replicas_log for n in r})
                steps = [(t - warmup_s, r) for t, r in result.replicas_log if t >= warmup_s]
                mid.stackplot([t / 60 for t, _ in steps], *[[r.get(n, 0) for _, r in steps] for n in names],
                              labels=names, step="post", alpha=0.8)
        load = top.twinx()
        t, xs_load, ys_load = 0.0, [], []
        for duration, rate in spec.segments():
            xs_load += [t / 60, (t + duration) / 60]
            ys_load += [rate, rate]
            t += duration
        load.plot(xs_load, ys_load, color="black", ls=":", lw=1)
        load.set_ylabel("offered load (requests/s, dotted)")
        top.set(title=f"{spec.name}: replicas (all variants)", xlabel="minutes", ylabel="replicas")
        mid.set(title=f"{spec.name}: dgemma's replicas per variant", xlabel="minutes", ylabel="replicas")
        bottom.axhline(95, color="grey", ls=":", lw=1)
        bottom.set(title=f"{spec.name}: latency targets met per 5 min", xlabel="minutes", ylabel="%", ylim=(40, 101))
        if col == 0:
            top.legend(fontsize=8, loc="upper left")
            mid.legend(fontsize=8, loc="upper left")
            bottom.legend(fontsize=8, loc="lower left")
    fig.suptitle("Autoscaling simulation: H100 / RTX PRO 6000 / DGX Spark variants, 90 s replica start-up, "
                 "targets 1.5 s / 4 s / 15 s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Run every controller on every trace and write the results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-s", type=float, default=600.0)
    ap.add_argument("--startup-s", type=float, default=90.0)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "autoscale-sim.png")
    args = ap.parse_args()
    pipeline = load_profile_file("latency-target")
    fleet = default_fleet(args.startup_s)
    specs = traces()
    started = time.monotonic()
    runs = [run(pipeline, fleet, spec, CONTROLLERS, seed=args.seed, warmup_s=args.warmup_s) for spec in specs]
    reports = [r for results in runs for r, _ in results]
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = [asdict(r) for r in reports]
    (out / "sim_autoscale.json").write_text(json.dumps(rows, indent=1))
    print(table(reports))
    print(f"\n{sum(r.requests for r in reports)} requests simulated in {time.monotonic() - started:.0f} s")
    try:
        plot(specs, runs, args.warmup_s, args.plot)
        print(f"plot: {args.plot}")
    except ImportError:
        print("(matplotlib not installed: pip install -e '.[bench]' for the plot)")


if __name__ == "__main__":
    main()
