"""Endpoints: where they come from (sources), what the gateway knows of each (registry), and their load.

Two kinds of endpoint: a dgemma worker (gRPC, `dgemma.v1.Denoiser`) and an OpenAI-compatible HTTP server
(a vLLM pod, an external API: `openai_upstream`). Layers, as in llm-d's metrics: a *scraper* fetches
reports (the worker's WatchLoad stream; a vLLM server's /metrics), an *extractor* maps them to the canonical
`EndpointLoad` (`extract_load`; `vllm_load`), and routing reads only the canonical view. A failing endpoint
is ejected for a backoff period that doubles with each failure in a row (outlier ejection), and its watcher
reconnects with backoff; an upstream that answers 429 is paused for its Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import grpc

from dgemma_common.auth import KeyFile
from dgemma_common.convert import vision_from_pb
from dgemma_common.logsafe import clip
from dgemma_common.tls import TlsFiles, grpc_channel_credentials
from dgemma_gateway.errors import grpc_failure
from dgemma_gateway.openai_upstream import HttpTarget, OpenAIUpstream
from dgemma_gateway.routing.predict import reply_survival
from dgemma_gateway.types import Candidate, EndpointLoad, Variant
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint as a source reports it: a worker's gRPC address, or an OpenAI-compatible server."""

    endpoint_id: str
    address: str  # host:port of the worker's gRPC server, or the HTTP server's API root
    variant: Variant
    http: HttpTarget | None = None  # set for an OpenAI-compatible server (which carries its own key)
    api_key: str | None = field(default=None, repr=False)  # the worker's API key, sent on every call to it
    key_file: Path | None = field(default=None, repr=False)  # where a static endpoint's key comes from (re-read)

    @property
    def kind(self) -> Literal["grpc", "http"]:
        """How the gateway talks to it."""
        return "grpc" if self.http is None else "http"


class Sink(Protocol):
    """Where a source reports: its name, its endpoints, and optionally every variant it knows, endpoints or not."""

    def __call__(self, source: str, specs: Sequence[EndpointSpec], variants: Sequence[Variant] | None = None) -> None:
        ...


class EndpointSource(Protocol):
    """Reports the full set of endpoints it knows, under its own name, whenever it changes."""

    name: str

    async def run(self, sink: Sink) -> None:
        """Call sink(name, endpoints) on every change until cancelled."""
        ...


def with_key(spec: EndpointSpec, key: str | None) -> EndpointSpec:
    """The endpoint presenting `key`: gRPC metadata to a worker, `Authorization: Bearer` to an HTTP server."""
    if spec.http is None:
        return replace(spec, api_key=key)
    return replace(spec, http=replace(spec.http, api_key=key))


def presented(spec: EndpointSpec) -> str | None:
    """The key the gateway presents to the endpoint."""
    return spec.api_key if spec.http is None else spec.http.api_key


# How often a static endpoint's key file is looked at (as the servers' ApiKeys look at theirs).
KEY_RECHECK_S = 5.0


class StaticSource:
    """A fixed list of endpoints (local use, `dgemma serve`, tests). Keys that come from files (`key_file`) are
    read again when a file changes, and the list reported again: a rotated Secret needs no restart."""

    def __init__(self, endpoints: Sequence[EndpointSpec], name: str = "static",
                 recheck_s: float = KEY_RECHECK_S) -> None:
        self.name = name
        self.endpoints = list(endpoints)
        self.recheck_s = recheck_s

    async def run(self, sink: Sink) -> None:
        """Report the list, then again whenever a key file changes, until cancelled."""
        sink(self.name, self.endpoints)
        files = {s.key_file: KeyFile(s.key_file) for s in self.endpoints if s.key_file is not None}
        if not files:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(self.recheck_s)
            keys = await asyncio.to_thread(_current_keys, files)
            endpoints = [with_key(s, keys[s.key_file]) if s.key_file in keys else s for s in self.endpoints]
            if endpoints != self.endpoints:
                self.endpoints = endpoints
                sink(self.name, endpoints)


def _current_keys(files: Mapping[Path, KeyFile]) -> dict[Path, str]:
    """The key each file holds now; a file that cannot be read, or holds no key, keeps its last key (a Secret
    being rewritten is not a reason to send no key at all)."""
    for path, f in files.items():
        try:
            f.refresh()
        except (OSError, ValueError) as exc:
            log.warning("cannot read the key file %s (keeping its last key): %s", path, exc)
    return {path: key for path, f in files.items() if (key := f.first) is not None}


def extract_load(report: pb.LoadReport, observed_at: float) -> EndpointLoad:
    """The extractor: a dgemma.v1 LoadReport as the canonical load."""
    return EndpointLoad(
        queue_depth=report.queue_depth,
        active=report.active,
        capacity=report.capacity,
        max_queue=report.max_queue,
        step_latency_s=report.step_latency_s,
        encoder_latency_s=report.encoder_latency_s,
        tokens_per_s=report.tokens_per_s,
        canvas_length=report.canvas_length,
        model_name=report.model_name,
        ready=report.ready,
        draining=report.draining,
        observed_at=observed_at,
        encoder_token_latency_s=report.encoder_token_latency_s,
        vision=vision_from_pb(report),
        busy_step_s=report.busy_step_s,
    )


async def worker_events(stub: Any, request: pb.GenerateRequest, timeout_s: float, param_names: dict[str, str],
                        metadata: Sequence[tuple[str, str]] = ()) -> AsyncGenerator[pb.GenerateResponse, None]:
    """A worker's Generate stream (`metadata`: the request id and trace context); a failed call raises
    UpstreamFailure, a closed stream cancels the call."""
    call = stub.Generate(request, timeout=timeout_s + 1.0, metadata=tuple(metadata))
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError as err:
        raise grpc_failure(err.code(), err.details() or "", param_names) from None
    finally:
        if not call.done():
            call.cancel()


def worker_key_metadata(details: grpc.aio.ClientCallDetails, key: str | None) -> grpc.aio.ClientCallDetails:
    """The call's details with `authorization: Bearer KEY` added (unchanged without a key)."""
    if not key:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {key}"))
    return details._replace(metadata=metadata)


KeyGetter = Callable[[], str | None]


class _KeyOnUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: KeyGetter) -> None:
        self.key = key

    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(worker_key_metadata(client_call_details, self.key()), request)


class _KeyOnUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: KeyGetter) -> None:
        self.key = key

    async def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(worker_key_metadata(client_call_details, self.key()), request)


def worker_key_interceptors(key: KeyGetter) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that put the worker's API key (read at each call, so a rotated key is used at once)
    on every call of a channel: the Denoiser's RPCs are unary (GetLoad, Tokenize, Detokenize) or
    server-streaming (Generate, WatchLoad). grpc.aio files an interceptor under one kind only, so one each."""
    return [_KeyOnUnaryUnary(key), _KeyOnUnaryStream(key)]


async def watch_load(stub: Any, interval_s: float) -> AsyncIterator[pb.LoadReport]:
    """The scraper: the worker's WatchLoad stream (a report now, then one per interval)."""
    call = stub.WatchLoad(pb.WatchLoadRequest(interval_s=interval_s))
    try:
        async for report in call:
            yield report
    finally:
        call.cancel()


@dataclass(frozen=True)
class StepsTaken:
    """What one finished request says about adaptive stopping: its decoder passes, canvases and step cap."""

    decoder_passes: int
    canvases: int
    cap: int

    @property
    def share(self) -> float:
        """The share of the step cap its canvases took."""
        return self.decoder_passes / (self.canvases * self.cap)

    @classmethod
    def of(cls, decoder_passes: int, canvases: int, cap: int) -> StepsTaken | None:
        """From a request's stats; None when it says nothing (no canvas, no cap)."""
        if canvases <= 0 or cap <= 0:
            return None
        return cls(decoder_passes, canvases, cap)


@dataclass(frozen=True)
class Ejection:
    """Outlier ejection: the first failure ejects for base_s, each further one in a row doubles it."""

    base_s: float = 1.0
    max_s: float = 30.0

    def period(self, failures: int) -> float:
        """How long an endpoint with this many failures in a row stays out."""
        return min(self.max_s, self.base_s * 2 ** max(0, failures - 1))


@dataclass
class EndpointState:
    """What the gateway knows about one endpoint; owned by the Registry."""

    spec: EndpointSpec
    channel: grpc.aio.Channel | None  # a worker's; None for an HTTP endpoint
    stub: Any
    http: OpenAIUpstream | None = None  # an HTTP endpoint's client
    load: EndpointLoad | None = None
    inflight: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    # Why the worker last refused the gateway's API key on its load watch (cleared by the next report): the
    # gateway's key is missing or wrong, which clients are told instead of a bare "no ready endpoint".
    key_refused: str | None = None


# The largest gRPC message to or from a worker (a request's images travel in it), as the worker's default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a worker restarts; the watcher has its own backoff on top.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


ChannelFactory = Callable[[str, Sequence[grpc.aio.ClientInterceptor]], grpc.aio.Channel]
# A renewed channel's streams in flight may run this long before the old channel closes under them.
RENEWED_CHANNEL_GRACE_S = 600.0


@dataclass(frozen=True)
class WorkerTls:
    """How the gateway reaches workers over TLS: the CA their certificates chain to, our client certificate
    for mutual TLS, and the name their certificates carry (pods come and go by IP, so a certificate names the
    service, not the address)."""

    ca_file: Path
    client: TlsFiles | None = None
    server_name: str | None = None


def channel_factory(tls: WorkerTls | None) -> ChannelFactory:
    """Opens a channel to a worker (with the given interceptors): plaintext, or TLS with the files as they are at
    that moment."""
    if tls is None:
        return lambda address, interceptors: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                                                        interceptors=interceptors)
    options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else [])]

    def open_tls(address: str, interceptors: Sequence[grpc.aio.ClientInterceptor]) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, grpc_channel_credentials(tls.client, tls.ca_file), options=options,
                                       interceptors=interceptors)

    return open_tls


class TrafficSteps:
    """Decoder passes per canvas over a variant's last `window` finished requests, whatever their caps: what its
    traffic costs a replica (capacity). A window, not a moving average: with a moving average over ~9 requests,
    their mix of caps swung the figure 10-20 % either way, and capacity with it."""

    def __init__(self, window: int) -> None:
        self._recent: deque[tuple[int, int]] = deque()  # (decoder passes, canvases)
        self._window = window
        self._passes = 0
        self._canvases = 0

    def add(self, steps: StepsTaken) -> None:
        self._recent.append((steps.decoder_passes, steps.canvases))
        self._passes += steps.decoder_passes
        self._canvases += steps.canvases
        if len(self._recent) > self._window:
            passes, canvases = self._recent.popleft()
            self._passes -= passes
            self._canvases -= canvases

    def per_canvas(self) -> float | None:
        """Passes per canvas; None before a canvas finished."""
        return self._passes / self._canvases if self._canvases > 0 else None


class Registry:
    """The endpoints of every source, their load (kept fresh by one watcher task each), and their health."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        ejection: Ejection | None = None,
        watch_interval_s: float = 0.5,
        step_fraction_alpha: float = 0.2,
        open_channel: ChannelFactory | None = None,
        reply_window: int = 256,
    ) -> None:
        self.clock = clock
        self.open_channel = open_channel or channel_factory(None)
        self.ejection = ejection or Ejection()
        self.watch_interval_s = watch_interval_s
        self._by_source: dict[str, dict[str, EndpointSpec]] = {}
        self._variants_by_source: dict[str, dict[str, Variant]] = {}
        self.endpoints: dict[str, EndpointState] = {}
        self.variants: dict[str, Variant] = {}
        self.step_fraction: dict[str, float] = {}  # per variant, at its own step cap, learned from finished requests
        self.step_shares: dict[str, dict[int, float]] = {}  # per variant and step cap, learned the same way
        self.traffic_steps: dict[str, TrafficSteps] = {}  # per variant, all caps (capacity)
        self.replies: dict[str, deque[tuple[int, bool]]] = {}  # per variant: recent (canvases, ended by itself)
        self.reply_survival: dict[str, tuple[float, ...]] = {}  # per variant, from `replies`
        self._reply_window = reply_window
        self._alpha = step_fraction_alpha
        self.ejections_total = 0
        self.changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None  # shared by every HTTP endpoint
        # Channels of forgotten endpoints, closing once their calls had a chance to end. Held here: the loop keeps
        # only weak references to tasks, and close() must not leave them behind.
        self._closing: set[asyncio.Task[None]] = set()

    # ---- membership -----------------------------------------------------------------------------

    def apply(self, source: str, specs: Sequence[EndpointSpec], variants: Sequence[Variant] | None = None) -> None:
        """A source's current endpoints (and variants, also those with none): watch new ones, forget removed ones."""
        self._by_source[source] = {s.endpoint_id: s for s in specs}
        self._variants_by_source[source] = {v.name: v for v in variants or ()}
        wanted: dict[str, EndpointSpec] = {}
        for by_id in self._by_source.values():
            wanted.update(by_id)
        known: dict[str, Variant] = {}
        for by_name in self._variants_by_source.values():
            known.update(by_name)
        self.variants = {**known, **{s.variant.name: s.variant for s in wanted.values()}}
        for endpoint_id in list(self.endpoints):
            state = self.endpoints[endpoint_id]
            if endpoint_id not in wanted or wanted[endpoint_id].address != state.spec.address:
                self._forget(endpoint_id)
        for endpoint_id, spec in wanted.items():
            if endpoint_id in self.endpoints and _same_connection(self.endpoints[endpoint_id].spec, spec):
                # The variant's settings or the key may have changed: both are read at each call, so the endpoint
                # keeps its connections and its load.
                state = self.endpoints[endpoint_id]
                if presented(state.spec) != presented(spec):
                    state.failures, state.ejected_until = 0, 0.0  # refusals of the old key say nothing of the new
                state.spec = spec
                if state.http is not None and spec.http is not None:
                    state.http.target = spec.http
                continue
            if endpoint_id in self.endpoints:
                self._forget(endpoint_id)  # a new model name, key or limit on the same server; a key added or dropped
            if spec.http is None:
                state = EndpointState(spec, None, None)
                self._open(state)
                watch = self._watch(state)
            else:
                state = EndpointState(spec, None, None)
                state.http = OpenAIUpstream(spec.http, self._http_session(), self.clock, self.watch_interval_s,
                                            self._reporter(state), partial(_variant_of, state))
                watch = self._watch_http(state, state.http)
            self.endpoints[endpoint_id] = state
            state.watcher = asyncio.get_running_loop().create_task(watch, name=f"watch-load {endpoint_id}")
        self.changed.set()

    def _open(self, state: EndpointState) -> None:
        """A new channel to the worker; with a key, every call on it carries the key its spec has at that moment
        (a rotated key is used at once). Without one the channel has no interceptor: nothing to pay for."""
        keyed = state.spec.api_key is not None
        interceptors = worker_key_interceptors(lambda: state.spec.api_key) if keyed else []
        state.channel = self.open_channel(state.spec.address, interceptors)
        state.stub = pb_grpc.DenoiserStub(state.channel)

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Upstreams are few and long-lived: keep connections, but no more than the pool's limit to each.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=256))
        return self._session

    def _forget(self, endpoint_id: str) -> None:
        state = self.endpoints.pop(endpoint_id)
        if state.watcher is not None:
            state.watcher.cancel()
        if state.channel is not None:
            # Close after in-flight calls had a chance to finish.
            self._close_later(state.channel, 30.0 if state.inflight else 0.0)

    def renew_channels(self) -> None:
        """Open a new channel to every worker (our client certificate was renewed); calls in flight finish on
        the old one, which closes later, and the load watchers move over when they next reconnect. HTTP
        endpoints keep their connections."""
        loop = asyncio.get_running_loop()
        for state in self.endpoints.values():
            old = state.channel
            if old is None:
                continue
            self._open(state)
            if state.watcher is not None:
                state.watcher.cancel()
            state.watcher = loop.create_task(self._watch(state), name=f"watch-load {state.spec.endpoint_id}")
            self._close_later(old, RENEWED_CHANNEL_GRACE_S if state.inflight else 0.0)

    def _close_later(self, channel: grpc.aio.Channel, delay: float) -> None:
        # Closing is async; the task is kept so that it is not collected before it runs.
        task = asyncio.get_running_loop().create_task(_close_later(channel, delay))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Stop every watcher and close every channel, those of forgotten endpoints too (at once)."""
        states = list(self.endpoints.values())
        self.endpoints.clear()
        for s in states:
            if s.watcher is not None:
                s.watcher.cancel()
        await asyncio.gather(*(s.watcher for s in states if s.watcher is not None), return_exceptions=True)
        await asyncio.gather(*(s.channel.close(None) for s in states if s.channel is not None), return_exceptions=True)
        closing = list(self._closing)
        for task in closing:
            task.cancel()  # _close_later closes its channel when cancelled during its wait
        await asyncio.gather(*closing, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ---- load -----------------------------------------------------------------------------------

    async def _watch(self, state: EndpointState) -> None:
        backoff = 0.1
        while True:
            try:
                async for report in watch_load(state.stub, self.watch_interval_s):
                    state.load = extract_load(report, self.clock())
                    state.key_refused = None
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.UNAUTHENTICATED:
                    self._key_refused(state, err.details() or "")
                else:
                    log.debug("load watch of %s failed: %s", state.spec.endpoint_id, err.code())
            except Exception:
                log.exception("load watch of %s failed", state.spec.endpoint_id)
            # The stream ended or failed: the endpoint drops out until it reports again.
            state.load = None
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    @staticmethod
    def _key_refused(state: EndpointState, details: str) -> None:
        if state.key_refused is None:  # once per refusal spell: the watcher retries every 2 s
            log.error("worker %s refuses the gateway's calls (%s): give the gateway the workers' API key "
                      "(--worker-api-key-file; in a cluster the resource's spec.worker.apiKeySecret)",
                      state.spec.endpoint_id, clip(details, 256))
        state.key_refused = clip(details, 256) or "UNAUTHENTICATED"

    def key_refused(self, model: str) -> str | None:
        """Why a worker of the model refuses the gateway's API key, when one does (its last load watch)."""
        return next((s.key_refused for s in self.endpoints.values()
                     if s.spec.variant.model == model and s.key_refused is not None), None)

    def _reporter(self, state: EndpointState) -> Callable[[EndpointLoad | None, float | None], None]:
        def report(load: EndpointLoad | None, step_fraction: float | None) -> None:
            state.load = load
            if step_fraction is not None:
                self.learn_step_fraction(state.spec.variant.name, step_fraction)

        return report

    async def _watch_http(self, state: EndpointState, upstream: OpenAIUpstream) -> None:
        while True:
            try:
                await upstream.watch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("load watch of %s failed", state.spec.endpoint_id)
            state.load = None
            await asyncio.sleep(1.0)

    def set_load(self, endpoint_id: str, load: EndpointLoad | None) -> None:
        """Replace an endpoint's load (tests and simulations)."""
        self.endpoints[endpoint_id].load = load

    # ---- health ---------------------------------------------------------------------------------

    def record_failure(self, endpoint_id: str) -> None:
        """The endpoint failed a request: eject it for a backoff period."""
        state = self.endpoints.get(endpoint_id)
        if state is None:
            return
        state.failures += 1
        state.ejected_until = self.clock() + self.ejection.period(state.failures)
        self.ejections_total += 1
        log.warning("ejecting %s for %.1f s after %d failure(s)", endpoint_id,
                    self.ejection.period(state.failures), state.failures)

    def record_rate_limited(self, endpoint_id: str, retry_after_s: float) -> None:
        """The endpoint asked for a pause (429): out of routing that long; not a failure."""
        state = self.endpoints.get(endpoint_id)
        if state is not None:
            state.ejected_until = max(state.ejected_until, self.clock() + retry_after_s)

    def record_success(self, endpoint_id: str, variant: str, steps: StepsTaken | None = None) -> None:
        """The endpoint finished a request: it is healthy; learn how many steps its canvases took at its cap."""
        state = self.endpoints.get(endpoint_id)
        if state is not None:
            state.failures = 0
        if steps is None or not 0 < steps.share <= 1:
            return
        shares = self.step_shares.setdefault(variant, {})
        shares[steps.cap] = self._ema(shares.get(steps.cap), steps.share)
        # What the traffic costs, whatever caps it asks for: canvas-weighted steps per canvas (capacity).
        self.traffic_steps.setdefault(variant, TrafficSteps(self._reply_window)).add(steps)
        known = self.variants.get(variant)
        if known is not None and steps.cap == known.max_denoising_steps:
            self.step_fraction[variant] = shares[steps.cap]

    def learn_step_fraction(self, variant: str, step_fraction: float) -> None:
        """A measured share of max_denoising_steps that a canvas of this variant took, from an endpoint's own
        metrics (vLLM) rather than per request: the variant's default-cap share, not one per cap."""
        if 0 < step_fraction <= 1:
            self.step_fraction[variant] = self._ema(self.step_fraction.get(variant), step_fraction)

    def record_reply(self, variant: str, canvases: int, ended: bool) -> None:
        """A request finished after `canvases` canvases, at EOS or a stop string (`ended`) or cut by its budget."""
        if canvases <= 0:
            return
        window = self.replies.setdefault(variant, deque(maxlen=self._reply_window))
        window.append((canvases, ended))
        self.reply_survival[variant] = reply_survival(window)

    def _traffic_steps_per_canvas(self, variant: str) -> float | None:
        traffic = self.traffic_steps.get(variant)
        return traffic.per_canvas() if traffic is not None else None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self._alpha * (new - old)

    # ---- the router's view ----------------------------------------------------------------------

    def candidates(self, now: float | None = None) -> list[Candidate]:
        """Every endpoint as an immutable candidate."""
        now = self.clock() if now is None else now
        return [
            Candidate(
                endpoint_id=s.spec.endpoint_id,
                variant=s.spec.variant,
                load=s.load,
                inflight=s.inflight,
                ejected=s.ejected_until > now,
                step_fraction=self.step_fraction.get(s.spec.variant.name, 1.0),
                step_shares=tuple(sorted(self.step_shares.get(s.spec.variant.name, {}).items())),
                steps_per_canvas=self._traffic_steps_per_canvas(s.spec.variant.name),
                reply_survival=self.reply_survival.get(s.spec.variant.name, ()),
            )
            for s in self.endpoints.values()
        ]

    def models(self) -> list[str]:
        """Served model names, sorted."""
        return sorted({v.model for v in self.variants.values()})


def _same_connection(old: EndpointSpec, new: EndpointSpec) -> bool:
    """Whether an endpoint's connection serves its new spec: for an HTTP server, the same target but perhaps its
    key (read at each request); for a worker, a key on both or on neither (the key interceptor is part of the
    channel; the key itself is read at each call)."""
    if old.http is not None and new.http is not None:
        return replace(old.http, api_key=None) == replace(new.http, api_key=None)
    return old.http == new.http and (old.api_key is None) == (new.api_key is None)


def _variant_of(state: EndpointState) -> Variant:
    return state.spec.variant


async def _close_later(channel: grpc.aio.Channel, delay: float) -> None:
    try:
        if delay:
            await asyncio.sleep(delay)
    finally:  # cancelled (the registry closes): close now
        with contextlib.suppress(Exception):
            await channel.close(None)

