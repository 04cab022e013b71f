"""The Kubernetes source: the pure mapping from resources and EndpointSlices, and real watches through
kubernetes_asyncio against the project's Kubernetes API emulator, with the credentials a cluster hands out
(a rotating service-account token, an exec plugin, a client certificate)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio.config import incluster_config

from dgemma_gateway.endpoints import EndpointSpec
from dgemma_gateway.kube import (
    KubernetesSource,
    endpoints_from,
    from_kubeconfig,
    in_cluster,
    resource_from,
    variant_from_resource,
)
from dgemma_serve.lifetime import die_with_parent
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway
from tests.k8s_emulator import EmulatorThread

pytestmark = pytest.mark.timeout(120)
CRD = "deploy/crds/dgemma.io_diffusiongemmas.yaml"


def resource(name: str, namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "dgemma.io/v1alpha1", "kind": "DiffusionGemma",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"servedModelName": MODEL, "image": "x", "model": {"pvc": {"claimName": "c"}}, **spec}}


def endpoint_slice(name: str, service: str, addresses: list[tuple[str, bool]], port: int = 50051) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "ml", "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a, ready in addresses]}


def apply(k8s: EmulatorThread, *docs: dict[str, Any]) -> None:
    for doc in docs:
        k8s.kubectl("apply", "-f", "-", input=json.dumps(doc))


def namespaces(k8s: EmulatorThread, *names: str) -> None:
    apply(k8s, *({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names))


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


class Seen:
    """A source running on its own loop in a thread, and what it reported last."""

    def __init__(self, source: KubernetesSource) -> None:
        self.endpoints: list[EndpointSpec] = []
        self.variants: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(source.run(self.sink))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def sink(self, name: str, endpoints: Any, found: Any = None) -> None:
        self.endpoints = list(endpoints)
        self.variants = {v.name for v in found or ()}

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        deadline = time.monotonic() + 10
        while not self.task.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped = self.task.done()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        # A gateway stops its sources by cancelling them: one that swallows the cancellation holds up its exit.
        assert stopped, "the source did not stop when it was cancelled"


@pytest.fixture
def watching() -> Iterator[Callable[[KubernetesSource], Seen]]:
    running: list[Seen] = []

    def start(source: KubernetesSource) -> Seen:
        running.append(Seen(source))
        return running[-1]

    yield start
    for seen in running:
        seen.stop()


# ---- the pure mapping ---------------------------------------------------------------------------------------


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


def test_a_resource_that_may_have_no_replica_is_a_variant_that_scales_from_zero() -> None:
    autoscaled = resource("a", minReplicas=0, replicas=1, autoscaling={"enabled": True})
    assert variant_from_resource(autoscaled).scale_from_zero
    assert variant_from_resource(resource("b", minReplicas=0, replicas=0)).scale_from_zero
    assert not variant_from_resource(resource("c", autoscaling={"enabled": True})).scale_from_zero  # minReplicas 1


# ---- watches against the emulator ---------------------------------------------------------------------------


def test_the_gateway_follows_resources_and_endpoint_slices_through_watches(pool: Pool, k8s: EmulatorThread) -> None:
    k8s.kubectl("apply", "-f", CRD)
    namespaces(k8s, "ml")
    host, port = pool.fast[0].address.split(":")
    apply(k8s, resource("cpu", costWeight=1.5),
          endpoint_slice("cpu-worker-1", "cpu-worker", [(host, True)], int(port)))
    g = RunningGateway([KubernetesSource(functools.partial(from_kubeconfig, k8s.kubeconfig), "ml")])
    try:
        g.wait_ready(1, timeout=30)
        assert "Bearer emulator" in k8s.authorizations()
        (endpoint,) = g.gateway.registry.endpoints.values()
        assert endpoint.spec.variant.cost_weight == 1.5 and endpoint.spec.variant.model == MODEL

        async def ask() -> tuple[int, str]:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "max_denoising_steps": 1}
            async with aiohttp.ClientSession() as s, s.post(f"{g.url}/v1/completions", json=body) as r:
                return r.status, r.headers.get("x-dgemma-variant", "")

        assert asyncio.run(ask()) == (200, "ml/cpu")
        # The pod goes unready: the slice changes, the endpoint goes.
        apply(k8s, endpoint_slice("cpu-worker-1", "cpu-worker", [(host, False)], int(port)))
        assert wait_for(lambda: not g.gateway.registry.endpoints)
        # The resource is deleted: its model is gone too.
        k8s.kubectl("delete", "-n", "ml", "dgm", "cpu")
        assert wait_for(lambda: g.gateway.models() == [])
    finally:
        g.close()


def test_the_source_watches_the_namespaces_it_is_given_or_all_of_them(
    k8s: EmulatorThread, watching: Callable[[KubernetesSource], Seen],
) -> None:
    """'a,b' sees variants in a and b only; no namespace sees all."""
    k8s.kubectl("apply", "-f", CRD)
    namespaces(k8s, "a", "b", "c")
    apply(k8s, *(resource(f"variant-{ns}", ns) for ns in ("a", "b", "c")))
    access = functools.partial(from_kubeconfig, k8s.kubeconfig)
    some, one, every = (watching(KubernetesSource(access, ns)) for ns in ("a,b", " c ", None))
    assert wait_for(lambda: len(every.variants) == 3 and len(some.variants) == 2 and len(one.variants) == 1)
    time.sleep(0.2)  # anything from a namespace it should not see would have come by now
    assert some.variants == {"a/variant-a", "b/variant-b"}
    assert one.variants == {"c/variant-c"}
    assert every.variants == {"a/variant-a", "b/variant-b", "c/variant-c"}


def test_a_watch_whose_history_is_gone_lists_again(
    k8s: EmulatorThread, watching: Callable[[KubernetesSource], Seen],
) -> None:
    """410 Gone (etcd compacted the watch's resourceVersion away): the source lists again and misses nothing."""
    k8s.kubectl("apply", "-f", CRD)
    namespaces(k8s, "ml")
    apply(k8s, resource("first"))
    seen = watching(KubernetesSource(functools.partial(from_kubeconfig, k8s.kubeconfig), "ml"))
    assert wait_for(lambda: seen.variants == {"ml/first"})

    def lists() -> int:
        return k8s.call(lambda: sum(1 for r in k8s.handler if r.method.value == "GET"
                                    and r.url.path.endswith("/diffusiongemmas") and "watch" not in r.params))

    before = lists()
    namespaces(k8s, "elsewhere")  # the cluster moves on past the watch's resourceVersion...
    k8s.call(k8s.store.compact)  # ...and forgets the history before now
    k8s.call(k8s.store.close_watches)  # the watches resume from their resourceVersion: 410
    k8s.kubectl("delete", "-n", "ml", "dgm", "first")
    apply(k8s, resource("second"))
    assert wait_for(lambda: seen.variants == {"ml/second"})
    assert lists() > before


# ---- credentials --------------------------------------------------------------------------------------------


@pytest.fixture
def k8s_tls(tmp_path: pathlib.Path) -> Iterator[EmulatorThread]:
    """The emulator over HTTPS, as the in-cluster configuration and client certificates need."""
    with EmulatorThread(tmp_path / "k8s-tls", tls=True) as emulator:
        yield emulator


def test_a_rotated_service_account_token_is_picked_up(
    k8s_tls: EmulatorThread, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    watching: Callable[[KubernetesSource], Seen],
) -> None:
    """In a pod: the kubelet rewrites the projected token (hourly); the gateway's next requests carry the new one.

    The library re-reads the file once its copy is a minute old; the test shortens that minute to nothing."""
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    k8s = k8s_tls
    k8s.kubectl("apply", "-f", CRD)
    namespaces(k8s, "ml")
    apply(k8s, resource("gemma"))
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(pathlib.Path(k8s.ca_file).read_bytes())
    (sa / "token").write_text("first-token")
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": k8s.url.rsplit(":", 1)[1]}
    start = len(k8s.authorizations())
    seen = watching(KubernetesSource(functools.partial(in_cluster, sa, environ), "ml"))
    assert wait_for(lambda: seen.variants == {"ml/gemma"})
    assert set(k8s.authorizations()[start:]) == {"Bearer first-token"}
    # The kubelet swaps the file for a new one.
    (sa / "token.new").write_text("second-token")
    (sa / "token.new").replace(sa / "token")
    rotated = len(k8s.authorizations())
    k8s.call(k8s.store.close_watches)  # the watches reconnect: new requests
    assert wait_for(lambda: "Bearer second-token" in k8s.authorizations()[rotated:])
    # A request prepared just before the swap (another watch's, a periodic read) may still arrive with the old
    # token. Every request opened after the new one was seen carries the new token: reconnect once more.
    settled = len(k8s.authorizations())
    k8s.call(k8s.store.close_watches)
    assert wait_for(lambda: len(k8s.authorizations()) >= settled + 2)  # both watches came back
    assert set(k8s.authorizations()[settled:]) == {"Bearer second-token"}


def test_an_exec_plugin_supplies_the_credentials(
    k8s: EmulatorThread, tmp_path: pathlib.Path, watching: Callable[[KubernetesSource], Seen],
) -> None:
    """A kubeconfig whose user runs a command for its token (aws eks get-token, gke-gcloud-auth-plugin, kubelogin)."""
    k8s.kubectl("apply", "-f", CRD)
    namespaces(k8s, "ml")
    apply(k8s, resource("gemma"))
    credential = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": "from-the-plugin"}}
    plugin = {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
              "args": ["-c", f"print({json.dumps(json.dumps(credential))})"], "interactiveMode": "Never"}
    kubeconfig = tmp_path / "exec-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(k8s.kubeconfig_dict(user={"exec": plugin})))
    seen = watching(KubernetesSource(functools.partial(from_kubeconfig, str(kubeconfig)), "ml"))
    assert wait_for(lambda: seen.variants == {"ml/gemma"})
    assert "Bearer from-the-plugin" in k8s.authorizations()


def test_no_copy_of_the_client_key_is_left_when_the_gateway_exits(tmp_path: pathlib.Path) -> None:
    """A kubeconfig with an inline client certificate and key: `dgemma gateway --kubernetes` runs with it, and
    once it has stopped (SIGTERM, as Kubernetes and systemd stop it) no file of its temporary directory holds
    the key."""
    with EmulatorThread(tmp_path / "k8s", tls=True) as k8s:
        assert k8s.ca is not None
        client = k8s.ca.issue("dgemma-gateway", dns=(), ips=(), client=True)
        key = client.key_pem
        user = {"client-certificate-data": base64.b64encode(client.cert_pem).decode(),
                "client-key-data": base64.b64encode(key).decode()}
        kubeconfig = tmp_path / "cert-kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(k8s.kubeconfig_dict(user=user)))
        k8s.kubectl("apply", "-f", CRD)
        temp = tmp_path / "tmp"
        temp.mkdir()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TMPDIR": str(temp)}
        gateway = subprocess.Popen(
            [sys.executable, "-m", "dgemma_cli.main", "gateway", "--kubernetes", "--host", "127.0.0.1",
             "--port", "0", "--grpc-port", "-1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent())
        try:
            listed = lambda: any(r.url.path == "/apis/dgemma.io/v1alpha1/diffusiongemmas" for r in k8s.handler)  # noqa: E731
            assert wait_for(lambda: k8s.call(listed), timeout=30), "the gateway never reached the API"
            gateway.send_signal(signal.SIGTERM)
            output, _ = gateway.communicate(timeout=30)
            assert gateway.returncode == 0, output.decode()
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
        left = [p for p in temp.rglob("*") if p.is_file() and key.strip() in p.read_bytes()]
        assert left == []

