"""Pure functions that turn what is observed into the resource's status, as the typed status model.

Two writers share `status.conditions`: the reconciler owns Ready, Progressing and Degraded; the autoscaler owns
ScalingActive. Each carries over the conditions it does not own, so neither erases the other's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from dgemma_operator import children, models

Body = dict[str, Any]
log = logging.getLogger(__name__)


def read(owner: Body) -> models.DiffusionGemmaStatus:
    """The resource's status as the typed model; an empty one if there is none, or if it cannot be read (a
    hand-edited status): the operator then starts its memory afresh rather than act on garbled state."""
    try:
        return models.DiffusionGemmaStatus.model_validate(owner.get("status") or {})
    except pydantic.ValidationError as e:
        log.warning("the status of %s cannot be read (%s); starting from an empty one",
                    owner.get("metadata", {}).get("name"), e.errors()[0]["msg"])
        return models.DiffusionGemmaStatus()


def condition(
    kind: str, status: bool, reason: str, message: str, generation: int | None,
    previous: Sequence[models.Condition], now: str,
) -> models.Condition:
    """A condition; its transition time moves only when its status flips, as in metav1.Condition."""
    value: Literal["True", "False"] = "True" if status else "False"
    old = next((c for c in previous if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == value else None
    return models.Condition(type=kind, status=value, reason=reason, message=message,
                            last_transition_time=since or now, observed_generation=generation)


def with_conditions(previous: Sequence[models.Condition], *mine: models.Condition) -> list[models.Condition]:
    """`mine`, then every previous condition of another type (another writer's), in their order."""
    kinds = {c.type for c in mine}
    return [*mine, *(c for c in previous if c.type not in kinds)]


def _deployment_condition(deployment: Body, kind: str) -> Body:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def observed(
    owner: Body, spec: models.DiffusionGemmaSpec, deployment: Body | None, now: str
) -> models.DiffusionGemmaStatus:
    """The status of a valid resource, computed from its Deployment as observed (None: missing)."""
    meta = owner["metadata"]
    generation = meta.get("generation")
    previous = read(owner).conditions or []
    desired = spec.replicas
    dep_status = (deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    replicas = int(dep_status.get("replicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)

    if deployment is None:
        progressing = (True, "CreatingWorkers", "the worker Deployment does not exist yet")
    elif int(dep_status.get("observedGeneration") or 0) < int(deployment["metadata"].get("generation") or 0):
        progressing = (True, "RollingOut", "the Deployment has not yet observed its latest spec")
    elif updated < desired or replicas != desired or ready < desired:
        progressing = (True, "RollingOut", f"{updated}/{desired} replicas updated, {ready}/{desired} ready")
    else:
        progressing = (False, "Complete", f"{ready}/{desired} replicas ready with the current spec")

    if desired == 0:
        readiness = (False, "ScaledToZero", "no replicas are desired")
    elif ready >= desired:
        readiness = (True, "AllReplicasReady", f"{ready}/{desired} replicas ready")
    elif ready > 0:
        readiness = (True, "PartiallyReady", f"{ready}/{desired} replicas ready")
    else:
        readiness = (False, "NoReplicasReady", f"0/{desired} replicas ready")

    failure = _deployment_condition(deployment or {}, "ReplicaFailure")
    progress = _deployment_condition(deployment or {}, "Progressing")
    if failure.get("status") == "True":
        degraded = (True, failure.get("reason") or "ReplicaFailure", failure.get("message") or "")
    elif progress.get("reason") == "ProgressDeadlineExceeded":
        degraded = (True, "ProgressDeadlineExceeded", progress.get("message") or "rollout is stuck")
    else:
        degraded = (False, "AsExpected", "")

    name, namespace = meta["name"], meta["namespace"]
    return models.DiffusionGemmaStatus(
        observed_generation=generation,
        conditions=with_conditions(
            previous,
            condition("Ready", *readiness, generation, previous, now),
            condition("Progressing", *progressing, generation, previous, now),
            condition("Degraded", *degraded, generation, previous, now),
        ),
        replicas=replicas,
        ready_replicas=ready,
        updated_replicas=updated,
        selector=children.selector_string(name),
        endpoint=children.endpoint(name, namespace, spec),
        tokens_per_second_prior=children.tokens_per_second_prior(spec),
    )


def external(owner: Body, spec: models.DiffusionGemmaSpec, now: str) -> models.DiffusionGemmaStatus:
    """The status of an external variant: nothing runs here, so it is ready as soon as it is valid (the gateway
    learns whether the API answers from its own requests)."""
    meta = owner["metadata"]
    generation = meta.get("generation")
    previous = read(owner).conditions or []
    url = children.endpoint(meta["name"], meta["namespace"], spec)
    return models.DiffusionGemmaStatus(
        observed_generation=generation,
        conditions=with_conditions(
            previous,
            condition("Ready", True, "External", f"requests that overflow go to {url}", generation, previous, now),
            condition("Progressing", False, "Complete", "nothing runs in the cluster", generation, previous, now),
            condition("Degraded", False, "AsExpected", "", generation, previous, now),
        ),
        replicas=0,
        ready_replicas=0,
        updated_replicas=0,
        selector=children.selector_string(meta["name"]),
        endpoint=url,
        tokens_per_second_prior=children.tokens_per_second_prior(spec),
    )


def invalid(owner: Body, reason: str, message: str, now: str) -> models.DiffusionGemmaStatus:
    """The status of a resource whose spec can never work: Degraded with the reason, not Ready."""
    generation = owner["metadata"].get("generation")
    previous = read(owner).conditions or []
    return models.DiffusionGemmaStatus(
        observed_generation=generation,
        conditions=with_conditions(
            previous,
            condition("Ready", False, reason, message, generation, previous, now),
            condition("Progressing", False, reason, "fix the spec to continue", generation, previous, now),
            condition("Degraded", True, reason, message, generation, previous, now),
        ),
    )


def as_patch(status: models.DiffusionGemmaStatus) -> Body:
    """The fields set in a status, as the JSON of a merge patch (a field set to None removes it)."""
    return status.model_dump(by_alias=True, exclude_unset=True, mode="json")
