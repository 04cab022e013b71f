"""Trace-driven routing simulation: latency-target attainment and cost of the latency-target policy vs
least-loaded and round-robin across three variants (H100, RTX PRO 6000, DGX Spark priors) under rising
load. The decisions are the gateway's own (`dgemma_sim.routing` calls `routing.route`).

    python bench/sim_routing.py            # table to stdout, JSON to bench/out/, plot to docs/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dgemma_gateway.routing import load_profile_file
from dgemma_sim.routing import run_sweep, three_variants

POLICIES = ("latency-target", "least-loaded", "round-robin")
ROOT = Path(__file__).resolve().parent.parent


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: one line per arrival rate, the policies side by side."""
    rates = sorted({r["rate_per_s"] for r in rows})
    head = "| load (req/s) | " + " | ".join(f"{p}: met / cost / cost per met" for p in POLICIES) + " |"
    lines = [head, "|" + "---|" * (len(POLICIES) + 1)]
    for rate in rates:
        cells = []
        for p in POLICIES:
            r = next(x for x in rows if x["policy"] == p and x["rate_per_s"] == rate)
            per_met = r["cost_per_request"] / r["attainment"] if r["attainment"] else float("inf")
            cells.append(f"{r['attainment'] * 100:.1f}% / {r['cost_per_request']:.3f} / {per_met:.3f}")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Attainment and cost per request against load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p in POLICIES:
        mine = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["rate_per_s"])
        x = [r["rate_per_s"] for r in mine]
        a.plot(x, [100 * r["attainment"] for r in mine], marker="o", label=p)
        b.plot(x, [r["cost_per_request"] for r in mine], marker="o", label=p)
    a.axhline(95, color="grey", ls=":", lw=1)
    a.axhline(80, color="grey", ls="--", lw=1)
    a.set(xlabel="arrival rate (requests/s)", ylabel="latency targets met (%)", ylim=(0, 102),
          title="Latency-target attainment")
    b.set(xlabel="arrival rate (requests/s)", ylabel="cost per request (cost weight x worker-s)",
          title="Cost of the work")
    a.legend()
    fig.suptitle("2x H100 + 2x RTX PRO 6000 + 4x DGX Spark, canvas 256, targets 1.5 s / 4 s / 15 s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run the sweep and write the results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rates", default="1,2,3,4,5,6,7,8,9")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "gateway-routing.png")
    args = ap.parse_args()
    pipelines = {p: load_profile_file(p) for p in POLICIES}
    rows = run_sweep(pipelines, three_variants(), [float(r) for r in args.rates.split(",")], args.duration_s,
                     args.seed)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_routing.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    try:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    except ImportError:
        print("\n(matplotlib not installed: pip install -e '.[bench]' for the plot)")


if __name__ == "__main__":
    main()
