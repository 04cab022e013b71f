"""The load of an upstream that reports none (an external API, an OpenAI server without vLLM's metrics):
what the gateway measured of its own requests there.

Each finished request gives the seconds one canvas took, divided by the requests this gateway had in flight
there when it started: the share of the upstream one request used, which is what the router's interleaving
model multiplies back by the requests present. A service that does not slow down with concurrency then
predicts the same latency at any load up to its concurrency limit. Until a request has finished, the
variant's tokens/s prior stands in (the load carries no latency).
"""

from __future__ import annotations

from dataclasses import dataclass

from dgemma_gateway.types import EndpointLoad, Variant


@dataclass
class MeasuredLatency:
    """Smoothed per-canvas seconds and tokens/s of the requests that finished at one upstream."""

    alpha: float = 0.3
    canvas_share_s: float = 0.0  # seconds of one canvas, per request in flight (0: not measured yet)
    tokens_per_s: float = 0.0

    def observe(self, elapsed_s: float, canvases: int, tokens: int, concurrency: int) -> None:
        """A request finished after `elapsed_s`, with `concurrency` requests in flight when it started."""
        if elapsed_s <= 0 or canvases <= 0:
            return
        share = elapsed_s / canvases / max(1, concurrency)
        rate = tokens / elapsed_s
        if self.canvas_share_s <= 0:
            self.canvas_share_s, self.tokens_per_s = share, rate
            return
        self.canvas_share_s += self.alpha * (share - self.canvas_share_s)
        self.tokens_per_s += self.alpha * (rate - self.tokens_per_s)

    def load(self, variant: Variant, inflight: int, capacity: int, max_queue: int, now: float, ready: bool = True
             ) -> EndpointLoad:
        """The canonical load: this gateway's requests there, and a canvas as max_denoising_steps + 1 passes."""
        step_s = self.canvas_share_s / (max(1, variant.max_denoising_steps) + 1)
        return EndpointLoad(
            queue_depth=max(0, inflight - capacity), active=min(inflight, capacity), capacity=capacity,
            max_queue=max_queue,
            step_latency_s=step_s, encoder_latency_s=step_s, tokens_per_s=self.tokens_per_s,
            canvas_length=variant.canvas_length, model_name=variant.model, ready=ready, draining=False,
            observed_at=now,
        )
