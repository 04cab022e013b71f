"""Worker benchmarks: gRPC streaming overhead against the engine in-process, and many concurrent streams.

    python bench/bench_worker.py [--model PATH] [--requests 6] [--rounds 3] [--concurrency 64]

The worker runs as its own process (as in a pod); the client and the in-process engine run here. Rounds
alternate one in-process and one gRPC request so that drift on a shared machine hits both alike; the
median of the per-pair ratios is the overhead.
Results go to stdout and bench/out/worker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from dgemma_common.params import GenerationParams
from dgemma_common.types import CommitEvent, Prompt
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.lifetime import die_with_parent

PROMPT = "Why is the sky blue?"
# One torch thread in both the worker and the in-process engine: same settings, and less noise from
# other work on a small shared machine.
THREADS = 1


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_worker(model: str, max_active: int, max_queue: int) -> tuple[subprocess.Popen[bytes], int]:
    """A worker process on a free port; returns it and its gRPC port once SERVING."""
    port_file = Path(tempfile.mkdtemp()) / "ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgemma_worker.server", "--model", model, "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "off", "--port-file", str(port_file), "--max-active", str(max_active),
         "--max-queue", str(max_queue)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)}, preexec_fn=die_with_parent(),
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("worker did not start")
        time.sleep(0.1)
    port = int(json.loads(port_file.read_text())["port"])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DenoiserStub(channel)
        while not stub.GetLoad(pb.GetLoadRequest()).ready:
            time.sleep(0.1)
    return proc, port


async def grpc_round(stub: Any, n: int, params: GenerationParams) -> tuple[int, float]:
    """n sequential streamed requests over gRPC on an open channel; (tokens, seconds)."""
    req_params = pb.GenerationParams(
        max_new_tokens=params.max_new_tokens, max_denoising_steps=params.max_denoising_steps,
        ignore_eos=params.ignore_eos,
    )
    tokens = 0
    started = time.perf_counter()
    for i in range(n):
        req_params.seed = i
        async for r in stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text=PROMPT), params=req_params)):
            if r.HasField("commit"):
                tokens += len(r.commit.token_ids)
    return tokens, time.perf_counter() - started


async def engine_round(engine: Any, n: int, params: GenerationParams) -> tuple[int, float]:
    """The same requests through the in-process engine's async stream."""
    from dataclasses import replace

    tokens = 0
    started = time.perf_counter()
    for i in range(n):
        async for event in engine.stream(Prompt.of_text(PROMPT), replace(params, seed=i)):
            if isinstance(event, CommitEvent):
                tokens += len(event.token_ids)
    return tokens, time.perf_counter() - started


def overhead(model: str, requests: int, rounds: int, params: GenerationParams) -> dict[str, Any]:
    """Tokens/s streaming over gRPC vs in-process, same model and settings."""
    import torch

    from dgemma_worker.engine import Engine, EngineConfig
    from dgemma_worker.model import load_model

    torch.set_num_threads(THREADS)
    engine = Engine(load_model(model), EngineConfig(max_active=1, max_queue=4))
    engine.start(warmup=True)
    proc, port = start_worker(model, 1, 4)
    local: list[float] = []
    remote: list[float] = []

    async def pairs() -> None:
        # One channel for the whole run, as a gateway keeps its channels open.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DenoiserStub(channel)
            await engine_round(engine, 1, params)  # warm both paths once
            await grpc_round(stub, 1, params)
            for _ in range(rounds * requests):
                t, s = await engine_round(engine, 1, params)
                local.append(t / s)
                t, s = await grpc_round(stub, 1, params)
                remote.append(t / s)

    try:
        asyncio.run(pairs())
    finally:
        engine.shutdown()
        proc.terminate()
        proc.wait(30)
    ratios = [r / lo for lo, r in zip(local, remote, strict=True)]
    return {
        "pairs": len(ratios),
        "in_process_tokens_per_s_median": round(statistics.median(local), 2),
        "grpc_tokens_per_s_median": round(statistics.median(remote), 2),
        "overhead_pct_median_of_pairs": round(100 * (1 - statistics.median(ratios)), 2),
        "overhead_pct_of_totals": round(100 * (1 - sum(remote) / sum(local)), 2),
    }


async def _burst(port: int, concurrency: int, params: pb.GenerationParams) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DenoiserStub(channel)

        async def one(i: int) -> str:
            try:
                async for _ in stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text=f"{PROMPT} {i}"),
                                                                params=params)):
                    pass
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        for code in await asyncio.gather(*(one(i) for i in range(concurrency))):
            outcomes[code] = outcomes.get(code, 0) + 1
    return outcomes


def concurrency(model: str, streams: int, waves: int, max_active: int, max_queue: int) -> dict[str, Any]:
    """Waves of many concurrent streams against a bounded queue: outcomes and the worker's memory."""
    proc, port = start_worker(model, max_active, max_queue)
    params = pb.GenerationParams(max_new_tokens=64, max_denoising_steps=8, ignore_eos=True)
    result: dict[str, Any] = {"streams": streams, "max_active": max_active, "max_queue": max_queue, "waves": []}
    try:
        result["rss_idle_mib"] = round(_proc_kib(proc.pid, "VmRSS") / 1024, 1)
        for _ in range(waves):
            started = time.perf_counter()
            outcomes = asyncio.run(_burst(port, streams, params))
            result["waves"].append({
                "outcomes": outcomes,
                "seconds": round(time.perf_counter() - started, 2),
                "rss_after_mib": round(_proc_kib(proc.pid, "VmRSS") / 1024, 1),
            })
        result["peak_rss_mib"] = round(_proc_kib(proc.pid, "VmHWM") / 1024, 1)
    finally:
        proc.terminate()
        proc.wait(30)
    return result


def main() -> int:
    """Run both benchmarks and print the results as JSON."""
    from dgemma_worker.model import tiny_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny model)")
    ap.add_argument("--requests", type=int, default=6, help="requests per round (overhead)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (overhead)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="max_denoising_steps")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent streams per wave")
    ap.add_argument("--waves", type=int, default=3)
    args = ap.parse_args()
    model = args.model or str(tiny_model_dir())
    params = GenerationParams(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, ignore_eos=True)
    out = {
        "model": model,
        "cpu_count": os.cpu_count(),
        "settings": {"max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps},
        "overhead": overhead(model, args.requests, args.rounds, params),
        "concurrency": concurrency(model, args.concurrency, args.waves, max_active=4, max_queue=16),
    }
    text = json.dumps(out, indent=2)
    print(text)
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "worker.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
