"""The trained checkpoint: adaptive stopping, the step cap's quality/speed curve, and what the gateway and
the autoscaler make of a model that stops early, all from one run.

    python bench/bench_trained.py [--model DIR] [--prompts 48] [--requests 160] [--concurrency 4]

1. Engine, in process, one torch thread: every held-out prompt (hack/calibrate_tiny.py) at step caps
   4/8/16/32/48 with the checkpoint's calibrated settings, at 48 with stopping off (the reference for
   agreement), and at 48 with transformers' published settings, interleaved prompt by prompt so every
   setting sees the same machine. Up to two canvases each.
2. `dgemma serve --replicas 2` on the same checkpoint: a mixed workload (max_tokens 16-96, the default
   cap or 16 or 8 steps) from a few concurrent clients. Each response says what the gateway predicted and
   from what (canvases, steps per canvas, step and encoder latency); the same prediction with a fixed
   48-step assumption, and with one share learned across all caps (the gateway before per-cap learning),
   follow exactly from those parts. The autoscaler's inputs (`GET /v1/dgemma/demand`) are read during the
   run: its capacity estimate against the canvases/s each replica delivered while it had requests (from the
   client's clock and the gateway's `x-dgemma-endpoint` header), and its demand
   (canvases the window's requests are expected to run) against the canvases those requests really ran and
   against all that their max_tokens allowed (what demand counted before snapshot version 2).

Results: printed as JSON and written to bench/out/trained.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

from calibrate_tiny import (  # noqa: E402
    NEVER,
    SEED,
    cut_at_eos,
    dictionary,
    generate,
    heldout_prompts,
    quality,
    recording,
)

from dgemma_common.types import Prompt  # noqa: E402
from dgemma_serve.lifetime import die_with_parent  # noqa: E402
from dgemma_worker.engine import Engine, EngineConfig  # noqa: E402
from dgemma_worker.model import BUNDLED_MODEL_DIR, load_model  # noqa: E402

CAPS = (4, 8, 16, 32, 48)
FULL = 48


def pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


# ---- 1. the engine -----------------------------------------------------------------------------


def engine_section(model: Path, prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Steps per canvas with adaptive stopping vs the cap, and the quality/speed curve of the cap."""
    torch.set_num_threads(1)
    loaded = load_model(model, dtype="float32")
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=0))
    engine.start(warmup=True)
    words = dictionary()
    settings = {f"cap {c}": replace(engine.defaults, max_denoising_steps=c) for c in CAPS}
    settings["cap 48, stopping off"] = replace(engine.defaults, max_denoising_steps=FULL, stability_threshold=NEVER)
    # transformers' published sampling settings, for the "no worse than before calibration" comparison.
    settings["cap 48, published settings"] = replace(engine.defaults, max_denoising_steps=FULL, entropy_bound=0.1,
                                                    stability_threshold=1, confidence_threshold=0.005)
    runs: dict[str, list[tuple[Any, list[int]]]] = {name: [] for name in settings}
    try:
        with recording() as recorder:
            for i, prompt in enumerate(prompts):
                for name, base in settings.items():
                    params = replace(base, max_new_tokens=2 * engine.canvas_length, seed=SEED + i)
                    recorder.canvases = []
                    out = generate(engine, prompt, params)
                    runs[name].append((out, [len(c) for c in recorder.canvases]))
    finally:
        engine.shutdown()
    eos = loaded.eos_token_ids
    reference = [cut_at_eos(out.ids, eos) for out, _ in runs["cap 48, stopping off"]]
    curve = {}
    for name, results in runs.items():
        steps = [s for _, per_canvas in results for s in per_canvas]
        seconds = sum(out.seconds for out, _ in results)
        canvases = sum(out.canvases for out, _ in results)
        q = quality(loaded, [(out.prompt_ids, cut_at_eos(out.ids, eos)) for out, _ in results], reference, words)
        curve[name] = {
            "steps_per_canvas_mean": statistics.fmean(steps),
            "steps_per_canvas_p10_p50_p90": [pct(steps, 0.1), pct(steps, 0.5), pct(steps, 0.9)],
            "canvas_tokens_per_s": canvases * engine.canvas_length / seconds,
            "reply_tokens_per_s": sum(len(out.ids) for out, _ in results) / seconds,
            "agreement_with_reference": q.agreement, "real_word_share": q.words, "model_nll": q.nll,
        }
    adaptive = [s for _, per_canvas in runs[f"cap {FULL}"] for s in per_canvas]
    histogram: dict[str, int] = {}
    for lo in range(0, FULL, 4):
        histogram[f"{lo + 1}-{lo + 4}"] = sum(lo < s <= lo + 4 for s in adaptive)
    sample = {f"{i}": runs[f"cap {FULL}"][i][0].text for i in range(3)}
    return {"prompts": len(prompts), "curve": curve, "adaptive_steps_histogram": histogram, "sample_replies": sample,
            "defaults": {"entropy_bound": engine.defaults.entropy_bound,
                         "stability_threshold": engine.defaults.stability_threshold,
                         "confidence_threshold": engine.defaults.confidence_threshold}}


# ---- 2. the gateway and the autoscaler ----------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """One request through the gateway."""

    started: float
    finished: float
    max_tokens: int
    cap: int | None
    canvases: int
    passes: int
    predicted_ms: float
    parts: dict[str, Any]
    endpoint: str  # the replica that served it (the gateway's x-dgemma-endpoint header)

    @property
    def actual_ms(self) -> float:
        return (self.finished - self.started) * 1000


def start_serve(model: Path, replicas: int) -> tuple[subprocess.Popen[str], str]:
    """`dgemma serve --replicas N` as a user runs it; returns the process and the gateway's URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgemma_cli.main", "serve", "--model", str(model), "--replicas", str(replicas),
         "--port", "0", "--grpc-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=die_with_parent())
    assert proc.stdout is not None
    url = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        found = re.search(r"gateway at (http://[0-9.:]+)", line)
        url = found.group(1) if found else url
        if "ready. Try" in line:
            break
        if time.monotonic() > deadline:
            break
    if url is None or proc.poll() is not None:
        raise RuntimeError("dgemma serve did not start")
    return proc, url


async def one(session: aiohttp.ClientSession, url: str, model: str, prompt: Prompt, max_tokens: int,
              cap: int | None, seed: int) -> Done:
    assert prompt.messages is not None
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "seed": seed,
                            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages]}
    if cap is not None:
        body["max_denoising_steps"] = cap
    started = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        reply = await r.json()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {reply}")
        endpoint = r.headers.get("x-dgemma-endpoint", "")
    extra = reply["dgemma"]
    return Done(started, time.monotonic(), max_tokens, cap, extra["canvases"], extra["decoder_passes"],
                extra["predicted_ms"], extra["prediction"], endpoint)


async def workload(url: str, model: str, prompts: Sequence[Prompt], requests: int, concurrency: int,
                   ) -> tuple[list[Done], list[dict[str, Any]], float]:
    """The mixed workload; also polls the demand snapshot. Returns requests, snapshots and wall seconds."""
    rng = random.Random(SEED)
    chat = [p for p in prompts if p.messages is not None]
    plan = [(rng.choice(chat), rng.choice((16, 32, 64, 96)), rng.choice((None, None, 16, 8)), i)
            for i in range(requests)]
    done: list[Done] = []
    snaps: list[dict[str, Any]] = []
    queue = list(plan)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client() -> None:
            while queue:
                prompt, max_tokens, cap, i = queue.pop(0)
                done.append(await one(session, url, model, prompt, max_tokens, cap, SEED + i))

        async def poll() -> None:
            while True:
                async with session.get(f"{url}/v1/dgemma/demand") as r:
                    snaps.append({"t": time.monotonic(), **(await r.json())})
                await asyncio.sleep(2.0)

        poller = asyncio.create_task(poll())
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.monotonic() - started
        poller.cancel()
    return done, snaps, wall


def own(parts: dict[str, Any], steps: float, canvases: float) -> float:
    """The work a prediction charges one request: canvases x (encoder pass + steps x step latency)."""
    return float(canvases * (parts["encoder_ms"] + steps * parts["step_ms"]))


def counterfactual(d: Done, steps: float, canvases: float) -> float:
    """The same prediction with other steps per canvas and canvases: it is proportional to `own`
    (queue wait and sharing are multiples of it), so it scales exactly."""
    p = d.parts
    return d.predicted_ms * own(p, steps, canvases) / own(p, p["steps_per_canvas"], p["expected_canvases"])


def single_share_steps(done: Sequence[Done], alpha: float = 0.2, default_cap: int = FULL) -> list[float]:
    """Steps per canvas the gateway predicted before per-cap learning: one share learned across all caps.

    Replays its moving average over the requests in the order they finished, as it saw them when each was
    routed.
    """
    finished = sorted(done, key=lambda d: d.finished)
    out = []
    for d in done:
        share: float | None = None
        for f in finished:
            if f.finished > d.started:
                break
            s = f.passes / (f.canvases * (f.cap or default_cap))
            share = s if share is None else share + alpha * (s - share)
        out.append(max(1.0, (d.cap or default_cap) * (1.0 if share is None else share)))
    return out


def errors(predicted: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    rel = [p / a - 1 for p, a in zip(predicted, actual, strict=True)]
    return {"abs_p50": pct([abs(r) for r in rel], 0.5), "abs_p90": pct([abs(r) for r in rel], 0.9),
            "signed_median": statistics.median(rel)}


def busy_rate(done: Sequence[Done]) -> float:
    """Canvases/s the fleet finished while every client kept a request in (until the last request started)."""
    start, end = min(d.started for d in done), max(d.started for d in done)
    return sum(d.canvases for d in done if d.finished <= end) / (end - start)


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time a replica had at least one request."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def replica_capacity(done: Sequence[Done]) -> dict[str, Any]:
    """What each replica finished per second while it had a request (seen from the client: from a request's
    start to its reply), the capacity the autoscaler estimates; and each replica's share of the canvases
    (the router packs replicas that meet the target before it spreads, so one replica kept half busy says
    little about what a replica can do)."""
    per: dict[str, Any] = {}
    for endpoint in sorted({d.endpoint for d in done}):
        mine = [d for d in done if d.endpoint == endpoint]
        busy = busy_seconds([(d.started, d.finished) for d in mine])
        canvases = sum(d.canvases for d in mine)
        per[endpoint] = {"canvases": canvases, "busy_s": busy, "canvases_per_busy_s": canvases / busy}
    total = sum(p["canvases"] for p in per.values())
    return {"replicas": per,
            "canvases_per_busy_s": sum(p["canvases"] for p in per.values()) / sum(p["busy_s"] for p in per.values()),
            "largest_share_of_canvases": max(p["canvases"] for p in per.values()) / total}


def demand_vs_actual(snaps: Sequence[dict[str, Any]], done: Sequence[Done], canvas: int = 32) -> dict[str, Any]:
    """Per snapshot, the demand in canvases over its window (the autoscaler's input: attributed; and routed)
    against what the requests routed in that window really ran and what their max_tokens allowed."""
    rows = []
    for s in snaps:
        window = s["window_s"]
        mine = [d for d in done if s["t"] - window < d.started <= s["t"]]
        ran = sum(d.canvases for d in mine)
        if not ran:
            continue
        views = s["variants"].values()
        rows.append({"ran": ran, "allowed": sum(-(-d.max_tokens // canvas) for d in mine),
                     "attributed": sum(v["demand"]["canvases_per_s"] for v in views) * window,
                     "routed": sum(v["demand"]["routed_canvases_per_s"] for v in views) * window})
    return {
        "snapshots": len(rows),
        "attributed_per_ran_median": statistics.median(r["attributed"] / r["ran"] for r in rows) if rows else None,
        "routed_per_ran_median": statistics.median(r["routed"] / r["ran"] for r in rows) if rows else None,
        "allowed_per_ran_median": statistics.median(r["allowed"] / r["ran"] for r in rows) if rows else None,
        "last": rows[-1] if rows else None,
    }


def gateway_section(model: Path, prompts: Sequence[Prompt], requests: int, concurrency: int) -> dict[str, Any]:
    proc, url = start_serve(model, 2)
    try:
        done, snaps, wall = asyncio.run(workload(url, model.name, prompts, requests, concurrency))
    finally:
        proc.terminate()
        proc.wait(60)
    warm = sorted(done, key=lambda d: d.started)[10:]  # once the first ten have taught the gateway
    actual = [d.actual_ms for d in warm]
    old_steps = dict(zip(map(id, done), single_share_steps(done), strict=True))
    steps_models = {"fixed_48_steps": lambda d: float(d.cap or FULL), "single_share": lambda d: old_steps[id(d)],
                    "learned_per_cap": lambda d: d.parts["steps_per_canvas"]}
    canvas_models = {"allowed": lambda d: float(d.parts["canvases"]),
                     "learned_replies": lambda d: d.parts["expected_canvases"]}
    prediction_error = {
        f"{sm} x {cm}": errors([counterfactual(d, sf(d), cf(d)) for d in warm], actual)
        for cm, cf in canvas_models.items() for sm, sf in steps_models.items()}
    by_cap: dict[str, Any] = {}
    for cap in sorted({d.cap or FULL for d in done}):
        mine = [d for d in done if (d.cap or FULL) == cap]
        by_cap[str(cap)] = {"requests": len(mine), "steps_per_canvas": sum(d.passes for d in mine) /
                            sum(d.canvases for d in mine)}
    asked = sum(-(-d.max_tokens // 32) for d in done)
    used = sum(d.canvases for d in done)
    busy = [s for s in snaps if s["variants"]]
    half = busy[len(busy) // 2 :]  # once the shares and latencies have settled
    estimates = [v["capacity"]["canvases_per_s_per_replica"] for s in half for v in s["variants"].values()
                 if v["capacity"]["canvases_per_s_per_replica"] is not None]
    # What the capacity model charged a canvas before it followed the traffic: the default cap's steps, with
    # the same step and encoder latencies (read from the same snapshots).
    before = [1 / (FULL * v["step_shares"][str(FULL)] * v["capacity"]["step_latency_s"]
                   + v["capacity"]["encoder_latency_s"])
              for s in half for v in s["variants"].values()
              if v["capacity"]["step_latency_s"] and str(FULL) in v["step_shares"]]
    # The same snapshots, each step charged its own latency rather than the worker's busy time per step (the
    # gateway before `step_cost_s`).
    by_step_latency = [1 / (v["capacity"]["steps_per_canvas"] * v["capacity"]["step_latency_s"]
                            + v["capacity"]["encoder_latency_s"])
                       for s in half for v in s["variants"].values() if v["capacity"]["step_latency_s"]]
    raw = [{"t": round(d.started - done[0].started, 3), "max_tokens": d.max_tokens, "cap": d.cap,
            "canvases": d.canvases, "passes": d.passes, "actual_ms": round(d.actual_ms, 1),
            "predicted_ms": d.predicted_ms, **d.parts} for d in sorted(done, key=lambda d: d.started)]
    return {
        "raw": raw,
        "requests": len(done), "concurrency": concurrency, "replicas": 2, "wall_s": wall,
        "steps_per_canvas_by_cap": by_cap,
        "canvases_used_per_asked": used / asked,
        "prediction_error": prediction_error,
        "capacity": {
            "estimate_canvases_per_s_per_replica_median": statistics.median(estimates) if estimates else None,
            "estimate_at_the_default_caps_steps_median": statistics.median(before) if before else None,
            "estimate_charging_step_latency_median": statistics.median(by_step_latency) if by_step_latency else None,
            # What a replica delivered while it had requests: the capacity to compare with.
            "measured": replica_capacity(done),
            # The fleet's rate split evenly: not a replica's capacity where the router packs one replica first.
            "fleet_canvases_per_s_per_replica": busy_rate(done) / 2,
            "step_shares_at_end": busy[-1]["variants"] if busy else None,
        },
        # Once the first window's replies have taught the gateway their lengths.
        "demand": demand_vs_actual(half, done),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    prompts = heldout_prompts(args.prompts)
    result: dict[str, Any] = {"model": str(args.model), "cpus": os.cpu_count()}
    if not args.skip_engine:
        result["engine"] = engine_section(args.model, prompts)
    result["gateway"] = gateway_section(args.model, prompts, args.requests, args.concurrency)
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "trained.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
