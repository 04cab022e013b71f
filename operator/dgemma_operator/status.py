"""Pure functions that turn what is observed into the resource's status."""

from __future__ import annotations

from typing import Any

from dgemma_operator import children, models

Body = dict[str, Any]


def _condition(
    kind: str, status: bool, reason: str, message: str, generation: int | None, previous: list[Body], now: str
) -> Body:
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    # The transition time moves only when the status flips, as in metav1.Condition.
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }


def _deployment_condition(deployment: Body, kind: str) -> Body:
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def observed(
    owner: Body, spec: models.DiffusionGemmaSpec, deployment: Body | None, now: str
) -> Body:
    """The status of a valid resource, computed from its Deployment as observed (None: missing)."""
    meta = owner["metadata"]
    generation = meta.get("generation")
    previous = list((owner.get("status") or {}).get("conditions") or [])
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
    return {
        "observedGeneration": generation,
        "conditions": [
            _condition("Ready", *readiness, generation, previous, now),
            _condition("Progressing", *progressing, generation, previous, now),
            _condition("Degraded", *degraded, generation, previous, now),
        ],
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": children.selector_string(name),
        "endpoint": children.endpoint(name, namespace, spec),
        "tokensPerSecondPrior": children.tokens_per_second_prior(spec),
    }


def external(owner: Body, spec: models.DiffusionGemmaSpec, now: str) -> Body:
    """The status of an external variant: nothing runs here, so it is ready as soon as it is valid (the gateway
    learns whether the API answers from its own requests)."""
    meta = owner["metadata"]
    generation = meta.get("generation")
    previous = list((owner.get("status") or {}).get("conditions") or [])
    url = children.endpoint(meta["name"], meta["namespace"], spec)
    return {
        "observedGeneration": generation,
        "conditions": [
            _condition("Ready", True, "External", f"requests that overflow go to {url}", generation, previous, now),
            _condition("Progressing", False, "Complete", "nothing runs in the cluster", generation, previous, now),
            _condition("Degraded", False, "AsExpected", "", generation, previous, now),
        ],
        "replicas": 0,
        "readyReplicas": 0,
        "updatedReplicas": 0,
        "selector": children.selector_string(meta["name"]),
        "endpoint": url,
        "tokensPerSecondPrior": children.tokens_per_second_prior(spec),
    }


def invalid(owner: Body, reason: str, message: str, now: str) -> Body:
    """The status of a resource whose spec can never work: Degraded with the reason, not Ready."""
    generation = owner["metadata"].get("generation")
    previous = list((owner.get("status") or {}).get("conditions") or [])
    return {
        "observedGeneration": generation,
        "conditions": [
            _condition("Ready", False, reason, message, generation, previous, now),
            _condition("Progressing", False, reason, "fix the spec to continue", generation, previous, now),
            _condition("Degraded", True, reason, message, generation, previous, now),
        ],
    }
