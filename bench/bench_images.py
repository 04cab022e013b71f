"""Images: what they cost in the worker's encoder pass, and what the gateway adds to a request that carries one.

1. Encoder: the tiny model's first encoder pass for the same chat prompt with 0, 1 and 4 images (640 x 480 JPEG
   photos of noise, 70 soft tokens each on the tiny model), median of --passes, in one process; plus the
   preprocessing (decode + the processor) that precedes it.
2. Gateway: the same request straight to a worker (gRPC, image bytes in the message) and through the gateway
   (HTTP, the OpenAI API, the image as a base64 data: URL in the JSON), text-only and with a 1 MB image,
   interleaved; the added latency is the median (and p99) of the per-pair differences. The worker takes one
   denoising step so the gateway's own cost shows.

    python bench/bench_images.py [--passes 30] [--requests 100]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import time
from typing import Any

import aiohttp
import grpc
import numpy as np
from bench_gateway import MODEL, local_stack, pct, save
from PIL import Image

from dgemma_common.params import GenerationParams
from dgemma_common.types import ChatMessage, ImageData, Prompt, RequestStats, StopReason
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc

QUESTION = "What is in these pictures?"


def noise_image(fmt: str, size: tuple[int, int], seed: int, **save_args: Any) -> bytes:
    """An image of random pixels (incompressible, so its file is as large as its format makes it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **save_args)
    return out.getvalue()


class EncoderTimes:
    """The engine's observer: seconds of each encoder pass."""

    def __init__(self) -> None:
        self.encoder: list[float] = []

    def on_step(self, kind: str, seconds: float) -> None:
        if kind == "encoder":
            self.encoder.append(seconds)

    def on_request_end(self, reason: StopReason, stats: RequestStats) -> None:
        pass


def encoder_cost(passes: int) -> dict[str, Any]:
    """First encoder pass and preprocessing with 0, 1 and 4 images, same question, tiny model, one process."""
    from dgemma_worker.engine import Engine, EngineConfig
    from dgemma_worker.model import load_model, tiny_model_dir

    loaded = load_model(tiny_model_dir(), device="cpu")
    times = EncoderTimes()
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=1), observer=times)
    engine.start(warmup=True)
    photos = [ImageData(noise_image("JPEG", (640, 480), seed, quality=90)) for seed in range(4)]
    params = GenerationParams(max_new_tokens=1, max_denoising_steps=1, seed=0)
    rows: dict[str, Any] = {}
    try:
        for count in (0, 1, 4):
            prompt = Prompt.of_messages([ChatMessage("user", (*photos[:count], QUESTION) if count else QUESTION)])
            prepare, encode = [], []
            for _ in range(passes):
                started = time.perf_counter()
                tokens = len(engine.tokenize(prompt))
                prepare.append(time.perf_counter() - started)
                times.encoder.clear()
                list(engine.generate(prompt, params))
                encode.append(times.encoder[0])  # the first pass: the prompt, images included
            rows[f"{count}_images"] = {"prompt_tokens": tokens,
                                       "preprocess_ms": statistics.median(prepare) * 1000,
                                       "encoder_pass_ms": statistics.median(encode) * 1000}
    finally:
        engine.shutdown()
    base = rows["0_images"]["encoder_pass_ms"]
    for row in rows.values():
        row["encoder_pass_vs_text_only"] = row["encoder_pass_ms"] / base
    return rows


SETTINGS = {"max_tokens": 4, "max_denoising_steps": 1, "seed": 1, "ignore_eos": True}


async def direct_one(stub: Any, image: bytes | None) -> float:
    parts = [pb.ContentPart(image=pb.Image(data=image))] if image else []
    message = pb.ChatMessage(role="user", parts=[*parts, pb.ContentPart(text=QUESTION)])
    request = pb.GenerateRequest(prompt=pb.Prompt(chat=pb.ChatMessages(messages=[message])), params=pb.GenerationParams(
        max_new_tokens=4, max_denoising_steps=1, seed=1, ignore_eos=True))
    started = time.perf_counter()
    async for _ in stub.Generate(request, timeout=60):
        pass
    return time.perf_counter() - started


async def gateway_one(session: aiohttp.ClientSession, url: str, image: bytes | None) -> float:
    parts: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if image:
        data_url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], **SETTINGS}
    started = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        await r.read()
    return time.perf_counter() - started


async def gateway_cost(address: str, url: str, n: int, image: bytes) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 16 << 20)])
    stub = pb_grpc.DenoiserStub(channel)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for name, payload in (("text_only", None), ("image_1mb", image)):
            for _ in range(5):  # warm both paths
                await direct_one(stub, payload)
                await gateway_one(session, url, payload)
            direct, via = [], []
            for _ in range(n):  # interleaved, so both see the same machine state
                direct.append(await direct_one(stub, payload))
                via.append(await gateway_one(session, url, payload))
            added = [v - d for v, d in zip(via, direct, strict=True)]
            out[name] = {"requests": n, "direct_p50_ms": pct(direct, 0.5) * 1000,
                         "gateway_p50_ms": pct(via, 0.5) * 1000,
                         "added_median_of_pairs_ms": statistics.median(added) * 1000,
                         "added_p99_of_pairs_ms": pct(added, 0.99) * 1000}
    await channel.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--passes", type=int, default=30)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    image = noise_image("PNG", (600, 580), seed=7)  # 1.0 MB of PNG
    result: dict[str, Any] = {"encoder": encoder_cost(args.passes), "image_bytes": len(image)}
    with local_stack(["--max-active", "4", "--max-queue", "16"], ["--max-streams-per-key", "0"]) as (address, url):
        result["gateway"] = asyncio.run(gateway_cost(address, url, args.requests, image))
    result["cpus"] = os.cpu_count()
    save("bench_images", result)


if __name__ == "__main__":
    main()
