"""A stand-in for the deployment controller, kubelet and EndpointSlice controller, for end-to-end tests.

The emulator runs no controllers. This does what they would for the operator's worker Deployments:
for each Deployment labelled managed-by=dgemma-operator it keeps `spec.replicas` real `dgemma worker`
processes running on 127.0.0.1 with the Deployment's container environment (the model overridden to
the tiny model, the device to CPU and the ports to free ones; `secretKeyRef` variables and Secret volumes from
the Secrets, the volumes as files in a folder of the pod's), creates a Pod object for each, marks it
ready when its gRPC health says SERVING, patches the Deployment's status (replicas, readyReplicas,
availableReplicas, updatedReplicas), and publishes each ready worker in an EndpointSlice of the worker
Service (one slice per worker, since each listens on its own port of 127.0.0.1). Fewer replicas: the
newest worker leaves the slice and gets SIGTERM (it drains, then exits). A deleted Deployment: all its
workers stop and its Pods and slices go.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import kubernetes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgemma_serve.lifetime import die_with_parent

MANAGED = "app.kubernetes.io/managed-by=dgemma-operator"
MERGE = "application/merge-patch+json"
# Environment the stand-in node changes: the tiny model on CPU, free ports, writable caches. The profile's
# DGEMMA_DTYPE goes too: its fp8/nvfp4 weights are quantized at load on a GPU, and this node has none.
DROPPED = {"DGEMMA_DTYPE", "DGEMMA_MODEL_REVISION", "HF_HUB_OFFLINE"}


@dataclass
class Pod:
    """One worker process standing in for a pod."""

    name: str
    process: subprocess.Popen[bytes]
    port_file: Path
    log: Path
    port: int | None = None
    ready: bool = False


@dataclass
class Workload:
    """The pods of one Deployment."""

    namespace: str
    name: str
    service: str
    labels: dict[str, str]
    pods: list[Pod] = field(default_factory=list)
    serial: int = 0
    published: dict[str, Any] | None = None  # last status written


class Kubelet:
    """Polls the API every `interval_s` and converges the worker processes, Pods, status and slices."""

    def __init__(self, kubeconfig: str, model: str, workdir: Path, extra_env: dict[str, str] | None = None,
                 interval_s: float = 0.25) -> None:
        self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.discovery = kubernetes.client.DiscoveryV1Api(self.api)
        self.model = model
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.interval_s = interval_s
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.started: list[Pod] = []  # every worker this node started, running or not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stand-in-kubelet", daemon=True)
        self.errors: list[str] = []

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.api.close()

    def addresses(self) -> list[str]:
        """host:port of the gRPC port of every ready worker."""
        return [f"127.0.0.1:{p.port}" for w in self.workloads.values() for p in w.pods if p.ready]

    def running(self) -> list[str]:
        """Names of the worker processes this node started that are still running."""
        return [p.name for p in self.started if p.process.poll() is None]

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.sync()
                except Exception as e:  # keep going: the test asserts on outcomes, and reads errors on failure
                    self.errors.append(f"{type(e).__name__}: {e}")
                self._stop.wait(self.interval_s)
        finally:
            # Here, not in __exit__: the workers die with this thread, which started them (die_with_parent), so
            # it stops them (SIGTERM, a drain) before it ends.
            for w in self.workloads.values():
                for pod in w.pods:
                    _terminate(pod)
            for pod in self.started:
                _reap(pod, 10.0)

    # ---- convergence ----------------------------------------------------------------------------

    def _json(self, response: Any) -> dict[str, Any]:
        return dict(json.loads(response.data))

    def sync(self) -> None:
        """One pass over every managed Deployment."""
        listed = self._json(self.apps.list_deployment_for_all_namespaces(
            label_selector=MANAGED, _preload_content=False))["items"]
        seen = set()
        for dep in listed:
            meta = dep["metadata"]
            key = (meta["namespace"], meta["name"])
            seen.add(key)
            if key not in self.workloads:
                labels = dict(dep["spec"]["template"]["metadata"]["labels"])
                self.workloads[key] = Workload(meta["namespace"], meta["name"], meta["name"], labels)
            self._converge(self.workloads[key], dep)
        for key in [k for k in self.workloads if k not in seen]:
            self._remove(self.workloads.pop(key))

    def _converge(self, w: Workload, dep: dict[str, Any]) -> None:
        desired = int(dep["spec"].get("replicas") or 0)
        for pod in [p for p in w.pods if p.process.poll() is not None]:  # crashed or drained: gone
            self._delete_pod(w, pod)
        while len(w.pods) < desired:
            self._start(w, dep)
        for pod in w.pods[desired:]:
            self._delete_pod(w, pod)
        for pod in w.pods:
            self._probe(w, pod)
        ready = sum(1 for p in w.pods if p.ready)
        status = {"observedGeneration": dep["metadata"].get("generation"), "replicas": len(w.pods),
                  "updatedReplicas": len(w.pods), "readyReplicas": ready, "availableReplicas": ready}
        if status != w.published:
            self.apps.patch_namespaced_deployment_status(w.name, w.namespace, {"status": status},
                                                         _content_type=MERGE)
            w.published = status

    def _env(self, dep: dict[str, Any], pod: str) -> dict[str, str]:
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        namespace = dep["metadata"]["namespace"]
        env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e and e["name"] not in DROPPED}
        env.update({e["name"]: self._secret(namespace, e["valueFrom"]["secretKeyRef"]["name"])[
                       e["valueFrom"]["secretKeyRef"]["key"]]
                    for e in container.get("env") or [] if "secretKeyRef" in (e.get("valueFrom") or {})})
        # Secret volumes: written under this pod's folder; variables that point into the mount point there.
        for path, local in self._secret_mounts(namespace, spec, container, self.workdir / pod).items():
            env.update({k: local + v[len(path):] for k, v in env.items() if v.startswith(path.rstrip("/") + "/")})
        env.update({
            "DGEMMA_MODEL": self.model, "DGEMMA_DEVICE": "cpu", "DGEMMA_HOST": "127.0.0.1", "DGEMMA_PORT": "0",
            "DGEMMA_METRICS_PORT": "off", "DGEMMA_PORT_FILE": str(self.workdir / f"{pod}.json"),
            "HF_HOME": str(self.workdir / "hf"), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "TORCHINDUCTOR_CACHE_DIR": str(self.workdir / "torchinductor"),
            "TRITON_CACHE_DIR": str(self.workdir / "triton"),
            **self.extra_env,
        })
        return env

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _secret_mounts(self, namespace: str, spec: dict[str, Any], container: dict[str, Any], folder: Path
                       ) -> dict[str, str]:
        """Each Secret volume the container mounts, as files in a folder: {mount path: that folder}."""
        volumes = {v["name"]: v["secret"] for v in spec.get("volumes") or [] if "secret" in v}
        out = {}
        for mount in container.get("volumeMounts") or []:
            source = volumes.get(mount["name"])
            if source is None:
                continue
            data = self._secret(namespace, source["secretName"])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            local = folder / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for item in items:
                (local / item["path"]).write_text(data[item["key"]])
            out[mount["mountPath"]] = str(local)
        return out

    def _start(self, w: Workload, dep: dict[str, Any]) -> None:
        w.serial += 1
        name = f"{w.name}-{w.serial}"
        env = self._env(dep, name)
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "dgemma_worker.server"], stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **env}, preexec_fn=die_with_parent())
        w.pods.append(Pod(name, process, Path(env["DGEMMA_PORT_FILE"]), log))
        self.started.append(w.pods[-1])
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": w.namespace, "labels": w.labels},
                "spec": {"containers": [{"name": "worker", "image": "stand-in"}]},
                "status": {"phase": "Running", "podIP": "127.0.0.1"}}
        self.core.create_namespaced_pod(w.namespace, body)

    def _probe(self, w: Workload, pod: Pod) -> None:
        if pod.ready:
            return
        if pod.port is None:
            if not pod.port_file.exists():
                return
            pod.port = int(json.loads(pod.port_file.read_text())["port"])
        with grpc.insecure_channel(f"127.0.0.1:{pod.port}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return
        pod.ready = True
        ready = [{"type": "Ready", "status": "True"}]
        self.core.patch_namespaced_pod_status(pod.name, w.namespace, {"status": {"conditions": ready}},
                                              _content_type=MERGE)
        slice_body = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": pod.name, "namespace": w.namespace,
                         "labels": {"kubernetes.io/service-name": w.service}},
            "ports": [{"name": "grpc", "port": pod.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": pod.name, "namespace": w.namespace}}],
        }
        self.discovery.create_namespaced_endpoint_slice(w.namespace, slice_body)

    def _delete_pod(self, w: Workload, pod: Pod) -> None:
        """Out of the Service first, then SIGTERM (the worker drains and exits), then the Pod object goes."""
        w.pods.remove(pod)
        if pod.ready:
            self._ignore_missing(self.discovery.delete_namespaced_endpoint_slice, pod.name, w.namespace)
        _terminate(pod)
        self._ignore_missing(self.core.delete_namespaced_pod, pod.name, w.namespace)
        threading.Thread(target=_reap, args=(pod, 30.0), daemon=True).start()

    def _remove(self, w: Workload) -> None:
        for pod in list(w.pods):
            self._delete_pod(w, pod)

    @staticmethod
    def _ignore_missing(call: Any, *args: Any) -> None:
        try:
            call(*args)
        except kubernetes.client.exceptions.ApiException as e:
            if e.status != 404:
                raise


def _terminate(pod: Pod) -> None:
    if pod.process.poll() is None:
        pod.process.send_signal(signal.SIGTERM)


def _reap(pod: Pod, timeout: float) -> None:
    try:
        pod.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pod.process.kill()
        pod.process.wait(5)

