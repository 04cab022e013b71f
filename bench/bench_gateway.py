"""Gateway overhead: the same requests straight to a worker (gRPC) and through the gateway (HTTP,
OpenAI API), in the same run. Reports added latency p50/p99 and aggregate throughput with many
concurrent streams. The worker runs the tiny model with one denoising step, so the worker does as
little as possible and the gateway's own cost shows.

    python bench/bench_gateway.py [--requests 400] [--concurrency 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.lifetime import die_with_parent
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir

MODEL = "tiny"
PROMPT = "Hello there"
SETTINGS: dict[str, Any] = {"max_tokens": 4, "max_denoising_steps": 1, "seed": 1}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def direct_one(stub: Any) -> float:
    t = time.perf_counter()
    req = pb.GenerateRequest(prompt=pb.Prompt(text=PROMPT), params=pb.GenerationParams(
        max_new_tokens=SETTINGS["max_tokens"], max_denoising_steps=SETTINGS["max_denoising_steps"],
        seed=SETTINGS["seed"], ignore_eos=True))
    async for _ in stub.Generate(req, timeout=60):
        pass
    return time.perf_counter() - t


async def gateway_one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    t = time.perf_counter()
    body = {"model": MODEL, "prompt": PROMPT, "stream": stream, "ignore_eos": True, **SETTINGS}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        await r.read()
    return time.perf_counter() - t


async def throughput(fn: Any, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await fn()
            done += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / seconds


async def measure(address: str, url: str, n: int, concurrency: int, seconds: float) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.DenoiserStub(channel)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):  # warm both paths
            await direct_one(stub)
            await gateway_one(session, url, True)
        direct, via, via_stream = [], [], []
        for _ in range(n):  # interleaved, so both see the same machine state
            direct.append(await direct_one(stub))
            via.append(await gateway_one(session, url, False))
            via_stream.append(await gateway_one(session, url, True))
        tp_direct = await throughput(lambda: direct_one(stub), concurrency, seconds)
        tp_gateway = await throughput(lambda: gateway_one(session, url, True), concurrency, seconds)
    await channel.close()
    ms = 1000.0
    return {
        "requests": n,
        "direct_p50_ms": pct(direct, 0.5) * ms, "direct_p99_ms": pct(direct, 0.99) * ms,
        "gateway_p50_ms": pct(via, 0.5) * ms, "gateway_p99_ms": pct(via, 0.99) * ms,
        "gateway_stream_p50_ms": pct(via_stream, 0.5) * ms, "gateway_stream_p99_ms": pct(via_stream, 0.99) * ms,
        "added_p50_ms": (pct(via, 0.5) - pct(direct, 0.5)) * ms,
        "added_p99_ms": (pct(via, 0.99) - pct(direct, 0.99)) * ms,
        "added_stream_p50_ms": (pct(via_stream, 0.5) - pct(direct, 0.5)) * ms,
        "added_stream_p99_ms": (pct(via_stream, 0.99) - pct(direct, 0.99)) * ms,
        "added_median_of_pairs_ms": statistics.median(v - d for v, d in zip(via, direct, strict=True)) * ms,
        "added_p99_of_pairs_ms": pct([v - d for v, d in zip(via, direct, strict=True)], 0.99) * ms,
        "concurrency": concurrency,
        "throughput_direct_rps": tp_direct,
        "throughput_gateway_rps": tp_gateway,
    }


@contextlib.contextmanager
def local_stack(worker_args: Sequence[str], gateway_args: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """A worker process on the tiny model and a gateway process in front of it: (worker address, gateway URL)."""
    workdir = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
    workers = LocalWorkers(str(tiny_model_dir()), 1, MODEL, list(worker_args), workdir=workdir)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        workers.start()
        workers.wait_bound()
        address = workers.workers[0].address
        port_file = workdir / "gateway.json"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "dgemma_cli.main", "gateway", "--endpoint", address, "--model", MODEL,
             "--host", "127.0.0.1", "--port", "0", "--grpc-port", "-1", "--port-file", str(port_file),
             *gateway_args],
            stdout=subprocess.DEVNULL, env={**os.environ}, preexec_fn=die_with_parent())
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}"

        async def ready() -> None:
            async with aiohttp.ClientSession() as s:
                while True:
                    async with s.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            return
                    await asyncio.sleep(0.2)

        asyncio.run(asyncio.wait_for(ready(), 180))
        yield address, url
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        workers.stop()


def save(name: str, result: dict[str, Any]) -> None:
    """Print a result and keep it under bench/out/."""
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    """Start a worker and a gateway process, measure, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with local_stack(["--max-active", "64", "--max-queue", "256"], ["--max-streams-per-key", "0"]) as (address, url):
        result = asyncio.run(measure(address, url, args.requests, args.concurrency, args.seconds))
    result["cpus"] = os.cpu_count()
    save("bench_gateway", result)


if __name__ == "__main__":
    main()
