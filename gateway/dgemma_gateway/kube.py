"""The Kubernetes endpoint source: DiffusionGemma resources give the variants, the worker Services'
EndpointSlices give their pods. Both are watched (list, then watch from the list's resourceVersion,
relist on 410 Gone), over plain asyncio HTTP against the API server; no polling, no threads.

Each `DiffusionGemma` named N has a worker Service `N-worker` (operator convention); its EndpointSlices
carry `kubernetes.io/service-name: N-worker` and a port named `grpc`. `endpoints_from` is the pure
function from the watched objects to endpoints.
"""

from __future__ import annotations

import asyncio
import base64
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

from dgemma_common import variants
from dgemma_gateway.endpoints import EndpointSpec, Sink
from dgemma_gateway.types import DEFAULT_LATENCY_TARGET_MS, Variant

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "dgemma.io", "v1alpha1", "diffusiongemmas"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WORKER_SUFFIX = "-worker"
GRPC_PORT = 50051
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# tokens/s per replica until measured, by GPU profile (the operator's profiles.py holds the same priors).
PROFILE_PRIORS = {"h100": 1100.0, "rtx-pro-6000": 700.0, "dgx-spark": 150.0, "dgx-station": 800.0, "custom": 500.0}

Key = tuple[str, str]  # namespace, name


def variant_name(meta: Mapping[str, Any]) -> str:
    """`namespace/name` of a resource, as kubectl writes it: two teams' `gemma` in two namespaces stay apart."""
    return variants.variant_name(str(meta.get("namespace", "") or ""), str(meta.get("name", "")))


def variant_from_resource(obj: Mapping[str, Any]) -> Variant:
    """A DiffusionGemma resource as a routing variant (spec field names as in the CRD)."""
    meta, spec = obj.get("metadata", {}), obj.get("spec", {})
    gpu = spec.get("gpu") or {}
    gen = spec.get("generation") or {}
    profile = str(gpu.get("profile", "h100"))
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
    )


def endpoints_from(resources: Mapping[Key, Variant], slices: Mapping[Key, Mapping[str, Any]]) -> list[EndpointSpec]:
    """Ready endpoints of every variant's worker Service."""
    by_service = {(ns, f"{name}{WORKER_SUFFIX}"): v for (ns, name), v in resources.items()}
    out: dict[str, EndpointSpec] = {}
    for (ns, _), s in slices.items():
        labels = s.get("metadata", {}).get("labels") or {}
        variant = by_service.get((ns, labels.get(SERVICE_NAME_LABEL, "")))
        if variant is None:
            continue
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("name") == "grpc"), GRPC_PORT)
        for ep in s.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in (ep.get("addresses") or [])[:1]:
                host = f"[{address}]" if ":" in address else address
                endpoint_id = f"{variant.name}/{address}:{port}"
                out[endpoint_id] = EndpointSpec(endpoint_id, f"{host}:{port}", variant)
    return sorted(out.values(), key=lambda e: e.endpoint_id)


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
        self.resources: dict[Key, Variant] = {}
        self.slices: dict[Key, dict[str, Any]] = {}

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
                sink(self.name, endpoints_from(self.resources, self.slices), list(self.resources.values()))

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

            slices = {"labelSelector": SERVICE_NAME_LABEL}
            await asyncio.gather(
                *(follow(ns, path, {}, self.resources, variant_from_resource)
                  for ns, path in self._paths(f"{GROUP}/{VERSION}", PLURAL)),
                *(follow(ns, path, slices, self.slices, lambda o: o)
                  for ns, path in self._paths("discovery.k8s.io/v1", "endpointslices")),
            )


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
