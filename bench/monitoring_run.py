"""One local load run seen through the dashboard's own queries: a gateway in front of two tiny-model workers,
scraped every second by a real Prometheus (Debian's `prometheus`), a stepped load of concurrent clients, then the
key panels' queries over the run drawn with matplotlib into docs/monitoring-run.png.

Usage: python bench/monitoring_run.py [--seconds 60] [--out docs/monitoring-run.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import openai

from dgemma_gateway.app import GatewayServer
from dgemma_gateway.config import GatewayConfig
from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.endpoints import EndpointSpec, StaticSource
from dgemma_gateway.types import Variant
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir

VARIANT = "demo/tiny"
MODEL = "tiny"
PANELS = [  # (title, unit, [(label, query)]): the dashboard's queries (hack/gen_dashboard.py), variant picked
    ("Requests per second (gateway)", "req/s",
     [("200", f'sum by (variant) (rate(dgemma_gateway_requests_total{{variant="{VARIANT}", outcome="200"}}[5s]))')]),
    ("End-to-end latency", "s",
     [("p50", "histogram_quantile(0.5, sum by (le, variant) (rate("
              f'dgemma_gateway_request_duration_seconds_bucket{{variant="{VARIANT}"}}[5s])))'),
      ("p95", "histogram_quantile(0.95, sum by (le, variant) (rate("
              f'dgemma_gateway_request_duration_seconds_bucket{{variant="{VARIANT}"}}[5s])))')]),
    ("Requests at the workers", "requests",
     [("active", f'sum by (variant) (dgemma_worker_active_requests{{variant="{VARIANT}"}})'),
      ("waiting", f'max by (variant) (dgemma_gateway_requests_waiting{{variant="{VARIANT}"}})')]),
    ("Tokens/s: asked for vs delivered", "tokens/s",
     [("asked", f'sum by (variant) (dgemma_gateway_demand_tokens_per_second{{variant="{VARIANT}"}})'),
      ("delivered", f'sum by (variant) (rate(dgemma_gateway_completion_tokens_total{{variant="{VARIANT}"}}[5s]))')]),
]


class Gateway:
    """A GatewayServer on its own event-loop thread."""

    def __init__(self, workers: LocalWorkers) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        variant = Variant(name=VARIANT, model=MODEL, canvas_length=16, latency_target_ms=2000.0)
        source = StaticSource([EndpointSpec(f"{VARIANT}/{w.address}", w.address, variant) for w in workers.workers])
        config = GatewayConfig(host="127.0.0.1", port=0, grpc_port=-1, core=GatewaySettings(demand_window_s=10.0))

        async def start() -> GatewayServer:
            server = GatewayServer(config, [source])
            await server.start()
            await server.gateway.wait_ready(120, len(workers.workers))
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(180)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _prometheus(workdir: Path, targets: dict[str, list[str]]) -> Any:
    """Prometheus through the tests' harness (tests/monitoring/prom.py): one way to run it."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return importlib.import_module("tests.monitoring.prom").Prometheus(workdir, targets)


def _load(url: str, seconds: float) -> None:
    """Stepped load: 1, 2, 4, then 6 concurrent clients, a quarter of the run each."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    stop = time.monotonic() + seconds
    step = seconds / 4

    def client_loop(start_at: float) -> None:
        time.sleep(max(0.0, start_at - time.monotonic()))
        i = 0
        while time.monotonic() < stop:
            client.completions.create(model=MODEL, prompt=f"Tell me {i}", max_tokens=32,
                                      extra_body={"max_denoising_steps": 4, "ignore_eos": True})
            i += 1

    begin = time.monotonic()
    starts = [0, step, 2 * step, 2 * step, 3 * step, 3 * step]
    threads = [threading.Thread(target=client_loop, args=(begin + s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _range(prom_url: str, query: str, start: float, end: float) -> list[tuple[float, float]]:
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": 1})
    with urllib.request.urlopen(f"{prom_url}/api/v1/query_range?{params}", timeout=30) as r:
        result = json.loads(r.read())["data"]["result"]
    return [(float(t) - start, float(v)) for t, v in result[0]["values"]] if result else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "monitoring-run.png")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dgemma-monitoring-"))
    workers = LocalWorkers(str(tiny_model_dir()), 2, MODEL, ["--max-active", "2", "--metrics-port", "0"],
                           workdir=workdir, variant=VARIANT)
    workers.start()
    workers.wait_bound()
    gateway = Gateway(workers)
    metrics = [f"127.0.0.1:{json.loads(w.port_file.read_text())['metrics_port']}" for w in workers.workers]
    prom = _prometheus(workdir, {"gateway": [gateway.url.removeprefix("http://")], "workers": metrics})
    try:
        time.sleep(3)
        start = time.time()
        _load(gateway.url, args.seconds)
        time.sleep(3)
        end = time.time()
        series = [(title, unit, [(label, _range(prom.url, q, start, end)) for label, q in queries])
                  for title, unit, queries in PANELS]
    finally:
        prom.close()
        gateway.close()
        workers.stop(timeout=5)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for ax, (title, unit, lines) in zip(axes.flat, series, strict=True):
        for label, points in lines:
            if points:
                ax.plot([t for t, _ in points], [v for _, v in points], label=label)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    for ax in axes[1]:
        ax.set_xlabel("seconds into the run (1, 2, 4, then 6 concurrent clients)")
    fig.suptitle("dgemma dashboard queries over one local load run (2 tiny-model workers on CPU, Prometheus 1 s)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
