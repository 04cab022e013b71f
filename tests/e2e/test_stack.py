"""The whole path, end to end: kubectl -> operator -> workers -> gateway -> OpenAI SDK client, and back.

The Kubernetes API is the emulator (real HTTP); `dgemma operator` runs as a process against it; the
stand-in kubelet (tests/e2e/kubelet.py) runs real `dgemma worker` processes for the Deployment the
operator makes and publishes them in EndpointSlices; the real gateway discovers them from the API.
Nothing in the request path is a fake. The one liberty: the stand-in node's worker steps carry a
20 ms delay (DGEMMA_DEBUG_STEP_DELAY_S, as on a slower GPU), so that requests queue on two shared
CPU cores without burning them.

Story: the resource starts at zero replicas; its workers require the API key of a Secret, which the operator
mounts and the gateway reads. The first request is held at the gateway, the autoscaler sees it and starts a
replica, the request is released to it (a direct call to that worker without the key is refused).
Concurrent streams then push demand over one replica's measured capacity: a second replica starts and takes
traffic. The load stops: two -> one -> zero. `kubectl delete`: children and processes go.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
import yaml

from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.kube import KubernetesSource, from_kubeconfig
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.lifetime import die_with_parent
from dgemma_worker.model import tiny_model_dir
from tests.e2e.kubelet import Kubelet
from tests.gateway.gateway_harness import RunningGateway
from tests.k8s_emulator import EmulatorThread
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(240)

CRD = "deploy/crds/dgemma.io_diffusiongemmas.yaml"
MODEL = "tiny"
RESOURCE = {
    "apiVersion": "dgemma.io/v1alpha1",
    "kind": "DiffusionGemma",
    "metadata": {"name": "tiny", "namespace": "default"},
    "spec": {
        "servedModelName": MODEL,
        "model": {"pvc": {"claimName": "weights"}},
        "image": "ghcr.io/example/dgemma:0.1.0",
        "gpu": {"profile": "h100"},
        "replicas": 0, "minReplicas": 0, "maxReplicas": 2,
        "latencyTargetMs": 5000,
        "generation": {"canvasLength": 16, "maxDenoisingSteps": 8},
        "worker": {"maxActive": 2, "maxQueue": 16, "drainGraceSeconds": 2,
                   "apiKeySecret": {"name": "tiny-worker-key", "key": "keys"}},
        "autoscaling": {"enabled": True, "targetUtilization": 0.5, "scaleUpStabilizationSeconds": 0,
                        "scaleDownStabilizationSeconds": 4,
                        "scaleToZero": True, "scaleToZeroIdleSeconds": 4},
    },
}
WORKER_KEY = "wk-e2e-0123456789"
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tiny-worker-key", "namespace": "default"},
          "data": {"keys": base64.b64encode(f"{WORKER_KEY}\n".encode()).decode()}}


def get(k8s: EmulatorThread, kind: str, name: str) -> dict[str, Any] | None:
    out = k8s.kubectl("get", kind, name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def replicas(k8s: EmulatorThread) -> int:
    return int((get(k8s, "dgm", "tiny") or {}).get("spec", {}).get("replicas", -1))


def events(k8s: EmulatorThread) -> list[str]:
    items = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
    return [f"{e['reason']}: {e.get('message', '')}" for e in items if e["involvedObject"]["name"] == "tiny"]


@pytest.fixture
def operator(k8s: EmulatorThread, tmp_path: pathlib.Path, gateway: RunningGateway) -> Iterator[pathlib.Path]:
    """`dgemma operator` as a process, deciding every second from the gateway's demand."""
    log = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": k8s.kubeconfig}
    cmd = [sys.executable, "-m", "dgemma_cli.main", "operator", "--standalone", "--namespace", "default",
           "--liveness-port", "0", "--gateway-url", gateway.url, "--autoscale-interval-s", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def crd(k8s: EmulatorThread) -> None:
    """The CRD, installed before the gateway starts watching it."""
    k8s.kubectl("apply", "-f", CRD)


@pytest.fixture
def gateway(k8s: EmulatorThread, crd: None) -> Iterator[RunningGateway]:
    """The real gateway, discovering variants and workers from the API (short demand window, holds 60 s)."""
    source = KubernetesSource(functools.partial(from_kubeconfig, k8s.kubeconfig), "default")
    settings = GatewaySettings(watch_interval_s=0.2, demand_window_s=3.0, hold_for_replica_s=60.0)
    g = RunningGateway([source], settings=settings)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def kubelet(k8s: EmulatorThread, tmp_path: pathlib.Path) -> Iterator[Kubelet]:
    node = Kubelet(k8s.kubeconfig, str(tiny_model_dir()), tmp_path, {"DGEMMA_DEBUG_STEP_DELAY_S": "0.02"})
    with node:
        yield node
    assert node.running() == [], "every worker process stopped"


def test_kubectl_to_operator_to_workers_to_gateway_to_client_scaling_up_from_zero_and_back(
    k8s: EmulatorThread, tmp_path: pathlib.Path, gateway: RunningGateway, operator: pathlib.Path,
    kubelet: Kubelet,
) -> None:
    def why() -> str:
        return (f"\nevents: {events(k8s)}\nkubelet errors: {kubelet.errors[-5:]}\n"
                f"operator log tail: {operator.read_text()[-3000:]}")

    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump_all([SECRET, RESOURCE]))
    k8s.kubectl("apply", "-f", str(manifest))
    eventually(lambda: get(k8s, "deployment", "tiny-worker"), 30, "the operator to create the Deployment")
    assert get(k8s, "deployment", "tiny-worker")["spec"]["replicas"] == 0  # type: ignore[index]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=90)
    ask: dict[str, Any] = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}

    # 1. Scale from zero: the first request is held, the autoscaler starts a replica, the request is served.
    eventually(lambda: MODEL in [m.id for m in client.models.list()], 30, "the gateway to know the model")
    with concurrent.futures.ThreadPoolExecutor(1) as one:
        first = one.submit(client.chat.completions.create, **ask)
        eventually(lambda: replicas(k8s) == 1, 30, "a scale from zero" + why())
        reply = first.result(90)
    assert reply.choices[0].message.content is not None
    assert any(e.startswith("ScaledUp: 0 -> 1") and "waiting 1" in e for e in events(k8s)), why()
    # The gateway presented the Secret's key; anyone else reaching the worker's port is refused.
    (worker,) = kubelet.addresses()
    with grpc.insecure_channel(worker) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.DenoiserStub(channel).GetLoad(pb.GetLoadRequest(), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        load = pb_grpc.DenoiserStub(channel).GetLoad(pb.GetLoadRequest(), timeout=10,
                                                     metadata=(("authorization", f"Bearer {WORKER_KEY}"),))
        assert load.ready

    # 2. Load: concurrent streams until a second replica starts and takes traffic.
    served: Counter[str] = Counter()
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            chunks = client.chat.completions.with_raw_response.create(**ask, stream=True)
            endpoint = chunks.headers["x-dgemma-endpoint"]
            for _ in chunks.parse():
                pass
            served[endpoint] += 1

    streams = [threading.Thread(target=stream, daemon=True) for _ in range(6)]
    for t in streams:
        t.start()
    try:
        eventually(lambda: replicas(k8s) == 2, 60, "a scale-up under load" + why())
        eventually(lambda: len(served) == 2, 60, "the second replica to serve requests" + why())
    finally:
        stop.set()
        for t in streams:
            t.join(60)
    decision = get(k8s, "dgm", "tiny")["status"]["autoscaling"]["lastDecision"]  # type: ignore[index]
    assert decision["inputs"]["capacitySource"] == "measured", decision
    assert decision["inputs"]["capacity_canvases_per_s"] > 0, decision
    assert any(e.startswith("ScaledUp: 1 -> 2") for e in events(k8s)), why()

    # 3. No load: down to one, then (scale to zero after the idle window) to none.
    eventually(lambda: replicas(k8s) <= 1, 60, "a scale-down when idle" + why())
    eventually(lambda: replicas(k8s) == 0, 60, "a scale to zero when idle" + why())
    downs = [e.split(" replicas")[0] for e in events(k8s) if e.startswith("ScaledDown")]
    assert sorted(downs) == ["ScaledDown: 1 -> 0", "ScaledDown: 2 -> 1"], why()  # one step at a time
    eventually(lambda: kubelet.running() == [], 30, "the workers to stop")
    assert gateway.call(_ready(gateway)) == 0

    # 4. kubectl delete: the children go (garbage collection) and so do the worker processes.
    k8s.kubectl("delete", "-f", str(manifest), "--timeout=30s")
    for kind in ("deployment", "service", "pdb"):
        eventually(lambda kind=kind: get(k8s, kind, "tiny-worker") is None, 30, f"the {kind} to go")  # type: ignore[misc]
    assert kubelet.running() == []
    print(f"\nserved per endpoint: {dict(served)}\nevents: {events(k8s)}")


async def _ready(gateway: RunningGateway) -> int:
    return int(gateway.gateway.ready_count())
