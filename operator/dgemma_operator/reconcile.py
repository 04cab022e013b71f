"""Convergence of one resource: desired children applied, observed state recorded. Synchronous I/O."""

from __future__ import annotations

import datetime
from typing import Any

import pydantic
from kubernetes.utils.quantity import parse_quantity

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


def is_subset(desired: Any, observed: Any, path: tuple[str, ...] = ()) -> bool:
    """Whether every field we set is present with our value (fields others add are fine).

    Resource quantities compare by amount: the API server stores them in canonical form (`1024Mi` as `1Gi`),
    which is no drift."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(
            is_subset(v, observed.get(k), (*path, k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(observed, list) and len(desired) == len(observed)
                and all(is_subset(d, o, path) for d, o in zip(desired, observed, strict=True)))
    if _is_quantity(path) and desired != observed:
        return _same_quantity(desired, observed)
    return bool(desired == observed)


def _is_quantity(path: tuple[str, ...]) -> bool:
    """Container resources (`resources.requests.cpu`, `resources.limits.memory`) and emptyDir size limits."""
    return path[-3:-1] in (("resources", "requests"), ("resources", "limits")) or path[-1:] == ("sizeLimit",)


def _same_quantity(desired: Any, observed: Any) -> bool:
    try:
        return bool(parse_quantity(desired) == parse_quantity(observed))
    except ValueError:
        return False


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
    new = status.external(body, spec, now()) if spec.runtime == "external" else \
        status.observed(body, spec, deployment, now())
    return _write_status(kube, body, new)


def record_invalid(kube: Kube, body: Body, error: InvalidSpec) -> bool:
    """Write Degraded with the reason; True if the status changed."""
    return _write_status(kube, body, status.invalid(body, error.reason, error.message, now()))


def _write_status(kube: Kube, body: Body, new: models.DiffusionGemmaStatus) -> bool:
    if same_status(body.get("status") or {}, status.as_patch(new)):
        return False
    meta = body["metadata"]
    kube.patch_status(meta["namespace"], meta["name"], new)
    return True
