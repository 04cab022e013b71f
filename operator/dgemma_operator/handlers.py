"""kopf handlers: small, typed, and thin over the pure builders in children/status and reconcile."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import ssl
import time
from typing import Any, cast

import aiohttp
import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from dgemma_common.variants import variant_name
from dgemma_operator import autoscale as scaling
from dgemma_operator import children, gateway_client, models, reconcile, settings, status
from dgemma_operator.autoscaler import ScalerState
from dgemma_operator.kube import Kube, load_config
from dgemma_operator.metrics import OperatorMetrics, observe_handler

RESOURCE = (models.GROUP, models.VERSION, models.PLURAL)
MANAGED = {"app.kubernetes.io/managed-by": children.MANAGER}
RETRYABLE_STATUS = {409, 429, 500, 502, 503, 504}
RESYNC_INTERVAL_S = 60.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# The interval is read once, at import: kopf needs it when the timer is registered.
AUTOSCALE_INTERVAL_S = settings.from_environment().autoscale_interval_s


def backoff(retry: int) -> float:
    """Exponential backoff for transient errors: 1, 2, 4 ... 60 seconds."""
    return float(min(BACKOFF_BASE_S * 2**retry, BACKOFF_MAX_S))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Operator-wide settings and the API client the handlers share."""
    settings.persistence.finalizer = f"{models.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=models.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=models.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    # `kubectl describe` shows Events as From: dgemma-operator (kopf's default says "kopf").
    settings.posting.reporting_component = children.MANAGER
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    memo.kube = Kube(load_config())


@kopf.on.startup()
async def open_gateway_client(memo: kopf.Memo, **_: Any) -> None:
    """One HTTP session for the autoscaler's calls to the gateway (trusting its CA when it serves HTTPS)."""
    ca = settings.from_environment().gateway_ca_file
    if ca is not None and not os.path.exists(ca):
        ca = None  # the chart mounts the gateway Secret's ca.crt only if it has one: a public CA is trusted anyway
    memo.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca)))


@kopf.on.startup()
def serve_metrics(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """The operator's Prometheus metrics (`dgemma_operator_*`), on the metrics port when one is set."""
    memo.metrics = OperatorMetrics()
    port = settings.from_environment().metrics_port
    if port is not None:
        bound = memo.metrics.serve("0.0.0.0", port)
        logger.info("Metrics on port %d.", bound)


@kopf.on.cleanup()
async def close_gateway_client(memo: kopf.Memo, **_: Any) -> None:
    """Close the autoscaler's HTTP session and the metrics endpoint."""
    await memo.http.close()
    memo.metrics.close()


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else the kubeconfig that KUBECONFIG names at this moment."""
    return kopf.login_with_service_account(settings=settings, **kwargs) or kopf.login_with_kubeconfig(
        settings=settings, **kwargs
    )


def _body(raw: dict[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, raw))


def _transient(error: Exception, retry: int) -> kopf.TemporaryError | None:
    if isinstance(error, ApiException) and error.status in RETRYABLE_STATUS:
        message = f"API answered {error.status} {error.reason}; retrying"
        return kopf.TemporaryError(message, delay=backoff(retry))
    if isinstance(error, urllib3.exceptions.HTTPError | TimeoutError | ConnectionError):
        message = f"API unreachable ({type(error).__name__}); retrying"
        return kopf.TemporaryError(message, delay=backoff(retry))
    return None


@kopf.index(*RESOURCE)
def variants(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """Every resource by (namespace, name), so child events find their owner without an API call."""
    return {(namespace, name): copy.deepcopy(dict(body))}


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
@observe_handler
def reconcile_variant(
    body: kopf.Body, memo: kopf.Memo, retry: int, reason: str, logger: kopf.Logger, **_: Any
) -> None:
    """Make the children match the spec and record the observed state."""
    raw = copy.deepcopy(dict(body))
    variant = variant_name(body.metadata.namespace, body.metadata.name)

    def counted(outcome: str) -> Any:
        return memo.metrics.reconciles.labels(variant, outcome)

    try:
        spec = reconcile.converge(memo.kube, raw)
    except reconcile.InvalidSpec as e:
        counted("invalid").inc()
        try:
            reconcile.record_invalid(memo.kube, raw, e)
        except ApiException as status_error:
            raise _transient(status_error, retry) or status_error from e
        kopf.warn(_body(raw), reason=e.reason, message=e.message)
        raise kopf.PermanentError(f"{e.reason}: {e.message}") from e
    except Exception as e:
        temporary = _transient(e, retry)
        counted("error" if temporary is None else "retry").inc()
        if temporary is None:
            raise
        kopf.warn(_body(raw), reason="ApiError", message=str(temporary))
        raise temporary from e
    counted("applied").inc()
    verb = {"create": "Created", "update": "Updated", "resume": "Verified"}.get(reason, "Reconciled")
    if spec.runtime == "external":
        message = f"{verb} the external API variant: nothing runs in the cluster"
    else:
        message = f"{verb} {spec.runtime} Deployment, Service and PodDisruptionBudget"
    kopf.info(_body(raw), reason=f"{verb}Workers", message=message)
    logger.info("Children applied (%s).", reason)


@kopf.timer(*RESOURCE, interval=RESYNC_INTERVAL_S, initial_delay=RESYNC_INTERVAL_S)
@observe_handler
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Level-based safety net: re-apply children and refresh the status periodically."""
    raw = copy.deepcopy(dict(body))
    try:
        reconcile.converge(memo.kube, raw)
    except reconcile.InvalidSpec as e:
        reconcile.record_invalid(memo.kube, raw, e)


@kopf.on.delete(*RESOURCE)
@observe_handler
def release(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Nothing to clean up by hand: the children go with their ownerReferences; the finalizer is released."""
    memo.metrics.forget(variant_name(body.metadata.namespace, body.metadata.name))
    kopf.info(body, reason="Deleting", message="workers are garbage-collected with the resource")
    logger.info("Released; the garbage collector removes the children.")


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == models.KIND and ref.get("controller") and ref.get("apiVersion", "").startswith(
            f"{models.GROUP}/"
        ):
            return str(ref["name"])
    return None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)  # type: ignore[arg-type]
@observe_handler
def child_changed(  # kopf's WatchingFn protocol does not know index kwargs such as `variants`

    type: str, body: kopf.Body, namespace: str | None, memo: kopf.Memo, variants: kopf.Index[Any, Any],
    logger: kopf.Logger, **_: Any,
) -> None:
    """A child changed: restore it if it drifted or vanished; refresh status when the Deployment moves."""
    owner_name = _owner(body)
    if owner_name is None or (namespace, owner_name) not in variants:
        return
    owner = next(iter(variants[namespace, owner_name]))
    if owner["metadata"].get("deletionTimestamp"):
        return
    try:
        spec = reconcile.parse_spec(owner)
    except reconcile.InvalidSpec:
        return  # the owner's handler has reported it
    kind = body.get("kind")
    desired = next(c for c in children.children(owner, spec) if c["kind"] == kind)
    drifted = type == "DELETED" or not reconcile.is_subset(
        {k: desired[k] for k in ("metadata", "spec")}, dict(body)
    )
    if drifted:
        logger.info("%s %s drifted (%s); restoring it.", kind, body["metadata"]["name"], type or "listed")
        how = "deleted" if type == "DELETED" else "changed"
        message = f"{kind} {body['metadata']['name']} was {how} by hand; restored"
        kopf.warn(_body(owner), reason="DriftCorrected", message=message)
        reconcile.converge(memo.kube, owner)
    elif kind == "Deployment":
        reconcile.refresh_status(memo.kube, owner, spec, dict(body))



def autoscaling_enabled(spec: kopf.Spec, **_: Any) -> bool:
    """Only resources with spec.autoscaling.enabled are scaled; others are left to humans, HPA or KEDA."""
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.timer(*RESOURCE, interval=AUTOSCALE_INTERVAL_S, when=autoscaling_enabled)
@observe_handler
async def autoscale(body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger,
                    **_: Any) -> None:
    """Decide the replicas from the gateway's measurements; set them through the scale subresource."""
    raw = copy.deepcopy(dict(body))
    if raw["metadata"].get("deletionTimestamp") or namespace is None:
        return
    try:
        spec = reconcile.parse_spec(raw)
    except reconcile.InvalidSpec:
        return  # the reconcile handler has reported it
    where = settings.from_environment()
    variant, problem = await gateway_client.fetch_variant(
        memo.http, where.demand_url, variant_name(namespace, name), where.gateway_timeout_s
    )
    current = status.read(raw)
    # The state lives in this resource's memo; after a restart it is read back from the status.
    state: ScalerState = memo.get("scaler_state") or scaling.state_from_status(current)
    step = scaling.plan(spec, current, variant, problem, state, time.time(), reconcile.now(),
                        raw["metadata"].get("generation"))
    if step.conditions is not None:
        # The conditions list is shared with the reconciler: written whole, so only over the version read.
        try:
            await asyncio.to_thread(memo.kube.patch_status, namespace, name,
                                    models.DiffusionGemmaStatus(conditions=step.conditions),
                                    raw["metadata"].get("resourceVersion"))
        except ApiException as e:
            if e.status != 409:
                raise
            logger.info("The resource changed while deciding; deciding again at the next tick.")
            return
    memo.scaler_state = step.state
    decision = step.status.autoscaling.last_decision if step.status.autoscaling is not None else None
    if decision is not None:
        memo.metrics.decided(variant_name(namespace, name), decision.reason, decision.desired_replicas,
                             current.ready_replicas or 0, (spec.min_replicas, spec.max_replicas), time.time())
    if step.replicas is not None:
        await asyncio.to_thread(memo.kube.scale, namespace, name, step.replicas)
        logger.info("Scaled %s -> %s replicas.", spec.replicas, step.replicas)
    await asyncio.to_thread(memo.kube.patch_status, namespace, name, step.status)
    if step.event is not None:
        kind, reason, message = step.event
        (kopf.warn if kind == "Warning" else kopf.info)(_body(raw), reason=reason, message=message)
