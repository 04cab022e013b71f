"""One gateway process: the core, the HTTP API and the KServe gRPC front, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Sequence

import grpc
from aiohttp import web

from dgemma_common.auth import ApiKeys
from dgemma_common.looplag import watch_loop_lag
from dgemma_common.tls import ReloadingFiles, grpc_server_credentials, keep_reloaded, server_ssl_context
from dgemma_gateway.config import GatewayConfig
from dgemma_gateway.core import Gateway
from dgemma_gateway.endpoints import EndpointSource, Registry, StaticSource, WorkerTls, channel_factory
from dgemma_gateway.images import ImageIntake
from dgemma_gateway.kserve_front import start_grpc
from dgemma_gateway.openai_api import OpenAIApp
from dgemma_gateway.routing import load_profile_file

log = logging.getLogger(__name__)


class GatewayServer:
    """Owns the Gateway and its two listeners."""

    def __init__(self, config: GatewayConfig, sources: Sequence[EndpointSource] | None = None) -> None:
        self.config = config
        if sources is None:
            sources = default_sources(config)
        self.gateway = Gateway(load_profile_file(config.routing_profile), sources, config.core,
                               open_channel=channel_factory(config.worker_tls))
        self.keys = ApiKeys(config.api_keys_file)  # one checker for both listeners
        # One intake for both fronts, so the bound on images decoded at once holds for the whole process.
        self.images = ImageIntake(config.limits.images)
        self.api = OpenAIApp(self.gateway, self.keys, config.limits, self.images)
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.port: int | None = None
        self.grpc_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the sources and both listeners; write the port file."""
        cfg = self.config
        await self.gateway.start()
        await self.images.start()
        self._tasks.append(asyncio.create_task(watch_loop_lag(self.gateway.metrics.loop_lag.observe), name="loop-lag"))
        self._runner = web.AppRunner(
            # A client that goes away cancels its handler, and so the worker's request, at once.
            # Bodies as sent: content_encoding.decode_body decompresses them, bounded (aiohttp's own did not stop
            # at the body limit).
            self.api.app, access_log=None, handle_signals=False, handler_cancellation=True, auto_decompress=False)
        await self._runner.setup()
        ssl_context = None
        if cfg.tls is not None:
            ssl_context = server_ssl_context(cfg.tls)
            self._tasks.append(asyncio.create_task(keep_reloaded(ssl_context, cfg.tls, cfg.tls_reload_s)))
        worker_client = cfg.worker_tls.client if cfg.worker_tls is not None else None
        if worker_client is not None:
            self._tasks.append(asyncio.create_task(
                _renew_on_rotation(self.gateway.registry, cfg.worker_tls, cfg.tls_reload_s)))  # type: ignore[arg-type]
        site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True, ssl_context=ssl_context)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else cfg.port
        if cfg.grpc_port >= 0:
            credentials = grpc_server_credentials(cfg.tls) if cfg.tls is not None else None
            self._grpc, self.grpc_port = await start_grpc(
                self.gateway, cfg.host, cfg.grpc_port, self.keys, cfg.limits.max_tokens,
                cfg.limits.default_max_tokens, credentials, self.images, cfg.limits.prompt_byte_limit)
        log.info("gateway listening on %s %s:%s, grpc %s", "https" if cfg.tls else "http", cfg.host, self.port,
                 self.grpc_port)
        if cfg.port_file is not None:
            tmp = cfg.port_file.with_name(cfg.port_file.name + ".tmp")
            tmp.write_text(json.dumps({"port": self.port, "grpc_port": self.grpc_port, "pid": os.getpid()}))
            tmp.replace(cfg.port_file)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop listening, let in-flight requests end within the grace period, close upstreams."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.images.close()
        await self.gateway.stop()


async def _renew_on_rotation(registry: Registry, tls: WorkerTls, interval_s: float) -> None:
    """Reopen the worker channels when our client certificate is renewed (a channel keeps the one it opened with)."""
    assert tls.client is not None
    files = ReloadingFiles(tls.client)
    while True:
        await asyncio.sleep(interval_s)
        if files.refresh():
            registry.renew_channels()


def default_sources(config: GatewayConfig) -> list[EndpointSource]:
    """The static list and, if asked, the Kubernetes source."""
    sources: list[EndpointSource] = []
    if config.endpoints:
        sources.append(StaticSource(config.endpoints))
    if config.kubernetes:
        from dgemma_gateway.kube import KubernetesSource

        sources.append(KubernetesSource.from_environment(config.namespace))
    return sources
