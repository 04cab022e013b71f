"""Operator benchmark against the Kubernetes API emulator.

Reconcile latency: one resource applied at a time, time until its Deployment, Service and
PodDisruptionBudget exist and its status is written. Throughput: N resources created at once,
time until every one is reconciled, and how many errors the operator logged.

    python bench/bench_operator.py --latency 20 --burst 100 --burst 500
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kubernetes
from kopf.testing import KopfRunner

from tests.k8s_emulator import EmulatorThread

ROOT = pathlib.Path(__file__).resolve().parents[1]
CRD = ROOT / "deploy/crds/dgemma.io_diffusiongemmas.yaml"
OPERATOR_ARGS = ["run", "--standalone", "--namespace", "default", "-m", "dgemma_operator.handlers"]
KEYS = {
    "deployments": ("apps", "deployments"),
    "services": ("", "services"),
    "pdbs": ("policy", "poddisruptionbudgets"),
}


def resource(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "dgemma.io/v1alpha1",
        "kind": "DiffusionGemma",
        "metadata": {"name": name},
        "spec": {
            "servedModelName": "google/diffusiongemma-26B-A4B-it",
            "model": {"huggingFace": {"id": "google/diffusiongemma-26B-A4B-it"}},
            "image": "ghcr.io/example/dgemma:0.1.0",
            "gpu": {"profile": "h100"},
        },
    }


def reconciled(k8s: EmulatorThread, names: list[str]) -> set[str]:
    """Names whose three children exist and whose status records generation 1 (read on the server's loop)."""

    def check() -> set[str]:
        store = k8s.store
        done = set()
        objects = store.objects[("dgemma.io", "diffusiongemmas")]
        for name in names:
            obj = objects.get(("default", name))
            if not obj or (obj.get("status") or {}).get("observedGeneration") != 1:
                continue
            if all(("default", f"{name}-worker") in store.objects[key] for key in KEYS.values()):
                done.add(name)
        return done

    return k8s.call(check)


def wait_all(k8s: EmulatorThread, names: list[str], timeout: float, poll: float) -> tuple[float, int]:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        done = reconciled(k8s, names)
        if len(done) == len(names):
            return time.perf_counter() - start, 0
        time.sleep(poll)
    return time.perf_counter() - start, len(names) - len(reconciled(k8s, names))


class ErrorCounter(logging.Handler):
    """Counts the errors the operator logs (failed handlers, API errors)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def run(latency_n: int, bursts: list[int], timeout: float) -> dict[str, Any]:
    results: dict[str, Any] = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp, EmulatorThread(tmp, record=False) as k8s:
        os.environ["KUBECONFIG"] = k8s.kubeconfig
        k8s.kubectl("apply", "-f", str(CRD))
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=k8s.kubeconfig, client_configuration=configuration)
        api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))

        def create(name: str) -> None:
            api.create_namespaced_custom_object(
                "dgemma.io", "v1alpha1", "default", "diffusiongemmas", resource(name)
            )

        errors = ErrorCounter()
        logging.getLogger("kopf").addHandler(errors)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        with KopfRunner(OPERATOR_ARGS, timeout=60) as runner:
            time.sleep(1.0)  # operator startup is not part of a reconcile
            latencies = []
            for i in range(latency_n):
                start = time.perf_counter()
                create(f"lat-{i}")
                _, missing = wait_all(k8s, [f"lat-{i}"], timeout, poll=0.002)
                if not missing:
                    latencies.append(time.perf_counter() - start)
            results["latency"] = {
                "n": latency_n,
                "reconciled": len(latencies),
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p95_ms": round(sorted(latencies)[math.ceil(len(latencies) * 0.95) - 1] * 1000, 1),
                "max_ms": round(max(latencies) * 1000, 1),
            }
            for n in bursts:
                names = [f"burst{n}-{i}" for i in range(n)]
                errors_before = errors.count
                start = time.perf_counter()
                for name in names:
                    create(name)
                created_s = time.perf_counter() - start
                _, missing = wait_all(k8s, names, timeout, poll=0.05)
                total = time.perf_counter() - start
                results[f"burst_{n}"] = {
                    "n": n,
                    "create_s": round(created_s, 2),
                    "all_reconciled_s": round(total, 2),
                    "per_second": round((n - missing) / total, 1),
                    "not_reconciled": missing,
                    "operator_errors": errors.count - errors_before,
                }
        results["operator_exit_code"] = runner.exit_code
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--latency", type=int, default=20, help="resources applied one at a time")
    p.add_argument("--burst", type=int, action="append", help="resources applied at once (repeatable)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for convergence")
    p.add_argument("--out", default=str(ROOT / "bench/out/operator.json"))
    args = p.parse_args()
    results = run(args.latency, args.burst or [100, 500], args.timeout)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
