"""The Kubernetes endpoint source: DiffusionGemma resources give the variants, the worker Services'
EndpointSlices give their pods. Both are watched (list, then watch from the list's resourceVersion,
relist on 410 Gone), over plain asyncio HTTP against the API server; no polling, no threads.

Each `DiffusionGemma` named N has a worker Service `N-worker` (operator convention); its EndpointSlices
carry `kubernetes.io/service-name: N-worker` and a port named `grpc` (dgemma workers) or `http` (vLLM's
OpenAI server, `spec.runtime: vllm`). A resource with `spec.runtime: external` has no pods: it is one HTTP
endpoint, its API, with the key from the Secret it names. `endpoints_from` is the pure function from the
watched objects to endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from dgemma_common import vllm
from dgemma_gateway.endpoints import EndpointSpec, Sink
from dgemma_gateway.openai_upstream import HttpTarget, http_base_url
from dgemma_gateway.types import DEFAULT_LATENCY_TARGET_MS, RUNTIMES, Variant

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "dgemma.io", "v1alpha1", "diffusiongemmas"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WORKER_SUFFIX = "-worker"
GRPC_PORT = 50051
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SECRET_REFRESH_S = 60.0
# tokens/s per replica until measured, by GPU profile (the operator's profiles.py holds the same priors).
PROFILE_PRIORS = {"h100": 1100.0, "rtx-pro-6000": 700.0, "dgx-spark": 150.0, "dgx-station": 800.0, "custom": 500.0}

Key = tuple[str, str]  # namespace, name


def variant_name(meta: Mapping[str, Any]) -> str:
    """`namespace/name` of a resource, as kubectl writes it: two teams' `gemma` in two namespaces stay apart."""
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", "") or "")
    return f"{namespace}/{name}" if namespace else name


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


def resource_from(obj: Mapping[str, Any]) -> Resource:
    """A DiffusionGemma resource: its variant, its vLLM limits, its external API."""
    spec = obj.get("spec", {})
    variant = variant_from_resource(obj)
    vllm_spec = spec.get("vllm") or {}
    profile = str((spec.get("gpu") or {}).get("profile", "h100"))
    recipe = vllm.RECIPE.get(profile, vllm.RECIPE["custom"])
    external = None
    if variant.runtime == "external":
        ext = spec["external"]
        ref = ext.get("apiKeySecret")
        external = External(http_base_url(str(ext["baseURL"])), str(ext["model"]), int(ext.get("maxConcurrency", 16)),
                            (str(ref["name"]), str(ref.get("key", "token"))) if ref else None)
    return Resource(variant, int(vllm_spec.get("maxNumSeqs") or recipe.max_num_seqs),
                    int((spec.get("worker") or {}).get("maxQueue", 64)), external)


def variant_from_resource(obj: Mapping[str, Any]) -> Variant:
    """A DiffusionGemma resource as a routing variant (spec field names as in the CRD)."""
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    gpu = spec.get("gpu") or {}
    gen = spec.get("generation") or {}
    profile = str(gpu.get("profile", "h100"))
    runtime = str(spec.get("runtime", "dgemma"))
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}")
    prior = gpu.get("tokensPerSecondPrior") or (obj.get("status") or {}).get("tokensPerSecondPrior") \
        or PROFILE_PRIORS.get(profile, 500.0)
    autoscaling = spec.get("autoscaling") or {}
    # Zero replicas is a normal state when the autoscaler may go there, or when minReplicas allows it.
    from_zero = int(spec.get("minReplicas", 1)) == 0 and (
        bool(autoscaling.get("enabled")) or int(spec.get("replicas", 1)) == 0)
    return Variant(
        name=variant_name(meta),
        model=str(spec.get("servedModelName", meta.get("name", ""))),
        gpu_profile=profile,
        cost_weight=float(spec.get("costWeight", 1.0)),
        latency_target_ms=float(spec.get("latencyTargetMs", DEFAULT_LATENCY_TARGET_MS)),
        canvas_length=int(gen.get("canvasLength", 256)),
        max_denoising_steps=int(gen.get("maxDenoisingSteps", 48)),
        tokens_per_s_prior=float(prior),
        scale_from_zero=from_zero,
        runtime=runtime,
        allow_overflow=bool(spec.get("allowOverflow", False)),
    )


def endpoints_from(resources: Mapping[Key, Resource], slices: Mapping[Key, Mapping[str, Any]],
                   api_keys: Mapping[tuple[str, str, str], str] | None = None) -> list[EndpointSpec]:
    """Ready endpoints of every variant's worker Service, and every external variant's API.

    `api_keys`: (namespace, Secret name, key) -> the API key read from that Secret; an external variant whose
    Secret could not be read has no endpoint yet.
    """
    by_service = {(ns, f"{name}{WORKER_SUFFIX}"): r for (ns, name), r in resources.items()}
    out: dict[str, EndpointSpec] = {}
    for (ns, _), s in slices.items():
        labels = s.get("metadata", {}).get("labels") or {}
        resource = by_service.get((ns, labels.get(SERVICE_NAME_LABEL, "")))
        if resource is None or resource.variant.overflow:
            continue
        ports = {p.get("name"): p.get("port") for p in s.get("ports") or []}
        http = resource.variant.runtime == "vllm"
        port = ports.get("http") if http else ports.get("grpc", GRPC_PORT)
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
                    target = HttpTarget(f"http://{host}:{port}{vllm.API_PREFIX}", resource.variant.model,
                                        capacity=resource.capacity, max_queue=resource.max_queue)
                    out[endpoint_id] = EndpointSpec(endpoint_id, target.base_url, resource.variant, http=target)
                else:
                    out[endpoint_id] = EndpointSpec(endpoint_id, f"{host}:{port}", resource.variant)
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
        key = api_keys.get((namespace, *ext.secret))
        if key is None:
            return None
    target = HttpTarget(ext.base_url, ext.model, api_key=key, capacity=ext.max_concurrency, max_queue=0,
                        scrape=False)
    return EndpointSpec(f"{resource.variant.name}/{ext.base_url}", ext.base_url, resource.variant, http=target)


@dataclass(frozen=True)
class KubeConfig:
    """Where the API server is and how to authenticate."""

    server: str
    token: str | None = None
    ssl: ssl.SSLContext | bool = True
    namespace: str | None = None  # one namespace, or several separated by commas; None or "": all

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The namespaces to watch; empty means all of them."""
        return tuple(dict.fromkeys(n.strip() for n in (self.namespace or "").split(",") if n.strip()))


def _ssl_context(ca_file: str | None, ca_data: str | None, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file, cadata=base64.b64decode(ca_data).decode() if ca_data else None)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def load_kube_config(namespace: str | None = None) -> KubeConfig:
    """In-cluster service account if present, else $KUBECONFIG / ~/.kube/config (current context).

    `namespace`: one or several (comma-separated) to watch; none means all namespaces, as the chart's
    cluster-wide RBAC and the operator assume (a namespaced install names its namespaces).
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return KubeConfig(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(),
                          _ssl_context(str(SA_DIR / "ca.crt"), None, None), namespace)
    path = Path(os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))).expanduser()
    cfg = yaml.safe_load(path.read_text())
    ctx_name = cfg.get("current-context")
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next((u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {}) or {}
    server = cluster["server"]
    ssl_opt: ssl.SSLContext | bool = True
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            ssl_opt = False
        else:
            cert = None
            if user.get("client-certificate") and user.get("client-key"):
                cert = (user["client-certificate"], user["client-key"])
            elif user.get("client-certificate-data") and user.get("client-key-data"):
                files = []
                for key in ("client-certificate-data", "client-key-data"):
                    f = tempfile.NamedTemporaryFile(delete=False, suffix=".pem")  # noqa: SIM115
                    f.write(base64.b64decode(user[key]))
                    f.close()
                    files.append(f.name)
                cert = (files[0], files[1])
            ssl_opt = _ssl_context(cluster.get("certificate-authority"), cluster.get("certificate-authority-data"),
                                   cert)
    return KubeConfig(server.rstrip("/"), user.get("token"), ssl_opt, namespace)


class KubernetesSource:
    """Watches DiffusionGemma resources and EndpointSlices; reports the variants' ready worker pods."""

    def __init__(self, config: KubeConfig, name: str = "kubernetes") -> None:
        self.name = name
        self.config = config
        self.resources: dict[Key, Resource] = {}
        self.slices: dict[Key, dict[str, Any]] = {}
        self.api_keys: dict[tuple[str, str, str], str] = {}  # (namespace, Secret, key) -> an external API's key
        self._resources_changed = asyncio.Event()

    @classmethod
    def from_environment(cls, namespace: str | None = None) -> KubernetesSource:
        """From the pod's service account or the local kubeconfig."""
        return cls(load_kube_config(namespace))

    def _paths(self, group_version: str, plural: str) -> list[tuple[str | None, str]]:
        """(namespace, collection path) per watched namespace; (None, the cluster-wide path) for all."""
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        if not self.config.namespaces:
            return [(None, f"{base}/{plural}")]
        return [(ns, f"{base}/namespaces/{ns}/{plural}") for ns in self.config.namespaces]

    async def run(self, sink: Sink) -> None:
        """Watch both kinds until cancelled; report after every change."""
        headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
        connector = aiohttp.TCPConnector(ssl=self.config.ssl)
        async with aiohttp.ClientSession(self.config.server, headers=headers, connector=connector) as session:

            def report() -> None:
                self._resources_changed.set()
                sink(self.name, endpoints_from(self.resources, self.slices, self.api_keys),
                     [r.variant for r in self.resources.values()])

            async def follow(
                namespace: str | None, path: str, params: dict[str, str], store: dict[Key, Any], convert: Any
            ) -> None:
                async for kind, obj in watch(session, path, params):
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
                            log.warning("ignoring %s %s/%s: %s", path, *key, exc)
                            continue
                    report()

            async def refresh_keys() -> None:
                # External variants' API keys: read when a resource changes, and again every minute (rotation).
                while True:
                    keys = await read_api_keys(session, self.resources)
                    if keys != self.api_keys:
                        self.api_keys = keys
                        report()
                    self._resources_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._resources_changed.wait(), SECRET_REFRESH_S)

            slices = {"labelSelector": SERVICE_NAME_LABEL}
            await asyncio.gather(
                *(follow(ns, path, {}, self.resources, resource_from)
                  for ns, path in self._paths(f"{GROUP}/{VERSION}", PLURAL)),
                *(follow(ns, path, slices, self.slices, lambda o: o)
                  for ns, path in self._paths("discovery.k8s.io/v1", "endpointslices")),
                refresh_keys(),
            )


async def read_api_keys(session: aiohttp.ClientSession, resources: Mapping[Key, Resource]
                        ) -> dict[tuple[str, str, str], str]:
    """The API keys the external variants name, from their Secrets (`get` on those Secrets only: the chart's
    gateway.externalApiKeySecrets); a Secret that cannot be read leaves its variant without an endpoint."""
    wanted = {(ns, *r.external.secret) for (ns, _), r in resources.items() if r.external and r.external.secret}
    keys: dict[tuple[str, str, str], str] = {}
    for namespace, name, key in sorted(wanted):
        try:
            async with session.get(f"/api/v1/namespaces/{namespace}/secrets/{name}") as r:
                if r.status != 200:
                    log.warning("cannot read Secret %s/%s for an external API key: HTTP %s", namespace, name, r.status)
                    continue
                data = (await r.json()).get("data") or {}
            value = base64.b64decode(str(data.get(key, ""))).decode(errors="replace").strip()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # binascii.Error is a ValueError
            log.warning("cannot read Secret %s/%s for an external API key: %s", namespace, name, exc)
            continue
        if value:
            keys[(namespace, name, key)] = value
        else:
            log.warning("Secret %s/%s has no key %r for an external API", namespace, name, key)
    return keys


async def watch(session: aiohttp.ClientSession, path: str, params: Mapping[str, str],
                timeout_s: int = 300) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """List, then watch from the list's resourceVersion; on expiry or error, relist (yielding RESET)."""
    backoff = 0.2
    while True:
        try:
            async with session.get(path, params=dict(params)) as r:
                r.raise_for_status()
                listed = await r.json()
            yield "RESET", {}
            for item in listed.get("items", []):
                yield "ADDED", item
            version = listed.get("metadata", {}).get("resourceVersion", "")
            backoff = 0.2
            while True:
                q = {**params, "watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": str(timeout_s)}
                async with session.get(path, params=q, timeout=aiohttp.ClientTimeout(total=None,
                                                                                     sock_read=timeout_s + 30)) as r:
                    r.raise_for_status()
                    gone = False
                    async for line in r.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            gone = obj.get("code") == 410
                            break
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            yield kind, obj
                    if gone:
                        break  # relist
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("watch %s failed: %s; retrying in %.1f s", path, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(10.0, backoff * 2)
