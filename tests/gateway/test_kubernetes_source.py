"""The Kubernetes source: pure mapping from resources and EndpointSlices, and real watches over HTTP
against a small API-server stand-in, feeding a gateway in front of a real worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dgemma_gateway.kube import KubeConfig, KubernetesSource, endpoints_from, resource_from, variant_from_resource
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway

pytestmark = pytest.mark.timeout(120)


def resource(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "dgemma.io/v1alpha1", "kind": "DiffusionGemma",
            "metadata": {"name": name, "namespace": "ml", "resourceVersion": "1"},
            "spec": {"servedModelName": MODEL, "image": "x", "model": {"pvc": {"claimName": "c"}}, **spec}}


def endpoint_slice(name: str, service: str, addresses: list[tuple[str, bool]], port: int = 50051) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "ml", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a, ready in addresses]}


def test_a_resource_becomes_a_variant_with_its_cost_target_profile_and_canvas() -> None:
    v = variant_from_resource(resource("spark", gpu={"profile": "dgx-spark"}, costWeight=0.3, latencyTargetMs=900,
                                       generation={"canvasLength": 128, "maxDenoisingSteps": 32}))
    assert (v.name, v.model, v.gpu_profile, v.cost_weight, v.latency_target_ms) == ("ml/spark", MODEL, "dgx-spark",
                                                                                      0.3, 900.0)
    assert (v.canvas_length, v.max_denoising_steps, v.tokens_per_s_prior) == (128, 32, 150.0)


def test_ready_pods_of_each_variants_worker_service_become_endpoints() -> None:
    resources = {("ml", "a"): resource_from(resource("a")), ("ml", "b"): resource_from(resource("b"))}
    slices = {
        ("ml", "a-worker-x1"): endpoint_slice("a-worker-x1", "a-worker", [("10.0.0.1", True), ("10.0.0.2", False)]),
        ("ml", "b-worker-x1"): endpoint_slice("b-worker-x1", "b-worker", [("10.0.0.3", True)], port=6000),
        ("ml", "other"): endpoint_slice("other", "unrelated", [("10.0.0.9", True)]),
    }
    eps = endpoints_from(resources, slices)
    assert [(e.address, e.variant.name) for e in eps] == [("10.0.0.1:50051", "ml/a"), ("10.0.0.3:6000", "ml/b")]
    assert [e.endpoint_id for e in eps] == ["ml/a/10.0.0.1:50051", "ml/b/10.0.0.3:6000"]


class FakeApiServer:
    """Lists and watch streams for DiffusionGemmas and EndpointSlices, fed from the test."""

    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = {"diffusiongemmas": [], "endpointslices": []}
        self.queues: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {"diffusiongemmas": [], "endpointslices": []}
        self.app = web.Application()
        self.app.router.add_get("/apis/dgemma.io/v1alpha1/namespaces/ml/diffusiongemmas", self.handle)
        self.app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices", self.handle)
        self.auth: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        plural = request.path.rsplit("/", 1)[1]
        self.auth.append(request.headers.get("Authorization", ""))
        if request.query.get("watch") != "true":
            return web.json_response({"items": self.objects[plural], "metadata": {"resourceVersion": "1"}})
        resp = web.StreamResponse()
        await resp.prepare(request)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues[plural].append(q)
        while True:
            await resp.write((json.dumps(await q.get()) + "\n").encode())

    def send(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        for q in self.queues[plural]:
            q.put_nowait({"type": kind, "object": obj})


@pytest.fixture
def api_and_gateway(pool: Pool) -> Iterator[tuple[FakeApiServer, RunningGateway]]:
    api = FakeApiServer()
    host, port = pool.fast[0].address.split(":")
    api.objects["diffusiongemmas"].append(resource("cpu", costWeight=1.5))
    api.objects["endpointslices"].append(endpoint_slice("cpu-worker-1", "cpu-worker", [(host, True)], int(port)))
    g = RunningGateway([])
    runner = web.AppRunner(api.app, handler_cancellation=True, shutdown_timeout=1.0)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    api_port = g.call(start())
    source = KubernetesSource(KubeConfig(f"http://127.0.0.1:{api_port}", token="t0ken", ssl=False, namespace="ml"))

    async def attach() -> None:
        g.gateway._tasks.append(asyncio.create_task(g.gateway._run_source(source)))

    g.call(attach())
    try:
        yield api, g
    finally:
        try:
            g.call(g.gateway.stop())  # ends the watches first
            g.call(runner.cleanup())
        finally:
            g.close()


def test_the_gateway_follows_resources_and_endpoint_slices_through_watches(
    api_and_gateway: tuple[FakeApiServer, RunningGateway],
) -> None:
    api, g = api_and_gateway
    g.wait_ready(1, timeout=30)
    assert api.auth[0] == "Bearer t0ken"
    (endpoint,) = g.gateway.registry.endpoints.values()
    assert endpoint.spec.variant.cost_weight == 1.5 and endpoint.spec.variant.model == MODEL

    async def ask() -> tuple[int, str]:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "max_denoising_steps": 1}
        async with aiohttp.ClientSession() as s, s.post(f"{g.url}/v1/completions", json=body) as r:
            return r.status, r.headers.get("x-dgemma-variant", "")

    assert asyncio.run(ask()) == (200, "ml/cpu")
    # The pod goes unready: the slice changes, the endpoint goes.
    host, port = endpoint.spec.address.split(":")
    g.loop.call_soon_threadsafe(api.send, "endpointslices", "MODIFIED",
                                endpoint_slice("cpu-worker-1", "cpu-worker", [(host, False)], int(port)))
    deadline = time.monotonic() + 10
    while g.gateway.registry.endpoints and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not g.gateway.registry.endpoints
    # The resource is deleted: its model is gone too.
    g.loop.call_soon_threadsafe(api.send, "diffusiongemmas", "DELETED", resource("cpu"))
    deadline = time.monotonic() + 10
    while g.gateway.models() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert g.gateway.models() == []


def test_a_resource_that_may_have_no_replica_is_a_variant_that_scales_from_zero() -> None:
    autoscaled = resource("a", minReplicas=0, replicas=1, autoscaling={"enabled": True})
    assert variant_from_resource(autoscaled).scale_from_zero
    assert variant_from_resource(resource("b", minReplicas=0, replicas=0)).scale_from_zero
    assert not variant_from_resource(resource("c", autoscaling={"enabled": True})).scale_from_zero  # minReplicas 1


def test_the_source_watches_the_namespaces_it_is_given_or_all_of_them(k8s: Any) -> None:
    """Against the Kubernetes API emulator: 'a,b' sees variants in a and b only; no namespace sees all."""
    k8s.kubectl("apply", "-f", "deploy/crds/dgemma.io_diffusiongemmas.yaml")
    for ns in ("a", "b", "c"):
        k8s.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": ns}}))
        doc = resource(f"variant-{ns}")
        doc["metadata"] = {"name": f"variant-{ns}", "namespace": ns}
        k8s.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def seen(namespace: str | None) -> set[str]:
        variants: set[str] = set()

        def sink(name: str, endpoints: Any, found: Any = None) -> None:
            variants.update(v.name for v in found or ())

        async def run() -> None:
            source = KubernetesSource(KubeConfig(k8s.url, token="emulator", ssl=False, namespace=namespace))
            task = asyncio.create_task(source.run(sink))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(variants) < (3 if not namespace else 2):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # anything from a namespace it should not see would have come by now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(run())
        return variants

    assert seen("a,b") == {"a/variant-a", "b/variant-b"}
    assert seen(" c ") == {"c/variant-c"}
    assert seen(None) == {"a/variant-a", "b/variant-b", "c/variant-c"}
