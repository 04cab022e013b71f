"""The gateway: routes each request to an endpoint, streams its events back, retries before the first event.

Front ends (HTTP OpenAI API, KServe gRPC) turn client requests into a `GatewayRequest`, iterate
`Gateway.generate` and format what comes out; they never talk to endpoints themselves. An endpoint is a
dgemma worker (gRPC) or an OpenAI-compatible server (vLLM, an external API); both stream the same events.
An external API takes a request only when no local endpoint is predicted to meet its target
(`routing.overflow`); the request's demand still counts for the local variant it preferred.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from dgemma_common.convert import settings_to_pb
from dgemma_common.demand import DemandSnapshot
from dgemma_common.images import VisionSpec
from dgemma_common.logsafe import clip
from dgemma_common.tracing import outgoing_metadata
from dgemma_gateway.demand import DemandTracker, Routed, snapshot
from dgemma_gateway.endpoints import (
    ChannelFactory,
    Ejection,
    EndpointSource,
    EndpointState,
    Registry,
    StepsTaken,
    Work,
    worker_events,
)
from dgemma_gateway.errors import GatewayError, UpstreamFailure, from_upstream, worker_refused_key
from dgemma_gateway.metrics import GatewayMetrics
from dgemma_gateway.request import GatewayRequest
from dgemma_gateway.routing import Decision, Pipeline, route_with_overflow
from dgemma_gateway.routing.predict import Prediction, canvases_for, expected_canvases
from dgemma_gateway.runtimes import IMAGE_REFUSAL, IMAGE_RUNTIMES, has_images, refusal
from dgemma_gateway.types import RouteRequest, Runtime
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("dgemma_gateway")


# How a finished request says its reply ended: by itself, or cut by its token budget (what replies teach).
REPLY_ENDS = (pb.STOP_REASON_EOS, pb.STOP_REASON_STOP_STRING, pb.STOP_REASON_LENGTH)


def prediction_parts(p: Prediction) -> dict[str, Any]:
    """What a latency prediction was made of, for the response and logs (milliseconds, rounded)."""
    return {"canvases": p.canvases, "expected_canvases": round(p.expected_canvases, 3),
            "steps_per_canvas": round(p.steps_per_canvas, 3),
            "step_ms": round(p.step_latency_s * 1000, 3), "encoder_ms": round(p.encoder_s * 1000, 3),
            "queue_wait_ms": round(p.queue_wait_s * 1000, 3), "own_ms": round(p.own_s * 1000, 3),
            "overhead_ms": round(p.overhead_s * 1000, 3), "measured": p.measured}


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway core's knobs."""

    request_timeout_s: float = 600.0
    max_attempts: int = 3
    watch_interval_s: float = 0.5
    stale_after_s: float = 5.0
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    demand_window_s: float = 60.0
    # Scale from zero: how long a request may wait for a first replica of a model that has none ready (0: off).
    hold_for_replica_s: float = 0.0
    hold_poll_s: float = 0.1


class Gateway:
    """Endpoints, routing, upstream calls, measurements."""

    def __init__(
        self,
        pipeline: Pipeline,
        sources: Sequence[EndpointSource],
        settings: GatewaySettings | None = None,
        registry: Registry | None = None,
        open_channel: ChannelFactory | None = None,
    ) -> None:
        self.settings = settings or GatewaySettings()
        self.pipeline = pipeline
        self.sources = list(sources)
        self.registry = registry or Registry(
            ejection=Ejection(self.settings.eject_base_s, self.settings.eject_max_s),
            watch_interval_s=self.settings.watch_interval_s, open_channel=open_channel,
        )
        self.demand = DemandTracker(self.settings.demand_window_s)
        self._held: dict[str, tuple[int, float]] = {}  # per variant: requests and canvases held for a replica
        self.metrics = GatewayMetrics(self.demand_snapshot)
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every endpoint source."""
        for source in self.sources:
            self._tasks.append(asyncio.create_task(self._run_source(source), name=f"source {source.name}"))
        await asyncio.sleep(0)

    async def _run_source(self, source: EndpointSource) -> None:
        while True:
            try:
                await source.run(self.registry.apply)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("endpoint source %s failed; restarting it", source.name)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        """Stop the sources and close every upstream channel."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.registry.close()

    async def wait_ready(self, timeout: float, count: int = 1, local: bool = False) -> bool:
        """Wait until `count` endpoints are ready (start-up and tests; `local`: not counting external APIs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_count(local=local) >= count:
                return True
            await asyncio.sleep(0.05)
        return self.ready_count(local=local) >= count

    # ---- state ----------------------------------------------------------------------------------

    def ready_count(self, model: str | None = None, local: bool = False) -> int:
        """Endpoints that could take a request now (`local`: not counting external APIs)."""
        now = self.registry.clock()
        return sum(
            1 for c in self.registry.candidates(now)
            if (model is None or c.variant.model == model) and not (local and c.variant.overflow)
            and c.load is not None and c.load.ready and not c.load.draining and not c.ejected
            and now - c.load.observed_at <= self.settings.stale_after_s
        )

    def models(self) -> list[str]:
        """Served model names."""
        return self.registry.models()

    def demand_snapshot(self) -> DemandSnapshot:
        """Per variant: demand and delivered tokens/s per replica (for the autoscaler, in-process or JSON)."""
        now = self.registry.clock()
        return snapshot(self.demand, list(self.registry.variants.values()), self.registry.candidates(now), now,
                        self.settings.stale_after_s, held=dict(self._held), time_unix_s=time.time())

    # ---- scale from zero ------------------------------------------------------------------------

    def _hold_variant(self, model: str) -> str | None:
        """The variant a request for `model` waits for when none of its replicas is ready, or None (no hold).

        Holding applies to a model whose variants may have no replica (scale from zero) or whose replicas are
        still starting; the held request counts as demand on the cheapest such variant, so the autoscaler
        starts one there.
        """
        if self.settings.hold_for_replica_s <= 0 or self.ready_count(model, local=True) > 0:
            return None
        # A replica that refuses the gateway's API key is not starting: holding for it would only delay the error.
        starting = {s.spec.variant.name for s in self.registry.endpoints.values()
                    if s.spec.variant.model == model and s.key_refused is None}
        options = [v for v in self.registry.variants.values()
                   if v.model == model and not v.overflow and (v.scale_from_zero or v.name in starting)]
        if not options:
            return None
        return min(options, key=lambda v: (v.cost_weight, v.name)).name

    async def _hold(self, req: GatewayRequest, variant: str, deadline: float) -> bool:
        """Wait for a ready endpoint of the request's model, up to the hold bound; True when one is ready.

        A client that goes away cancels this wait (aiohttp cancels its handler), and the request is dropped.
        """
        canvas = self.registry.variants[variant].canvas_length if variant in self.registry.variants else 256
        canvases = self._expected_canvases(variant, req.max_tokens, canvas)
        start = self.registry.clock()
        until = min(deadline, start + self.settings.hold_for_replica_s)
        n, c = self._held.get(variant, (0, 0.0))
        self._held[variant] = (n + 1, c + canvases)
        req.trace.update(held_for=variant)
        log.info("request %s: no ready endpoint for %r; holding it up to %.0f s for a replica of %s",
                 clip(req.request_id, 64), clip(req.model, 64), until - start, variant)
        try:
            while self.registry.clock() < until:
                if self.ready_count(req.model, local=True) > 0:
                    return True
                await asyncio.sleep(self.settings.hold_poll_s)
            return self.ready_count(req.model, local=True) > 0
        finally:
            n, c = self._held.get(variant, (1, canvases))
            if n <= 1:
                self._held.pop(variant, None)
            else:
                self._held[variant] = (n - 1, max(0.0, c - canvases))
            req.trace.update(held_ms=round((self.registry.clock() - start) * 1000, 3))

    # ---- requests -------------------------------------------------------------------------------

    @staticmethod
    def _route_request(req: GatewayRequest, seq: int) -> RouteRequest:
        return RouteRequest(
            model=req.model,
            max_tokens=req.max_tokens,
            max_denoising_steps=req.settings.get("max_denoising_steps"),
            latency_target_ms=req.latency_target_ms,
            strict=req.strict,
            seq=seq,
            prompt_tokens=req.prompt_tokens,
            allow_overflow=req.allow_overflow,
        )

    def _check_settings(self, req: GatewayRequest) -> None:
        """400 when no variant of the model can honour the request's settings (vLLM fixes some per server)."""
        variants = [v for v in self.registry.variants.values() if v.model == req.model]
        refusals = [refusal(v.runtime, req.settings) for v in variants if not v.overflow]
        if refusals and all(r is not None for r in refusals):
            name, why = next(r for r in refusals if r is not None)
            field = req.client_field(name)
            raise GatewayError(400, f"{field}: {why}", param=field, code="unsupported_setting")
        if variants and has_images(req.prompt) and not any(v.runtime in IMAGE_RUNTIMES for v in variants):
            field = req.client_field("prompt")
            raise GatewayError(400, f"{field}: {IMAGE_REFUSAL}", param=field, code="unsupported_setting")

    @staticmethod
    def _takes(runtime: Runtime, req: GatewayRequest) -> bool:
        """Whether an endpoint of this runtime can serve the request (its settings, its images)."""
        return refusal(runtime, req.settings) is None and (runtime in IMAGE_RUNTIMES or not has_images(req.prompt))

    def _route(self, req: GatewayRequest, seq: int, excluded: set[str]) -> Decision:
        now = self.registry.clock()
        candidates = [c for c in self.registry.candidates(now)
                      if c.endpoint_id not in excluded and self._takes(c.variant.runtime, req)]
        return route_with_overflow(self.pipeline, self._route_request(req, seq), candidates, now,
                                   self.registry.variants.values())

    def _refusal(self, req: GatewayRequest, decision: Decision, tried: set[str]) -> GatewayError:
        self.demand.refused(req.model)
        if req.model not in self.registry.models():
            return GatewayError(404, f"model {req.model!r} does not exist; served: {self.registry.models()}",
                                param="model", code="model_not_found")
        paused = self._paused_s(req.model)
        if paused is not None and not tried:
            return GatewayError(429, "every upstream of the model asked for a pause (429)",
                                code="upstream_rate_limited", retry_after_s=paused)
        if self.ready_count(req.model) == 0 and not tried:
            refused = self.registry.key_refused(req.model)
            if refused is not None:
                return worker_refused_key(refused)
            return GatewayError(503, f"no ready endpoint for model {req.model!r}", code="no_ready_endpoint",
                                retry_after_s=5.0)
        retry = decision.retry_after_s if decision.retry_after_s is not None else 1.0
        return GatewayError(429, f"no endpoint can take the request now: {decision.reason}",
                            code="no_capacity", retry_after_s=retry)

    def _paused_s(self, model: str) -> float | None:
        """Seconds until the model's first endpoint paused by a 429 may be used again; None if none is paused."""
        now = self.registry.clock()
        ready = [s for s in self.registry.endpoints.values()
                 if s.spec.variant.model == model and s.load is not None and s.load.ready]
        if not ready or any(s.ejected_until <= now or s.failures > 0 for s in ready):
            return None
        return min(s.ejected_until - now for s in ready)

    def _pb_request(self, req: GatewayRequest, timeout_s: float) -> pb.GenerateRequest:
        return pb.GenerateRequest(request_id=req.request_id, prompt=req.prompt, params=settings_to_pb(req.settings),
                                  timeout_s=timeout_s)

    def _call(self, state: EndpointState, req: GatewayRequest, remaining: float, context: Any
              ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The request's events from this endpoint, whichever kind it is; the request id and trace context
        travel with the call (gRPC metadata or HTTP headers)."""
        metadata = outgoing_metadata(req.request_id, context)
        if state.http is not None:
            return state.http.generate(req, state.spec.variant, remaining, headers=dict(metadata))
        return worker_events(state.stub, self._pb_request(req, remaining), remaining, dict(req.param_names),
                             metadata)

    async def generate(self, req: GatewayRequest) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Route and stream one request; raise GatewayError. Retried elsewhere only before the first event.

        One span per request (a child of the front end's), with the routing decision as attributes; its
        context travels to the worker in the call's metadata.
        """
        span = _tracer.start_span("gateway.generate", attributes={
            "dgemma.request_id": req.request_id, "dgemma.model": req.model, "dgemma.api": req.api,
            "dgemma.max_tokens": req.max_tokens})
        try:
            async for response in self._generate(req, trace.set_span_in_context(span)):
                yield response
        except GatewayError as error:
            span.set_attribute("http.response.status_code", error.status)
            span.set_status(trace.StatusCode.ERROR, error.message)
            raise
        finally:
            span.set_attributes({f"dgemma.{k}": v for k, v in req.trace.items()
                                 if isinstance(v, str | bool | int | float)})
            span.end()

    async def _generate(self, req: GatewayRequest, context: Any) -> AsyncGenerator[pb.GenerateResponse, None]:
        self._check_settings(req)
        seq = next(self._seq)
        started = self.registry.clock()
        timeout = req.timeout_s or self.settings.request_timeout_s
        deadline = started + timeout
        tried: set[str] = set()
        attempt = 0
        held = False
        last_error: GatewayError | None = None
        counted: Routed | None = None  # this request's demand, counted once whatever the retries
        while True:
            decision = self._route(req, seq, tried)
            chosen = decision.endpoint
            if chosen is None and not tried and not held:
                hold_for = self._hold_variant(req.model)
                if hold_for is not None:
                    held = True
                    if await self._hold(req, hold_for, deadline):
                        continue
            if chosen is None:
                error = last_error or self._refusal(req, decision, tried)
                self.metrics.requests.labels(req.api, "", str(error.status)).inc()
                raise error
            state = self.registry.endpoints.get(chosen.endpoint_id)
            if state is None:  # removed between routing and now
                tried.add(chosen.endpoint_id)
                continue
            variant = chosen.variant
            remaining = deadline - self.registry.clock()
            if remaining <= 0:
                error = GatewayError(504, "the request's deadline passed before an endpoint took it", code="timeout")
                self.metrics.requests.labels(req.api, chosen.variant.name, str(error.status)).inc()
                raise error
            canvas = chosen.load.canvas_length if chosen.load and chosen.load.canvas_length else variant.canvas_length
            req.trace.update(
                endpoint=chosen.endpoint_id, variant=variant.name, attempt=attempt + 1, overflow=variant.overflow,
                target_ms=None if decision.target_s is None else round(decision.target_s * 1000, 3),
                predicted_ms=None if decision.prediction is None else round(decision.prediction.total_s * 1000, 3),
                prediction=None if decision.prediction is None else prediction_parts(decision.prediction),
                expect_met=decision.expect_met,
            )
            # With the request itself, so its demand can also be attributed to its preferred variant (an
            # overflowed request counts as demand for the local variant it would have preferred). A retry moves
            # the request's demand to where it is retried: one request, counted once.
            if counted is not None:
                self.demand.withdraw(counted)
            counted = self.demand.routed(variant.name, self.registry.clock(), req.max_tokens,
                                         self._expected_canvases(variant.name, req.max_tokens, canvas),
                                         request=self._route_request(req, seq))
            events = self._call(state, req, remaining, context)
            # Its remaining work, for the requests routed behind it (predict): known while it runs.
            own_s, expected = (0.0, 1.0) if decision.prediction is None else (
                decision.prediction.own_s, decision.prediction.expected_canvases)
            work = Work(own_s, expected, self.registry.clock())
            state.track(work)
            sent = False
            final: pb.Final | None = None
            try:
                async for response in events:
                    if not sent:
                        sent = True
                        self.metrics.first_byte.labels(variant.name).observe(self.registry.clock() - started)
                    if response.HasField("commit"):
                        work.committed += 1
                    elif response.HasField("final"):
                        final = response.final
                    yield response
            except UpstreamFailure as failure:
                self._failed(chosen.endpoint_id, variant.name, failure)
                if not sent and failure.retryable and attempt + 1 < self.settings.max_attempts:
                    attempt += 1
                    tried.add(chosen.endpoint_id)
                    last_error = failure.error
                    self.metrics.retries.labels(failure.reason).inc()
                    log.info("request %s: %s failed before its first event (%s); retrying elsewhere",
                             clip(req.request_id, 64), chosen.endpoint_id, failure.reason)
                    continue
                self.metrics.requests.labels(req.api, variant.name, str(failure.error.status)).inc()
                raise failure.error from None
            finally:
                state.untrack(work, self.registry.clock())
                await events.aclose()
            # Its time outside the worker teaches the variant's overhead, when nothing else is in it: no failed
            # attempt before, no wait for a replica, and a worker that reported its own time.
            if final is not None and final.stats.total_s > 0 and attempt == 0 and not held:
                self.registry.record_overhead(variant.name, self.registry.clock() - started - final.stats.total_s)
            self._finished(req, chosen.endpoint_id, variant.name, decision, final, started)
            return

    def _expected_canvases(self, variant: str, max_tokens: int, canvas: int) -> float:
        """The canvases a request is counted as demand for: as many as the variant's replies run, at most all
        that max_tokens allows (capacity is measured in canvases run)."""
        return expected_canvases(self.registry.reply_survival.get(variant, ()), canvases_for(max_tokens, canvas))

    def _failed(self, endpoint_id: str, variant: str, failure: UpstreamFailure) -> None:
        if failure.failing:
            self.registry.record_failure(endpoint_id)
            self.metrics.ejections.labels(variant).inc()
        if failure.cooldown_s is not None:
            self.registry.record_rate_limited(endpoint_id, failure.cooldown_s)
            self.metrics.throttled.labels(variant).inc()

    def _finished(self, req: GatewayRequest, endpoint_id: str, variant: str, decision: Decision,
                  final: pb.Final | None, started: float) -> None:
        now = self.registry.clock()
        elapsed = now - started
        taken = None
        v = self.registry.variants.get(variant)
        cap = req.settings.get("max_denoising_steps") or (v.max_denoising_steps if v is not None else 0)
        if final is not None:
            taken = StepsTaken.of(final.stats.decoder_passes, final.stats.canvases, cap)
            if final.stop_reason in REPLY_ENDS:
                self.registry.record_reply(variant, final.stats.canvases, final.stop_reason != pb.STOP_REASON_LENGTH)
        self.registry.record_success(endpoint_id, variant, taken)
        met = None if decision.target_s is None else elapsed <= decision.target_s
        req.trace.update(elapsed_ms=round(elapsed * 1000, 3), target_met=met)
        tokens = final.stats.completion_tokens if final is not None else 0
        self.demand.finished(variant, now, tokens, met, final.stats.canvases if final is not None else 0)
        m = self.metrics
        m.requests.labels(req.api, variant, "200").inc()
        m.latency.labels(variant).observe(elapsed)
        m.tokens.labels(variant).inc(tokens)
        if met is not None:
            # Both series exist from the first target on: a "missed" ratio reads 0, not blank, until one is missed.
            m.targets.labels(variant, "met" if met else "missed").inc()
            m.targets.labels(variant, "missed" if met else "met").inc(0)

    def model_vision(self, model: str) -> tuple[bool, VisionSpec | None]:
        """Whether any endpoint of `model` has reported its load, and the image geometry one of them reported
        (None: the model takes no images, or nothing is known yet)."""
        loads = [c.load for c in self.registry.candidates() if c.variant.model == model and c.load is not None]
        return bool(loads), next((load.vision for load in loads if load.vision is not None), None)

    async def count_prompt_tokens(self, model: str, prompt: pb.Prompt, limit: int, image_tokens: int = 0
                                  ) -> int | None:
        """Exact token count of a prompt from a ready worker when a cheap bound cannot settle the limit.

        A byte-level BPE never makes more tokens than UTF-8 bytes, so small prompts need no round trip;
        `image_tokens` (counted from the images' sizes) is added to the bound. Returns None when the bound
        already shows the prompt fits.
        """
        kind = prompt.WhichOneof("kind")
        if kind == "tokens":
            return len(prompt.tokens.ids)
        if text_bound(prompt) + image_tokens <= limit:
            return None
        now = self.registry.clock()
        for c in self.registry.candidates(now):
            if c.variant.model != model or c.load is None or not c.load.ready or c.ejected:
                continue
            state = self.registry.endpoints.get(c.endpoint_id)
            if state is None or state.stub is None:  # an HTTP upstream counts its own prompts
                continue
            try:
                reply = await state.stub.Tokenize(pb.TokenizeRequest(prompt=prompt), timeout=10.0)
                return len(reply.token_ids)
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    raise from_upstream(err.code(), err.details() or "") from None
                continue
        # No worker could count now: leave the limit to the worker that takes the request.
        return None


def text_bound(prompt: pb.Prompt) -> int:
    """An upper bound on the text tokens of a prompt: UTF-8 bytes (a byte-level BPE never makes more), plus a
    generous 16 per chat message for its template."""
    if prompt.WhichOneof("kind") == "tokens":
        return len(prompt.tokens.ids)
    if prompt.WhichOneof("kind") == "text":
        return len(prompt.text.encode())
    return sum(_message_bytes(m) + len(m.role.encode()) + 16 for m in prompt.chat.messages) + 16


def estimate_text_tokens(prompt: pb.Prompt) -> int:
    """The text tokens of a prompt as routing guesses them: about four UTF-8 bytes a token."""
    if prompt.WhichOneof("kind") == "tokens":
        return len(prompt.tokens.ids)
    return max(1, text_bound(prompt) // 4)


def _message_bytes(m: pb.ChatMessage) -> int:
    return len(m.content.encode()) + sum(len(p.text.encode()) for p in m.parts)
