"""The worker process: a grpc.aio server with health, reflection, dgemma.v1.Denoiser and KServe v2.

Start-up order: bind and serve health (NOT_SERVING) at once, so probes and the port file work while
the model loads; then load, warm up, and switch health to SERVING. SIGTERM drains (see `drain`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from importlib import metadata
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from dgemma_common.auth import ApiKeys
from dgemma_common.guard import RequestGuard
from dgemma_common.logs import setup_logging
from dgemma_common.looplag import watch_loop_lag
from dgemma_common.tls import grpc_server_credentials
from dgemma_common.tracing import RequestContextInterceptor, setup_tracing
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_worker.metrics import WorkerMetrics
from dgemma_worker.runtime import EngineAPI, WorkerRuntime
from dgemma_worker.servicers import DenoiserServicer, KServeServicer
from dgemma_worker.worker_config import HEALTH_OFF, METRICS_OFF, WorkerConfig, parse_config

log = logging.getLogger(__name__)

DENOISER_SERVICE = pb.DESCRIPTOR.services_by_name["Denoiser"].full_name
KSERVE_SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", DENOISER_SERVICE, KSERVE_SERVICE)
# How long RPCs that are not requests (load watchers, health watchers) get to finish once drained.
FINAL_STOP_GRACE_S = 1.0
# After SIGTERM the process is gone within its drain grace plus this, whatever holds it up: an event loop stuck
# writing a log line to a stdout pipe that nobody reads, a step that does not return. An orderly drain ends well
# within it (the in-flight requests get the grace; closing the servers and the engine takes about a second).
EXIT_DEADLINE_MARGIN_S = 10.0

EngineFactory = Callable[[WorkerConfig, Any], EngineAPI]


def load_engine(config: WorkerConfig, observer: Any) -> EngineAPI:
    """Load the model, build the engine and warm it up (blocking; runs on a thread)."""
    from dgemma_worker.engine import Engine, EngineConfig, checkpoint_params
    from dgemma_worker.model import load_model, resolve_device
    from dgemma_worker.runner import DelayedStepRunner, StepRunner
    from dgemma_worker.static import CompiledStepRunner, compiled_by_default

    device = resolve_device(config.device)
    # The debug delay stands for a slower GPU in tests: it runs the eager step.
    compiled = compiled_by_default(config.compile, device) and not config.debug_step_delay_s
    loaded = load_model(config.model, device=str(device), dtype=config.dtype, revision=config.model_revision)
    runner: StepRunner | None = None
    if config.debug_step_delay_s:
        runner = DelayedStepRunner(loaded, delay_s=config.debug_step_delay_s)
    elif compiled:
        runner = CompiledStepRunner(loaded, spare_slots=config.max_active)
    defaults = checkpoint_params(loaded, config.default_overrides, config.limits)
    engine = Engine(
        loaded,
        EngineConfig(
            max_active=config.max_active, max_queue=config.max_queue, limits=config.limits, defaults=defaults,
            image_limits=config.image_limits,
        ),
        observer=observer,
        runner=runner,
    )
    engine.start(warmup=config.warmup)
    return engine


def _version() -> str:
    try:
        return metadata.version("dgemma")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
# The RPCs that carry one generation: each gets the request id and a server span.
TRACED_METHODS = (
    f"/{DENOISER_SERVICE}/Generate",
    f"/{KSERVE_SERVICE}/ModelInfer",
    f"/{KSERVE_SERVICE}/ModelStreamInfer",
)


class WorkerServer:
    """One worker: the gRPC server, the metrics endpoint and the engine they front."""

    def __init__(self, config: WorkerConfig, engine_factory: EngineFactory = load_engine) -> None:
        self.config = config
        self._factory = engine_factory
        self.metrics = WorkerMetrics(self._snapshot_if_loaded, config.variant)
        self.runtime = WorkerRuntime(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.keys = ApiKeys(config.api_keys_file)  # re-read when the file changes (a Secret updated in place)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._drained = asyncio.Event()
        self._lag_probe: asyncio.Task[None] | None = None

    def _snapshot_if_loaded(self) -> Any:
        return self.runtime.load_snapshot()

    async def start(self) -> int:
        """Bind, serve health (NOT_SERVING) and the services; return the bound gRPC port."""
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second worker on the same port must fail, not share it
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
            # Outermost, the guard: API keys on the services that serve inference (health and reflection stay
            # open for probes), and bytes that are not a request message are INVALID_ARGUMENT, not grpcio's
            # UNKNOWN; then the request id and trace context of each generation (the gateway's metadata).
            interceptors=[RequestGuard(self.keys, protected=(DENOISER_SERVICE, KSERVE_SERVICE),
                                       on_refused=self.metrics.on_unauthenticated),
                          RequestContextInterceptor("dgemma_worker", TRACED_METHODS)],
        )
        # Health first, so probes answer from the first moment the port is open.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        pb_grpc.add_DenoiserServicer_to_server(DenoiserServicer(self.runtime), server)
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.runtime, _version()), server)
        reflection.enable_server_reflection(
            (DENOISER_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{cfg.host}:{cfg.port}"
        self.port = (server.add_insecure_port(address) if cfg.tls is None
                     else server.add_secure_port(address, grpc_server_credentials(cfg.tls)))
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        await server.start()
        self._server = server
        self._lag_probe = asyncio.create_task(watch_loop_lag(self.metrics.loop_lag.observe), name="loop-lag")
        if cfg.health_port != HEALTH_OFF:
            self._health_server, self.health_port = await self._start_health_only(cfg.host, cfg.health_port)
        if cfg.metrics_port != METRICS_OFF:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        log.info(
            "listening on %s:%d (metrics %s)", cfg.host, self.port, self.metrics_port,
            extra={"fields": {"event": "listening", "host": cfg.host, "port": self.port,
                              "metrics_port": self.metrics_port, "health_port": self.health_port,
                              "tls": cfg.tls is not None, "mutual_tls": cfg.tls is not None
                              and cfg.tls.ca_file is not None, "api_keys": self.keys.enabled}},
        )
        if cfg.port_file is not None:
            tmp = cfg.port_file.with_name(cfg.port_file.name + ".tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port,
                                   "health_port": self.health_port, "pid": os.getpid()}))
            tmp.replace(cfg.port_file)  # atomic: readers never see a half-written file
        return self.port

    async def _start_health_only(self, host: str, port: int) -> tuple[grpc.aio.Server, int]:
        """A plaintext server with only the health service (the same servicer, so the same status): the
        kubelet's gRPC probes cannot speak TLS, and health tells nothing a probe may not know."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the health port {host}:{port}")
        await server.start()
        return server, bound

    async def _stop_servers(self, grace_s: float | None) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._health_server is not None:
            await self._health_server.stop(None)

    async def load(self) -> None:
        """Load and warm up the engine on a daemon thread, then report SERVING (unless draining)."""
        started = time.monotonic()
        future: Future[EngineAPI] = Future()

        def target() -> None:
            try:
                future.set_result(self._factory(self.config, self.metrics))
            except BaseException as exc:
                future.set_exception(exc)

        # A daemon thread, so a SIGTERM during a long load does not wait for it.
        threading.Thread(target=target, name="dgemma-load", daemon=True).start()
        engine = await asyncio.wrap_future(future)
        self.metrics.recording = True  # the warm-up request is not traffic
        self.runtime.defaults = engine.defaults
        self.runtime.engine = engine
        if self.runtime.ready:
            for service in HEALTH_SERVICES:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "model %s ready in %.1f s", self.config.model_name, time.monotonic() - started,
            extra={"fields": {"event": "ready", "model": self.config.model_name,
                              "revision": engine.model_revision, "canvas_length": engine.canvas_length}},
        )

    async def drain(self, grace_s: float | None = None) -> bool:
        """NOT_SERVING at once, refuse new requests, let in-flight ones finish within the grace period.

        Returns True if everything in flight finished in time.
        """
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        log.info("draining (grace %.1f s)", grace, extra={"fields": {"event": "draining", "grace_s": grace}})
        # enter_graceful_shutdown sets every service NOT_SERVING and ignores later set() calls.
        await self.health.enter_graceful_shutdown()
        self.runtime.begin_drain()
        engine = self.runtime.engine
        idle = True
        if engine is not None:
            idle = await asyncio.to_thread(engine.wait_idle, max(0.0, deadline - time.monotonic()))
        self.runtime.stopping.set()  # load watchers send a last report and end
        # Requests have finished (or the grace is over): give their last messages a moment to go out.
        await self._stop_servers(max(FINAL_STOP_GRACE_S, deadline - time.monotonic()) if not idle
                                 else FINAL_STOP_GRACE_S)
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        await self._stop_probe()
        self.metrics.close()
        self._drained.set()
        log.info("stopped (%s)", "drained" if idle else "grace period over",
                 extra={"fields": {"event": "stopped", "drained": idle}})
        return idle

    async def watch_engine(self, interval_s: float = 1.0) -> None:
        """Return when the engine's step thread has died, after setting health NOT_SERVING."""
        engine = self.runtime.engine
        while engine is None or engine.alive:
            await asyncio.sleep(interval_s)
            engine = self.runtime.engine
        log.critical("the engine died; stopping", extra={"fields": {"event": "engine_died"}})
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        """Stop at once (tests and errors): no grace."""
        self.runtime.stopping.set()
        await self._stop_servers(None)
        if self.runtime.engine is not None:
            await asyncio.to_thread(self.runtime.engine.shutdown)
        await self._stop_probe()
        self.metrics.close()

    async def _stop_probe(self) -> None:
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            await asyncio.gather(self._lag_probe, return_exceptions=True)
            self._lag_probe = None


class ExitDeadline:
    """Ends the process a fixed time after it is armed, whatever the rest of it is doing.

    Armed from a signal handler, which may run while the main thread holds any lock (logging's, threading's), so
    arming only writes the signal number to a pipe; a daemon thread started beforehand waits on that pipe.
    """

    def __init__(self, after_s: float) -> None:
        self._read, self._write = os.pipe()
        threading.Thread(target=self._wait, args=(after_s,), name="dgemma-exit-deadline", daemon=True).start()

    def arm(self, signum: int) -> None:
        """Start the countdown (async-signal safe: one write)."""
        os.write(self._write, bytes([signum]))

    def _wait(self, after_s: float) -> None:
        signum = os.read(self._read, 1)[0]
        time.sleep(after_s)
        os._exit(128 + signum)


async def serve(config: WorkerConfig, engine_factory: EngineFactory = load_engine) -> int:
    """Run a worker until SIGTERM/SIGINT; drain on the first signal, exit at once on the second; gone within
    the drain grace plus EXIT_DEADLINE_MARGIN_S of the first whatever blocks the drain."""
    loop = asyncio.get_running_loop()
    server = WorkerServer(config, engine_factory)
    term = asyncio.Event()
    deadline = ExitDeadline(config.drain_grace_s + EXIT_DEADLINE_MARGIN_S)
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        # A plain signal handler, not loop.add_signal_handler: Python runs it even while the event loop is blocked
        # (the blocking write is interrupted), where a loop callback would wait for the loop forever. No logging
        # here: the log stream may be the very thing that blocks.
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(128 + signum)
        deadline.arm(signum)
        loop.call_soon_threadsafe(term.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    await server.start()
    loader = asyncio.create_task(server.load())
    terminated = asyncio.create_task(term.wait())
    await asyncio.wait({loader, terminated}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        log.error("loading the model failed", exc_info=loader.exception())
        await server.stop()
        return 1
    if loader.done():
        watchdog = asyncio.create_task(server.watch_engine())
        await asyncio.wait({watchdog, terminated}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            # The engine died: stop serving so that Kubernetes restarts the pod.
            await server.stop()
            return 1
        watchdog.cancel()
    if not loader.done():
        loader.cancel()
    # Exit 0 either way: the grace period is the contract, and Kubernetes only needs the process gone.
    await server.drain()
    return 0


def run(argv: Sequence[str]) -> int:
    """`dgemma worker ...`: parse flags and environment, serve until SIGTERM, return the exit code."""
    config = parse_config(argv)
    setup_logging(config.log_format)
    setup_tracing("dgemma-worker")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
