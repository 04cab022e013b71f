"""Which process a 10 MB prompt stalls, door by door: one live stream through the gateway (drafts, a message every
step) while the 10 MB prompt goes, one door at a time, to the worker's Generate, the worker's Tokenize and the
gateway's HTTP /v1/chat/completions (from another process, tests/chaos/big_prompt.py's senders). For each try:
the door's answer, the stream's largest gap while it was sent and answered, and how many event-loop wake-ups of
the worker and of the gateway came more than 25 / 50 / 100 ms late (their `*_event_loop_lag_seconds` histograms,
scraped before and after).

Usage: python bench/bench_big_prompt.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dgemma_serve.lifetime import die_with_parent
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
STEP_DELAY_S = "0.05"  # as tests/chaos: a slower GPU's step, so that a stream lasts without burning the CPU
DOORS = ("Generate", "Tokenize", "gateway")
LATE_S = (0.025, 0.05, 0.1)
SEND = """
import json, sys, time
from tests.chaos.big_prompt import gateway_http, worker_rpc
door, worker, url, model = sys.argv[1:5]
began = time.monotonic()
answer = gateway_http(url, model) if door == "gateway" else worker_rpc(worker, door)
print(json.dumps({"answer": answer, "sending": [began, time.monotonic()]}))
"""


def lag_buckets(url: str) -> dict[float, float]:
    """The cumulative buckets of the process's event-loop lag histogram."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {float(s.labels["le"]): s.value for f in text_string_to_metric_families(text)
            if f.name.endswith("_event_loop_lag_seconds") for s in f.samples if s.name.endswith("_bucket")}


def late(before: dict[float, float], after: dict[float, float], bound: float) -> int:
    inf = float("inf")
    return int((after[inf] - before[inf]) - (after[bound] - before[bound]))


@contextmanager
def gateway_process(tmp: Path, worker: str) -> Iterator[str]:
    """`dgemma gateway` in front of one worker (round robin, as tests/chaos): its URL once it is ready."""
    port_file = tmp / "gateway.json"
    with open(tmp / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dgemma_cli.main", "gateway", "--host", "127.0.0.1", "--port",
                                 "0", "--grpc-port", "-1", "--port-file", str(port_file), "--model", MODEL,
                                 "--endpoint", worker, "--routing-profile", "round-robin"], stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "gateway.log").read_text()[-3000:]
            if port_file.exists():
                url = f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}"
                try:
                    with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


async def live_stream(url: str, arrivals: list[float], started: asyncio.Event) -> None:
    """A long streamed chat with a draft every step; each SSE data line's arrival time goes into `arrivals`."""
    body = {"model": MODEL, "stream": True, "stream_drafts": True, "max_tokens": 4000, "max_denoising_steps": 12,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Go on"}]}
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                started.set()


async def run(tmp: Path, repeat: int) -> list[dict[str, Any]]:
    workers = LocalWorkers(str(tiny_model_dir()), 1, MODEL, ["--max-active", "2", "--max-queue", "4",
                                                               "--metrics-port", "0"],
                           env={"DGEMMA_DEBUG_STEP_DELAY_S": STEP_DELAY_S}, workdir=tmp)
    arrivals: list[float] = []
    with workers.running(stop_timeout=5):
        worker = workers.workers[0]
        metrics = {"worker": f"http://127.0.0.1:{json.loads(worker.port_file.read_text())['metrics_port']}/metrics"}
        with gateway_process(tmp, worker.address) as url:
            metrics["gateway"] = f"{url}/metrics"
            started = asyncio.Event()
            stream = asyncio.create_task(live_stream(url, arrivals, started))
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(1.0)
            tries = []
            for _ in range(repeat):
                for door in DOORS:
                    before = {p: lag_buckets(u) for p, u in metrics.items()}
                    sender = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", SEND, door, worker.address, url, MODEL, cwd=ROOT,
                        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                        preexec_fn=die_with_parent())
                    out, _ = await sender.communicate()
                    await asyncio.sleep(1.0)  # the loops' probes see a stall only once it is over
                    after = {p: lag_buckets(u) for p, u in metrics.items()}
                    tries.append({"door": door, **json.loads(out),
                                  "late": {p: [late(before[p], after[p], b) for b in LATE_S] for p in metrics}})
                    await asyncio.sleep(0.5)
            assert not stream.done(), "the live stream ended before the last try"
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
    gaps = list(itertools.pairwise(arrivals))
    step = statistics.median(b - a for a, b in gaps)
    for t in tries:
        began, ended = t["sending"]
        t["gap_ms"] = round(1000 * max((b - a for a, b in gaps if b >= began and a <= ended), default=0.0), 1)
        t["step_ms"] = round(1000 * step, 1)
        t["send_ms"] = round(1000 * (ended - began))
    return tries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="tries per door")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tries = asyncio.run(run(Path(tmp), args.repeat))
    print(f"live stream's step (median gap): {tries[0]['step_ms']} ms\n")
    print("| door | answer | sent and answered in | stream's largest gap | worker loop late >25/50/100 ms | "
          "gateway loop late >25/50/100 ms |")
    print("|---|---|---:|---:|---|---|")
    for t in tries:
        print(f"| {t['door']} | {t['answer']} | {t['send_ms']} ms | {t['gap_ms']} ms | "
              f"{'/'.join(map(str, t['late']['worker']))} | {'/'.join(map(str, t['late']['gateway']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
