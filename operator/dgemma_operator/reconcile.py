"""Convergence of one resource: desired children applied, observed state recorded. Synchronous I/O."""

from __future__ import annotations

import datetime
from typing import Any

import pydantic

from dgemma_operator import children, models, status
from dgemma_operator.kube import Kube

Body = dict[str, Any]


class InvalidSpec(Exception):
    """A spec that can never work until a human changes it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def now() -> str:
    """The current time as the API writes it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_spec(body: Body) -> models.DiffusionGemmaSpec:
    """The typed spec, or InvalidSpec with every problem the schema could not catch."""
    name = body["metadata"]["name"]
    try:
        spec = models.DiffusionGemmaSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidSpec("InvalidSpec", problems) from e
    problems_list = children.semantic_problems(name, spec)
    if problems_list:
        raise InvalidSpec("InvalidSpec", "; ".join(problems_list))
    return spec


def is_subset(desired: Any, observed: Any) -> bool:
    """Whether every field we set is present with our value (fields others add are fine)."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(is_subset(v, observed.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(observed, list) and len(desired) == len(observed)
                and all(is_subset(d, o) for d, o in zip(desired, observed, strict=True)))
    return bool(desired == observed)


def same_status(old: Body, new: Body) -> bool:
    """Whether writing `new` would change anything in `old` (a merge patch keeps other fields)."""
    return all(old.get(key) == value for key, value in new.items())


def converge(kube: Kube, body: Body) -> models.DiffusionGemmaSpec:
    """Apply all children (idempotent), then record what is observed; returns the valid spec."""
    spec = parse_spec(body)
    deployment: Body | None = None
    for child in children.children(body, spec):
        applied = kube.apply(child)
        if child["kind"] == "Deployment":
            deployment = applied
    refresh_status(kube, body, spec, deployment)
    return spec


def refresh_status(kube: Kube, body: Body, spec: models.DiffusionGemmaSpec, deployment: Body | None) -> bool:
    """Write the observed status if it differs from what the resource says; True if written."""
    meta = body["metadata"]
    new = status.external(body, spec, now()) if spec.runtime == "external" else \
        status.observed(body, spec, deployment, now())
    if same_status(body.get("status") or {}, new):
        return False
    kube.patch_status(meta["namespace"], meta["name"], new)
    return True


def record_invalid(kube: Kube, body: Body, error: InvalidSpec) -> bool:
    """Write Degraded with the reason; True if the status changed."""
    meta = body["metadata"]
    new = status.invalid(body, error.reason, error.message, now())
    if same_status(body.get("status") or {}, new):
        return False
    kube.patch_status(meta["namespace"], meta["name"], new)
    return True
