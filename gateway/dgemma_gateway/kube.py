"""The Kubernetes endpoint source: DiffusionGemma resources give the variants, the worker Services'
EndpointSlices give their pods. Both are watched (list, then watch from the list's resourceVersion,
relist on 410 Gone) through kubernetes_asyncio, so the gateway authenticates as other controllers do:

- in a pod, with its service account, whose token file is re-read as the kubelet rotates it (bound tokens
  expire within the hour);
- outside one, with the current kubeconfig context: tokens, client certificates, exec plugins (EKS, GKE,
  OIDC login helpers) renewed as they expire, OIDC auth providers.

The library keeps client certificates and keys given inline (`client-key-data`) in temporary files for the
process's life and removes them when it exits.

Each `DiffusionGemma` named N has a worker Service `N-worker`; its EndpointSlices carry
`kubernetes.io/service-name: N-worker` and a port named `grpc` (dgemma workers) or `http` (vLLM's OpenAI
server, `spec.runtime: vllm`): the names the operator gives, from `dgemma_common.naming`. A resource with
`spec.runtime: external` has no pods: it is one HTTP endpoint, its API, with the key from the Secret it names.
A resource with `spec.worker.apiKeySecret` has workers that require a key: the gateway reads the same Secret and
presents it on every call (gRPC metadata to dgemma workers, `Authorization: Bearer` to vLLM pods); Secrets are
read again every minute and whenever a resource changes. `endpoints_from` is the pure function from the watched
objects to endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi, DiscoveryV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from dgemma_common import naming, variants, vllm
from dgemma_common.auth import first_key
from dgemma_gateway.endpoints import EndpointSpec, Sink
from dgemma_gateway.openai_upstream import HttpTarget, http_base_url
from dgemma_gateway.types import Variant

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECRET_REFRESH_S = 60.0
# The API server ends a watch after this long; the client then resumes from the last resourceVersion.
WATCH_TIMEOUT_S = 300
LIST_TIMEOUT_S = 60
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0

Key = tuple[str, str]  # namespace, name


def variant_name(meta: Mapping[str, Any]) -> str:
    """`namespace/name` of a resource, as kubectl writes it: two teams' `gemma` in two namespaces stay apart."""
    return variants.variant_name(str(meta.get("namespace", "") or ""), str(meta.get("name", "")))


@dataclass(frozen=True)
class External:
    """What an external variant's resource says of its API (`spec.external`)."""

    base_url: str
    model: str
    max_concurrency: int
    secret: tuple[str, str] | None  # (Secret name, key) of the API key, in the resource's namespace


@dataclass(frozen=True)
class Resource:
    """A DiffusionGemma resource as the gateway uses it: its variant, and how to talk to its endpoints."""

    variant: Variant
    capacity: int  # requests one vLLM replica runs at once (--max-num-seqs)
    max_queue: int  # more that may wait there (spec.worker.maxQueue)
    external: External | None = None
    worker_key: tuple[str, str] | None = None  # (Secret name, key) of the key its workers require

    @property
    def secrets(self) -> list[tuple[str, str]]:
        """The (Secret, key) pairs holding keys the gateway presents for this variant."""
        return [ref for ref in (self.worker_key, self.external.secret if self.external else None) if ref]


def resource_from(obj: Mapping[str, Any]) -> Resource:
    """A DiffusionGemma resource: its variant (the typed read), its vLLM limits, its external API."""
    spec = obj.get("spec", {})
    variant = variant_from_resource(obj)
    vllm_spec = spec.get("vllm") or {}
    recipe = vllm.RECIPE.get(variant.gpu_profile, vllm.RECIPE["custom"])
    worker = spec.get("worker") or {}
    external = None
    if variant.runtime == "external":
        ext = spec["external"]
        external = External(http_base_url(str(ext["baseURL"])), str(ext["model"]), int(ext.get("maxConcurrency", 16)),
                            _secret_ref(ext.get("apiKeySecret")))
    return Resource(variant, int(vllm_spec.get("maxNumSeqs") or recipe.max_num_seqs), int(worker.get("maxQueue", 64)),
                    external, None if external else _secret_ref(worker.get("apiKeySecret")))


def _secret_ref(ref: Mapping[str, Any] | None) -> tuple[str, str] | None:
    return (str(ref["name"]), str(ref.get("key", "token"))) if ref else None


def presented_key(value: str) -> str | None:
    """The key the gateway presents, from a Secret's value, by the one rule of every key file
    (`dgemma_common.auth`): its first key, without the newline an echoed file leaves. Its dgemma workers accept
    every key listed (a new key beside the old one rotates without a refusal); vLLM pods are started with the
    first (the operator's launcher reads the mounted Secret by the same rule)."""
    return first_key(value)


def variant_from_resource(obj: Mapping[str, Any]) -> Variant:
    """A DiffusionGemma resource as a routing variant (read as `dgemma_common.variants` reads it)."""
    v = variants.read_variant(obj)
    return Variant(
        name=v.name,
        model=v.served_model_name,
        gpu_profile=v.gpu_profile,
        cost_weight=v.cost_weight,
        latency_target_ms=v.latency_target_ms,
        canvas_length=v.canvas_length,
        max_denoising_steps=v.max_denoising_steps,
        tokens_per_s_prior=v.tokens_per_second_prior,
        scale_from_zero=v.scale_from_zero,
        runtime=v.runtime,
        allow_overflow=v.allow_overflow,
    )


def endpoints_from(resources: Mapping[Key, Resource], slices: Mapping[Key, Mapping[str, Any]],
                   api_keys: Mapping[tuple[str, str, str], str] | None = None) -> list[EndpointSpec]:
    """Ready endpoints of every variant's worker Service, and every external variant's API.

    `api_keys`: (namespace, Secret name, key) -> the value read from that Secret; a variant whose key Secret could
    not be read has no endpoint yet (its workers would refuse every call).
    """
    by_service = {(ns, naming.worker_service(name)): r for (ns, name), r in resources.items()}
    out: dict[str, EndpointSpec] = {}
    for (ns, _), s in slices.items():
        labels = s.get("metadata", {}).get("labels") or {}
        resource = by_service.get((ns, labels.get(naming.SERVICE_NAME_LABEL, "")))
        if resource is None or resource.variant.overflow:
            continue
        key = None
        if resource.worker_key is not None:
            key = presented_key((api_keys or {}).get((ns, *resource.worker_key), ""))
            if key is None:
                continue
        ports = {p.get("name"): p.get("port") for p in s.get("ports") or []}
        http = resource.variant.runtime == "vllm"
        port = ports.get(naming.HTTP_PORT_NAME) if http else ports.get(naming.GRPC_PORT_NAME, naming.WORKER_GRPC_PORT)
        if port is None:
            continue  # a slice of the Service's other ports
        for ep in s.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in (ep.get("addresses") or [])[:1]:
                host = f"[{address}]" if ":" in address else address
                endpoint_id = f"{resource.variant.name}/{address}:{port}"
                if http:
                    target = HttpTarget(f"http://{host}:{port}{vllm.API_PREFIX}", resource.variant.model, api_key=key,
                                        capacity=resource.capacity, max_queue=resource.max_queue)
                    out[endpoint_id] = EndpointSpec(endpoint_id, target.base_url, resource.variant, http=target)
                else:
                    out[endpoint_id] = EndpointSpec(endpoint_id, f"{host}:{port}", resource.variant, api_key=key)
    for (ns, _), resource in resources.items():
        spec = external_endpoint(ns, resource, api_keys or {})
        if spec is not None:
            out[spec.endpoint_id] = spec
    return sorted(out.values(), key=lambda e: e.endpoint_id)


def external_endpoint(namespace: str, resource: Resource, api_keys: Mapping[tuple[str, str, str], str]
                      ) -> EndpointSpec | None:
    """An external variant's API as an endpoint (None for other runtimes, or while its key is unknown)."""
    ext = resource.external
    if ext is None:
        return None
    key = None
    if ext.secret is not None:
        key = presented_key(api_keys.get((namespace, *ext.secret), ""))
        if key is None:
            return None
    target = HttpTarget(ext.base_url, ext.model, api_key=key, capacity=ext.max_concurrency, max_queue=0,
                        scrape=False)
    return EndpointSpec(f"{resource.variant.name}/{ext.base_url}", ext.base_url, resource.variant, http=target)


def parse_namespaces(namespace: str | None) -> tuple[str, ...]:
    """One namespace, or several separated by commas; none (or "") means all of them."""
    return tuple(dict.fromkeys(n.strip() for n in (namespace or "").split(",") if n.strip()))


# ---- credentials ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """How to reach the API server: the client configuration, and for credentials that expire (exec plugins,
    GCP) the loop that renews them in it while the source runs."""

    configuration: Configuration
    renew: Callable[[], Coroutine[Any, Any, None]] | None = None


async def in_cluster(sa_dir: Path = SA_DIR, environ: Mapping[str, str] = os.environ) -> Access:
    """The pod's service account; its token is re-read from the file once it is a minute old."""
    configuration = Configuration()
    loader = InClusterConfigLoader(str(sa_dir / "token"), str(sa_dir / "ca.crt"), try_refresh_token=True,
                                   environ=dict(environ))
    loader.load_and_set(configuration)
    return Access(configuration)


async def from_kubeconfig(path: str | None = None, context: str | None = None) -> Access:
    """A kubeconfig context: `path` (several joined by ':' are merged), else $KUBECONFIG, else ~/.kube/config."""
    # Read KUBECONFIG now: the library reads it once, at import.
    path = path or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    configuration = Configuration()
    loader = await kube_config.load_kube_config(
        config_file=path, context=context, client_configuration=configuration, persist_config=False)
    if not (loader.current_context or {}).get("context", {}).get("user"):
        return Access(configuration)

    async def renew() -> None:
        # Re-runs an exec plugin (or refreshes a GCP token) as it expires; returns at once for other users.
        try:
            await kube_config.refresh_token(loader, configuration)
        except (ConfigException, OSError, ValueError, TypeError) as exc:
            # The current credentials keep working until they expire; the API's 401s then say so.
            log.error("renewing the kubeconfig credentials failed: %s", exc)

    return Access(configuration, renew)


async def from_environment() -> Access:
    """In a pod, its service account; elsewhere the kubeconfig."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        return await in_cluster()
    return await from_kubeconfig()


# ---- watching ---------------------------------------------------------------------------------------------

ListFn = Callable[..., Awaitable[Any]]


async def list_then_watch(
    client: ApiClient, list_fn: ListFn, timeout_s: int = WATCH_TIMEOUT_S, **params: str,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """List, then watch from the list's resourceVersion, resuming where each watch ended; on 410 Gone or an
    error, list again (yielding RESET first). Objects come as the API's JSON dicts."""
    call = list_fn.func if isinstance(list_fn, functools.partial) else list_fn
    what = f"{getattr(call, '__name__', call)}{getattr(list_fn, 'args', ())}"
    backoff = BACKOFF_MIN_S
    while True:
        try:
            listed = client.sanitize_for_serialization(await list_fn(**params,
                                                                     _request_timeout=LIST_TIMEOUT_S))
            yield "RESET", {}
            for item in listed.get("items") or []:
                yield "ADDED", item
            version = (listed.get("metadata") or {}).get("resourceVersion")
            backoff = BACKOFF_MIN_S
            while True:
                # return_type "object": events stay dicts, not the client's model classes.
                async with watch.Watch(return_type="object") as w:
                    stream = w.stream(list_fn, **params, resource_version=version,
                                      allow_watch_bookmarks=True, timeout_seconds=timeout_s,
                                      _request_timeout=aiohttp.ClientTimeout(sock_read=timeout_s + 30))
                    async for event in stream:
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            yield event["type"], event["raw_object"]
                    version = w.resource_version or version
        except asyncio.CancelledError:
            raise
        except ApiException as exc:
            if exc.status == 410:  # the resourceVersion is too old: list again
                log.info("watch %s expired; listing again", what)
                continue
            log.warning("watch %s failed: %s %s; retrying in %.1f s", what, exc.status, exc.reason, backoff)
        except (aiohttp.ClientError, TimeoutError, ValueError, ConfigException) as exc:
            log.warning("watch %s failed: %s; retrying in %.1f s", what, exc, backoff)
        await asyncio.sleep(backoff)
        backoff = min(BACKOFF_MAX_S, backoff * 2)


class KubernetesSource:
    """Watches DiffusionGemma resources and EndpointSlices; reports the variants' ready worker pods."""

    def __init__(self, access: Callable[[], Awaitable[Access]] = from_environment, namespace: str | None = None,
                 name: str = "kubernetes") -> None:
        self.name = name
        self.access = access
        self.namespaces = parse_namespaces(namespace)
        self.resources: dict[Key, Resource] = {}
        self.slices: dict[Key, dict[str, Any]] = {}
        self.api_keys: dict[tuple[str, str, str], str] = {}  # (namespace, Secret, key) -> its value
        self._resources_changed = asyncio.Event()

    @classmethod
    def from_environment(cls, namespace: str | None = None) -> KubernetesSource:
        """From the pod's service account or the local kubeconfig."""
        return cls(from_environment, namespace)

    async def run(self, sink: Sink) -> None:
        """Watch both kinds until cancelled; report after every change."""
        access = await self.access()
        async with ApiClient(access.configuration) as client:
            custom, discovery, core = CustomObjectsApi(client), DiscoveryV1Api(client), CoreV1Api(client)

            def report() -> None:
                self._resources_changed.set()
                sink(self.name, endpoints_from(self.resources, self.slices, self.api_keys),
                     [r.variant for r in self.resources.values()])

            async def follow(namespace: str | None, events: AsyncIterator[tuple[str, dict[str, Any]]],
                             store: dict[Key, Any], convert: Callable[[dict[str, Any]], Any]) -> None:
                async for kind, obj in events:
                    if kind == "RESET":  # a relist replaces what this watch (its namespace) knew
                        for key in [k for k in store if namespace is None or k[0] == namespace]:
                            del store[key]
                        continue
                    meta = obj.get("metadata", {})
                    key = (meta.get("namespace", ""), meta.get("name", ""))
                    if kind == "DELETED":
                        store.pop(key, None)
                    else:
                        try:
                            store[key] = convert(obj)
                        except (TypeError, ValueError, KeyError) as exc:
                            log.warning("ignoring %s %s/%s: %s", obj.get("kind", "object"), *key, exc)
                            continue
                    report()

            def keep(obj: dict[str, Any]) -> dict[str, Any]:
                return obj

            async def refresh_keys() -> None:
                # The keys the variants name (their workers', external APIs'): read when a resource changes, and
                # again every minute (rotation).
                while True:
                    keys = await read_api_keys(core, self.resources)
                    if keys != self.api_keys:
                        self.api_keys = keys
                        report()
                    self._resources_changed.clear()
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner result when it
                    # completes as the task is cancelled, swallowing the cancellation (this loop then waited again
                    # and the gateway's stop hung on it).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SECRET_REFRESH_S):
                            await self._resources_changed.wait()

            # A TaskGroup: if one watch fails past its own retries, the others stop too and the gateway
            # restarts the source whole.
            scopes: list[tuple[str | None, ListFn, ListFn]]
            if self.namespaces:
                scopes = [(ns, functools.partial(custom.list_namespaced_custom_object, naming.GROUP,
                                                 naming.VERSION, ns, naming.PLURAL),
                           functools.partial(discovery.list_namespaced_endpoint_slice, ns))
                          for ns in self.namespaces]
            else:
                scopes = [(None, functools.partial(custom.list_cluster_custom_object, naming.GROUP, naming.VERSION,
                                                   naming.PLURAL),
                           functools.partial(discovery.list_endpoint_slice_for_all_namespaces))]
            async with asyncio.TaskGroup() as tasks:
                for ns, list_resources, list_slices in scopes:
                    tasks.create_task(follow(ns, list_then_watch(client, list_resources), self.resources,
                                             resource_from))
                    tasks.create_task(follow(ns, list_then_watch(client, list_slices,
                                                                 label_selector=naming.SERVICE_NAME_LABEL),
                                             self.slices, keep))
                tasks.create_task(refresh_keys())
                if access.renew is not None:
                    tasks.create_task(access.renew())


async def read_api_keys(core: CoreV1Api, resources: Mapping[Key, Resource]) -> dict[tuple[str, str, str], str]:
    """The values of the Secrets holding the keys the variants name: their workers' (spec.worker.apiKeySecret) and
    external APIs' (spec.external.apiKeySecret). `get` on those Secrets only (the chart's gateway.apiKeySecrets); a
    Secret that cannot be read leaves its variant without endpoints."""
    wanted = {(ns, *ref) for (ns, _), r in resources.items() for ref in r.secrets}
    values: dict[tuple[str, str, str], str] = {}
    for namespace, name, key in sorted(wanted):
        try:
            secret = await core.read_namespaced_secret(name, namespace, _request_timeout=LIST_TIMEOUT_S)
            value = base64.b64decode(str((secret.data or {}).get(key, ""))).decode(errors="replace")
        except ApiException as exc:
            log.warning("cannot read Secret %s/%s for an API key: %s %s", namespace, name, exc.status, exc.reason)
            continue
        except (aiohttp.ClientError, TimeoutError, binascii.Error) as exc:
            log.warning("cannot read Secret %s/%s for an API key: %s", namespace, name, exc)
            continue
        if presented_key(value) is None:
            log.warning("Secret %s/%s holds no key under key %r", namespace, name, key)
            continue
        values[(namespace, name, key)] = value
    return values
