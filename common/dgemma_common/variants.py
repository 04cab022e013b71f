"""How a variant is named across processes: the gateway routes by it, the autoscaler reads demand by it, and
every component's metrics carry it as the `variant` label, so one dashboard filter selects them all."""

from __future__ import annotations


def variant_name(namespace: str | None, name: str) -> str:
    """`namespace/name` of a DiffusionGemma resource, as kubectl writes it (just `name` outside a namespace)."""
    return f"{namespace}/{name}" if namespace else name
