"""The Kubernetes source and spec.runtime: a vLLM resource's pods are HTTP endpoints (their Service's `http`
port), an external resource is its API with the key read from the Secret it names; a resource's
spec.worker.apiKeySecret is read the same way and presented to its workers and vLLM pods. Against the emulator,
with kubectl creating the objects and the OpenAI SDK going through the gateway to real servers."""

from __future__ import annotations

import base64
import functools
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from dgemma_gateway.kube import KubernetesSource, endpoints_from, from_kubeconfig, resource_from
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant
from tests.k8s_emulator import EmulatorThread

pytestmark = pytest.mark.timeout(180)
ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def resource(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "dgemma.io/v1alpha1", "kind": "DiffusionGemma",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"servedModelName": MODEL, "model": {"pvc": {"claimName": "c"}}, **spec}}


def vllm_slice(service: str, host: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service}-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [host], "conditions": {"ready": True}}]}


EXTERNAL = {"runtime": "external", "external": {"baseURL": "https://api.example.com/v1/", "model": "google/dg",
                                                "apiKeySecret": {"name": "hosted", "key": "apiKey"},
                                                "maxConcurrency": 9}}


def test_vllm_and_external_resources_become_http_endpoints() -> None:
    resources = {("default", "v"): resource_from(resource("v", runtime="vllm", gpu={"profile": "dgx-spark"})),
                 ("default", "e"): resource_from(resource("e", **EXTERNAL))}
    slices = {("default", "s"): vllm_slice("v-worker", "10.0.0.7", 8000)}
    assert [e.endpoint_id for e in endpoints_from(resources, slices)] == ["default/v/10.0.0.7:8000"]  # no key yet
    external, vllm_ep = endpoints_from(resources, slices, {("default", "hosted", "apiKey"): "sk-1"})
    assert vllm_ep.http is not None and vllm_ep.http.base_url == "http://10.0.0.7:8000/v1" and vllm_ep.http.scrape
    assert vllm_ep.http.capacity == 8 and vllm_ep.variant.runtime == "vllm"  # the recipe's DGX Spark setting
    assert external.http is not None and external.variant.overflow
    assert (external.http.base_url, external.http.model, external.http.api_key, external.http.capacity) == \
        ("https://api.example.com/v1", "google/dg", "sk-1", 9)
    assert not resource_from(resource("d", image="w:1")).variant.allow_overflow
    assert resource_from(resource("d", image="w:1", allowOverflow=True)).variant.allow_overflow


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_a_gateway_in_kubernetes_serves_a_vllm_variant_and_overflows_with_the_secrets_key(
        k8s: EmulatorThread, pool: Pool, tmp_path: pathlib.Path) -> None:
    # Stand-ins, on 127.0.0.1: a "vLLM pod" (an OpenAI server over a real worker) and a hosted API whose key
    # is in a Secret, so the request only succeeds if the gateway read it.
    keys = tmp_path / "hosted-keys"
    keys.write_text("sk-hosted\n")
    pod = RunningGateway([static((pool.fast[0].address, variant("pod")))])
    hosted = RunningGateway([static((pool.fast[1].address, variant("api")))], keys=keys)
    gateway = None
    try:
        pod.wait_ready(1)
        hosted.wait_ready(1)
        k8s.kubectl("apply", "-f", str(ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"))
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hosted", "namespace": "default"},
                  "data": {"apiKey": base64.b64encode(b"sk-hosted").decode()}}
        k8s.kubectl("apply", "-f", "-", input=json.dumps(secret))
        host, port = pod.url.removeprefix("http://").split(":")
        objects = [
            resource("local", runtime="vllm", costWeight=1, allowOverflow=True, generation={"canvasLength": 16}),
            vllm_slice("local-worker", host, int(port)),
            # Unmeasured, the API is predicted from its prior: set well above what the pod measures, so the pod,
            # measured missing a tight target, loses to it whatever number of steps its model defaults to.
            resource("hosted", costWeight=5, latencyTargetMs=60000, gpu={"tokensPerSecondPrior": 50000}, **{
                **EXTERNAL, "external": {**EXTERNAL["external"], "baseURL": f"{hosted.url}/v1", "model": MODEL}}),
        ]
        for obj in objects:
            k8s.kubectl("apply", "-f", "-", input=json.dumps(obj))
        source = KubernetesSource(functools.partial(from_kubeconfig, k8s.kubeconfig), "default")
        gateway = RunningGateway([source])
        until(lambda: len(gateway.gateway.registry.endpoints) == 2, 30, "both endpoints")
        gateway.wait_ready(2, timeout=30)
        c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)

        def served_by(target_ms: int) -> str:
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                extra_headers={"x-dgemma-latency-target-ms": str(target_ms)})
            return str(raw.headers["x-dgemma-variant"])

        assert served_by(600_000) == "default/local"
        # Measured by that first request, the pod is predicted to miss 50 ms; the API (with the key) takes it.
        assert served_by(50) == "default/hosted"
        # A deleted Secret takes the external endpoint away; a new one brings it back.
        k8s.kubectl("delete", "secret", "hosted")
        gateway.call(_wake(source))
        until(lambda: len(gateway.gateway.registry.endpoints) == 1, 30, "the external endpoint to go")
        k8s.kubectl("apply", "-f", "-", input=json.dumps(secret))
        gateway.call(_wake(source))
        until(lambda: len(gateway.gateway.registry.endpoints) == 2, 30, "the external endpoint back")
    finally:
        if gateway is not None:
            gateway.close()
        pod.close()
        hosted.close()


async def _wake(source: KubernetesSource) -> None:
    """What a resource change does: the source reads the Secrets again now rather than within the minute."""
    source._resources_changed.set()


WORKER_KEY = {"apiKeySecret": {"name": "worker-key", "key": "keys"}}


def grpc_slice(service: str, host: str, port: int) -> dict[str, Any]:
    return {**vllm_slice(service, host, port), "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]}


def test_a_worker_key_secret_is_presented_to_the_variants_workers_and_vllm_pods() -> None:
    resources = {("default", "w"): resource_from(resource("w", image="w:1", worker=WORKER_KEY)),
                 ("default", "v"): resource_from(resource("v", runtime="vllm", worker=WORKER_KEY))}
    slices = {("default", "w"): grpc_slice("w-worker", "10.0.0.6", 50051),
              ("default", "v"): vllm_slice("v-worker", "10.0.0.7", 8000)}
    assert endpoints_from(resources, slices) == []  # the key is not read yet: its workers would refuse every call
    # The Secret is read as every key file is: the dgemma worker takes every key listed, vLLM is started with the
    # first, and the gateway presents the first to both.
    pod, worker = endpoints_from(resources, slices, {("default", "worker-key", "keys"): "# rotating\nwk-new\nwk-old\n"})
    assert worker.api_key == "wk-new" and worker.kind == "grpc"
    assert pod.http is not None and pod.http.api_key == "wk-new"
    pod, worker = endpoints_from(resources, slices, {("default", "worker-key", "keys"): "wk-one\n"})  # by id
    assert worker.api_key == "wk-one" and pod.http is not None and pod.http.api_key == "wk-one"
    assert "wk-one" not in repr(worker) + repr(pod)  # never in a log line
    assert endpoints_from(resources, slices, {("default", "worker-key", "keys"): "# none\n\n"}) == []


@pytest.fixture(scope="module")
def keyed_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """A `dgemma worker` that requires the key (its --api-keys-file), serving the model as `keyed`."""
    with LocalWorkers(str(tiny_model_dir()), 1, "keyed", api_key="wk-cluster-0123456789",
                      workdir=tmp_path_factory.mktemp("keyed-k8s")).running(10) as w:
        yield w


def test_a_gateway_in_kubernetes_reads_the_workers_key_from_the_secret_the_resource_names(
        k8s: EmulatorThread, pool: Pool, keyed_worker: LocalWorkers, tmp_path: pathlib.Path) -> None:
    key = "wk-cluster-0123456789"
    (tmp_path / "pod-keys").write_text(f"{key}\n")
    # A "vLLM pod" started with VLLM_API_KEY: an OpenAI server whose /v1 needs the key (/health, /metrics open).
    pod = RunningGateway([static((pool.fast[0].address, variant("pod")))], keys=tmp_path / "pod-keys")
    gateway = None
    try:
        pod.wait_ready(1)
        k8s.kubectl("apply", "-f", str(ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"))

        def secret(value: str) -> None:
            body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "worker-key", "namespace": "default"},
                    "data": {"keys": base64.b64encode(value.encode()).decode()}}
            k8s.kubectl("apply", "-f", "-", input=json.dumps(body))

        secret(key)
        worker_host, worker_port = keyed_worker.workers[0].address.split(":")
        pod_host, pod_port = pod.url.removeprefix("http://").split(":")
        for obj in (resource("keyed", servedModelName="keyed", image="w:1", worker=WORKER_KEY),
                    grpc_slice("keyed-worker", worker_host, int(worker_port)),
                    resource("keyed-vllm", runtime="vllm", worker=WORKER_KEY, generation={"canvasLength": 16}),
                    vllm_slice("keyed-vllm-worker", pod_host, int(pod_port))):
            k8s.kubectl("apply", "-f", "-", input=json.dumps(obj))
        source = KubernetesSource(functools.partial(from_kubeconfig, k8s.kubeconfig), "default")
        gateway = RunningGateway([source])
        gateway.wait_ready(2, timeout=60)  # the worker let the gateway's load watch in
        c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)

        def status(model: str) -> int:
            try:
                c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4)
            except openai.APIStatusError as err:
                return err.status_code
            return 200

        assert status("keyed") == 200 and status(MODEL) == 200  # the dgemma worker and the vLLM pod
        registry = gateway.gateway.registry
        pod_id = f"default/keyed-vllm/{pod_host}:{pod_port}"
        pod_endpoint = registry.endpoints[pod_id]

        def presents(value: str) -> Callable[[], bool]:
            return lambda: (s := registry.endpoints.get(pod_id)) is not None and s.spec.http is not None \
                and s.spec.http.api_key == value

        # The Secret changes (a key the workers do not know): read again, presented from the next call on.
        secret("wk-unknown")
        gateway.call(_wake(source))
        until(presents("wk-unknown"), 30, "the gateway to read the new key")
        # Only the key changed: the vLLM endpoint keeps its connections and its load (no 503 until its next scrape),
        # and the very next request carries the new key (401 from the pod: it refused the gateway's credentials).
        assert registry.endpoints[pod_id] is pod_endpoint and pod_endpoint.load is not None
        assert status(MODEL) == 502
        until(lambda: status("keyed") == 502, 30, "the worker to refuse the new key")
        secret(f"{key}\n")  # as `kubectl create secret --from-file` of an echoed file stores it
        gateway.call(_wake(source))
        until(presents(key), 30, "the gateway to read the right key again")
        # The refusals were the old key's: the endpoint is not held out for them.
        assert registry.endpoints[pod_id] is pod_endpoint and status(MODEL) == 200
        until(lambda: status("keyed") == 200, 30, "the worker to take the right key again")
    finally:
        if gateway is not None:
            gateway.close()
        pod.close()
