"""Demand snapshots for the autoscaler's tests, built through the contract's models (dgemma_common.demand)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dgemma_common.demand import VERSION, Capacity, Delivered, Demand, DemandSnapshot, VariantView


def view(canvases_per_s: float = 0.0, capacity: float | None = 2.0, waiting: int = 0, held: int = 0,
         canvases_held: float = 0.0, met: int = 0, missed: int = 0, measured: int = 1, replicas: int = 1,
         delivered_tokens_per_s: float = 0.0, **demand: Any) -> VariantView:
    """One variant as one gateway sees it (canvas 256, an h100 prior); `demand`: other demand fields."""
    fields: dict[str, Any] = {
        "requests_per_s": canvases_per_s, "tokens_per_s": canvases_per_s * 256, "canvases_per_s": canvases_per_s,
        "preferred_requests_per_s": canvases_per_s, "preferred_tokens_per_s": canvases_per_s * 256,
        "preferred_canvases_per_s": canvases_per_s, "overflow_in_canvases_per_s": 0.0,
        "routed_requests_per_s": canvases_per_s, "routed_tokens_per_s": canvases_per_s * 256,
        "routed_canvases_per_s": canvases_per_s, "requests_waiting": waiting, "canvases_waiting": float(waiting),
        "requests_in_flight": 0, "targets_met": met, "targets_missed": missed, "requests_total": met + missed,
        "targets_met_total": met, "targets_missed_total": missed, "requests_held": held,
        "canvases_held": canvases_held,
    }
    fields.update(demand)
    return VariantView(
        model="m", gpu_profile="h100", cost_weight=1.0, latency_target_ms=2000.0, canvas_length=256,
        tokens_per_s_prior=1100.0, replicas=replicas, replicas_ready=replicas, demand=Demand(**fields),
        delivered=Delivered(tokens_per_s=delivered_tokens_per_s, tokens_per_s_per_replica=delivered_tokens_per_s,
                            completion_tokens_per_s=0.0, canvases_per_s_per_replica=0.0),
        capacity=Capacity(canvases_per_s_per_replica=capacity,
                          tokens_per_s_per_replica=None if capacity is None else capacity * 256,
                          steps_per_canvas=None if capacity is None else 16.0,
                          step_latency_s=None if capacity is None else 1 / (16 * capacity + 1),
                          encoder_latency_s=None if capacity is None else 1 / (16 * capacity + 1),
                          replicas_measured=0 if capacity is None else measured),
        step_shares={} if capacity is None else {"48": 1 / 3},
        gateways=1,
    )


def snapshot(views: Mapping[str, VariantView]) -> DemandSnapshot:
    """A snapshot of these variants, by name."""
    return DemandSnapshot(version=VERSION, time_unix_s=1.8e9, window_s=60.0, unroutable={}, variants=dict(views))
