"""Built-in routing plugins; importing this package registers them."""

from dgemma_gateway.routing.plugins import (
    cost,
    has_capacity,
    healthy,
    latency_target,
    least_loaded,
    max_score,
    model_match,
    predicted_latency,
    round_robin,
)

__all__ = [
    "cost",
    "has_capacity",
    "healthy",
    "latency_target",
    "least_loaded",
    "max_score",
    "model_match",
    "predicted_latency",
    "round_robin",
]
