"""Helpers for operator tests: sample resources, kubectl reads, waiting for convergence."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from dgemma_common.demand import VariantView
from tests.autoscaler.views import snapshot, view
from tests.k8s_emulator import EmulatorThread

T = TypeVar("T")
CRD_PATH = "deploy/crds/dgemma.io_diffusiongemmas.yaml"


def sample(name: str = "gemma", profile: str = "h100", **spec: Any) -> dict[str, Any]:
    """A minimal valid DiffusionGemma; keyword arguments are merged into the spec."""
    body: dict[str, Any] = {
        "apiVersion": "dgemma.io/v1alpha1",
        "kind": "DiffusionGemma",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "servedModelName": "google/diffusiongemma-26B-A4B-it",
            "model": {"huggingFace": {"id": "google/diffusiongemma-26B-A4B-it", "revision": "v1"}},
            "image": "ghcr.io/example/dgemma:0.1.0",
            "gpu": {"profile": profile},
        },
    }
    body["spec"].update(copy.deepcopy(spec))
    return body


def apply(k8s: EmulatorThread, obj: dict[str, Any], check: bool = True) -> str:
    result = k8s.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj), check=check)
    return result.stdout + result.stderr


def get(k8s: EmulatorThread, kind: str, name: str) -> dict[str, Any]:
    return dict(json.loads(k8s.kubectl("get", kind, name, "-o", "json").stdout))


def exists(k8s: EmulatorThread, kind: str, name: str) -> bool:
    return k8s.kubectl("get", kind, name, "-o", "name", check=False).returncode == 0


def eventually(check: Callable[[], T], timeout: float = 15, interval: float = 0.1) -> T:
    """The first truthy result of `check`; a falsy result or an AssertionError means "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if result or result is None:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"still {result!r} after {timeout} s")
        time.sleep(interval)


def condition(resource: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (resource.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    raise AssertionError(f"no {kind} condition in {resource.get('status')}")


def mark_ready(k8s: EmulatorThread, deployment: str, ready: int) -> None:
    """Do what the deployment controller and kubelet would: report replicas as ready."""
    dep = get(k8s, "deployment", deployment)
    status = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": ready,
        "updatedReplicas": ready,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }
    k8s.kubectl(
        "patch",
        "deployment",
        deployment,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


class DemandStub:
    """The gateway's demand endpoint as a fixed JSON answer on 127.0.0.1 (tests of the operator alone)."""

    def __init__(self) -> None:
        import http.server
        import threading

        stub = self
        self.variants: dict[str, VariantView] = {}
        self.requests = 0
        self.answer: dict[str, Any] | None = None  # set: answered as it is, whatever the variants

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests += 1
                answer = stub.answer if stub.answer is not None else snapshot(stub.variants).model_dump(mode="json")
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="demand-stub", daemon=True)
        self.thread.start()

    def demand(self, name: str, canvases_per_s: float, capacity: float | None = 1.0, held: int = 0) -> None:
        """Report this demand for a variant (canvas 256)."""
        self.variants[name] = view(canvases_per_s, capacity=capacity, held=held, canvases_held=float(held))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
