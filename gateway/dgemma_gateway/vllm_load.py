"""The extractor for vLLM upstreams: a vLLM `/metrics` page as the canonical load (the one place vLLM's metric
names are read; the names themselves are pinned in `dgemma_common.vllm`).

From one scrape: requests running and waiting (gauges). From two scrapes, the requests that finished in
between: their RUNNING-phase time, their generated tokens and their decoder passes (denoising steps), which
give what a dgemma worker reports directly:

- step latency: RUNNING time / decoder passes, i.e. one decoder pass of one request as vLLM batched it (a
  dgemma worker's step latency is likewise one batched decoder step);
- steps per canvas: decoder passes / canvases, canvases per request being ceil(mean tokens / canvas length);
- tokens/s: the generation-tokens counter's rate.
Measurements are smoothed across scrapes; a window without finished requests keeps the last ones, and a
counter that went backwards (a restarted server) starts over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from dgemma_common import vllm
from dgemma_gateway.types import EndpointLoad, Variant

# Families read from a page; every other line is skipped before parsing (a page holds hundreds of series).
_FAMILIES = (vllm.RUNNING, vllm.WAITING, vllm.GENERATION_TOKENS, vllm.DENOISING_STEPS, vllm.INFERENCE_TIME,
             vllm.REQUEST_GENERATION_TOKENS)


@dataclass(frozen=True)
class VllmSample:
    """What one scrape says, summed over the server's engines (data parallel)."""

    running: float
    waiting: float
    generation_tokens: float  # counter
    denoising_steps: float  # counter: decoder passes, over all requests
    finished: float  # requests observed by the RUNNING-time histogram
    running_s: float  # their summed RUNNING time
    generated: float  # their summed generated tokens
    at: float  # the gateway's clock at the scrape


@dataclass(frozen=True)
class Timing:
    """Per-request costs measured from finished requests."""

    step_s: float  # one decoder pass of one request (0: not measured yet)
    steps_per_canvas: float  # 0: not measured yet
    tokens_per_s: float


def _wanted(text: str) -> Iterable[str]:
    for line in text.splitlines():
        bare = line[7:] if line.startswith("# TYPE ") else line
        if bare.startswith(_FAMILIES):
            yield line


def parse(text: str, at: float) -> VllmSample | None:
    """The sample of one page; None when the page has no vLLM scheduler gauges (not a vLLM server)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(_wanted(text)) + "\n"):
        for s in family.samples:
            if math.isfinite(s.value):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    if vllm.RUNNING not in sums:
        return None
    return VllmSample(
        running=sums[vllm.RUNNING],
        waiting=sums.get(vllm.WAITING, 0.0),
        generation_tokens=sums.get(f"{vllm.GENERATION_TOKENS}_total", 0.0),
        denoising_steps=sums.get(f"{vllm.DENOISING_STEPS}_total", 0.0),
        finished=sums.get(f"{vllm.INFERENCE_TIME}_count", 0.0),
        running_s=sums.get(f"{vllm.INFERENCE_TIME}_sum", 0.0),
        generated=sums.get(f"{vllm.REQUEST_GENERATION_TOKENS}_sum", 0.0),
        at=at,
    )


def timing(
    prev: VllmSample | None, cur: VllmSample, canvas_length: int, last: Timing | None, alpha: float = 0.3
) -> Timing | None:
    """The costs measured between two scrapes, smoothed into the last ones (None: nothing measured yet)."""
    if prev is None or _restarted(prev, cur):
        return last
    dt = cur.at - prev.at
    rate = (cur.generation_tokens - prev.generation_tokens) / dt if dt > 0 else 0.0
    tokens_per_s = rate if last is None else last.tokens_per_s + alpha * (rate - last.tokens_per_s)
    done = cur.finished - prev.finished
    steps = cur.denoising_steps - prev.denoising_steps
    if done <= 0 or steps <= 0:
        return Timing(last.step_s, last.steps_per_canvas, tokens_per_s) if last else Timing(0.0, 0.0, tokens_per_s)
    step_s = (cur.running_s - prev.running_s) / steps
    canvases = done * max(1, math.ceil((cur.generated - prev.generated) / done / max(1, canvas_length)))
    per_canvas = steps / canvases
    if last is None or last.step_s <= 0:
        return Timing(step_s, per_canvas, tokens_per_s)
    return Timing(last.step_s + alpha * (step_s - last.step_s),
                  last.steps_per_canvas + alpha * (per_canvas - last.steps_per_canvas), tokens_per_s)


def _restarted(prev: VllmSample, cur: VllmSample) -> bool:
    return (cur.finished < prev.finished or cur.denoising_steps < prev.denoising_steps
            or cur.generation_tokens < prev.generation_tokens)


def load(
    sample: VllmSample, measured: Timing | None, variant: Variant, capacity: int, max_queue: int, ready: bool
) -> EndpointLoad:
    """The canonical load of a vLLM endpoint. Its encoder pass is counted as one more decoder pass."""
    step_s = measured.step_s if measured is not None else 0.0
    return EndpointLoad(
        queue_depth=round(sample.waiting), active=round(sample.running), capacity=capacity, max_queue=max_queue,
        step_latency_s=step_s, encoder_latency_s=step_s,
        tokens_per_s=measured.tokens_per_s if measured is not None else 0.0,
        canvas_length=variant.canvas_length, model_name=variant.model, ready=ready, draining=False,
        observed_at=sample.at,
    )


def step_fraction(measured: Timing | None, variant: Variant) -> float | None:
    """The measured share of max_denoising_steps a canvas takes (None until measured)."""
    if measured is None or measured.steps_per_canvas <= 0:
        return None
    return min(1.0, measured.steps_per_canvas / max(1, variant.max_denoising_steps))
