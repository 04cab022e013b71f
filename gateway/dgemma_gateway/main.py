"""`dgemma gateway`: run the gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from dgemma_common.logs import setup_logging
from dgemma_common.tracing import setup_tracing
from dgemma_gateway.app import GatewayServer
from dgemma_gateway.config import GatewayConfig, parse_config

log = logging.getLogger(__name__)


async def serve(config: GatewayConfig) -> int:
    """Serve until a signal; stop gracefully."""
    server = GatewayServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"dgemma gateway: http://{config.host}:{server.port} (grpc {server.grpc_port})", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def run(argv: Sequence[str]) -> int:
    """`dgemma gateway ...`."""
    config = parse_config(argv)
    # Text lines with the request id of each request's records (the CLI's level is kept); client strings
    # (request ids, paths) are escaped and bounded in every line (logs.TextFormatter is a SafeFormatter).
    setup_logging("text", logging.getLogger().level or logging.INFO)
    logging.getLogger("dgemma_gateway").setLevel(logging.INFO)
    setup_tracing("dgemma-gateway")
    return asyncio.run(serve(config))
