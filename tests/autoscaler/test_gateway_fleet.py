"""The operator reads every gateway replica's demand and adds it up."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dgemma_common.demand import merge_views
from dgemma_common.tls import TlsFiles, server_ssl_context
from dgemma_operator import gateway_client
from dgemma_operator.gateway_client import fetch_variant, gateway_urls
from tests.autoscaler.views import snapshot, view
from tests.tls.certs import CA


def test_flows_add_up_and_what_the_workers_report_counts_once() -> None:
    merged = merge_views([view(1.5, met=8, missed=2, waiting=3, held=1, canvases_held=1.0, replicas=3,
                               delivered_tokens_per_s=900.0),
                          view(0.5, met=10, missed=0, waiting=4, measured=3, capacity=3.0, replicas=3,
                               delivered_tokens_per_s=900.0)])
    d = merged.demand
    assert d.canvases_per_s == 2.0 and d.tokens_per_s == 512.0 and d.requests_per_s == 2.0
    assert (d.targets_met, d.targets_missed) == (18, 2) and d.target_miss_ratio == pytest.approx(0.1)
    assert d.requests_held == 1  # held at one gateway
    assert (d.requests_waiting, d.canvases_waiting) == (4, 4.0)  # worker queues: seen by both, once
    assert merged.delivered.tokens_per_s == 900.0  # the workers' own measurement, once
    assert merged.capacity.replicas_measured == 3 and merged.capacity.canvases_per_s_per_replica == 3.0
    assert merged.replicas_ready == 3 and merged.gateways == 2


def test_one_view_is_itself() -> None:
    one = view(1.0, met=1, missed=1)
    assert merge_views([one]) == one and one.demand.target_miss_ratio == 0.5


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_every_address_of_the_gateway_name_is_read_and_merged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str
) -> None:
    """Two gateway replicas on 127.0.0.1 and 127.0.0.2, one name resolving to both (as a headless Service).

    Over HTTPS their certificate names the Service only, as the chart's Certificate does, not the pods' addresses.
    """
    ca = CA(tmp_path / "ca")
    served = ca.issue("gateway", dns=("gateway-pods.ml.svc",), ips=())
    tls = server_ssl_context(TlsFiles(served.cert, served.key)) if scheme == "https" else None
    runners = []
    port = 0
    for address, canvases in (("127.0.0.1", 1.5), ("127.0.0.2", 0.5)):
        app = web.Application()
        answer = snapshot({"v": view(canvases, met=5, missed=0, waiting=1)}).model_dump(mode="json")

        async def demand(request: web.Request, answer: dict[str, Any] = answer) -> web.Response:
            return web.json_response(answer)

        app.router.add_get("/v1/dgemma/demand", demand)
        runner = web.AppRunner(app)
        await runner.setup()
        if port == 0:
            site = web.TCPSite(runner, address, 0, ssl_context=tls)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        else:
            await web.TCPSite(runner, address, port, ssl_context=tls).start()
        runners.append(runner)
    real = asyncio.get_running_loop().getaddrinfo

    async def resolve(host: str, p: Any, **kw: Any) -> Any:
        if host == "gateway-pods.ml.svc":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, p)) for a in ("127.0.0.1", "127.0.0.2")]
        return await real(host, p, **kw)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", resolve)
    url = f"{scheme}://gateway-pods.ml.svc:{port}/v1/dgemma/demand"
    trust = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca.path)))
    try:
        assert await gateway_urls(url) == [f"{scheme}://127.0.0.1:{port}/v1/dgemma/demand",
                                           f"{scheme}://127.0.0.2:{port}/v1/dgemma/demand"]
        async with aiohttp.ClientSession(connector=trust) as session:
            merged, problem = await fetch_variant(session, url, "v", timeout_s=5)
            assert problem is None and merged is not None
            assert merged.demand.canvases_per_s == 2.0 and merged.gateways == 2
            await runners[1].cleanup()  # one replica gone: no partial sum
            merged, problem = await fetch_variant(session, url, "v", timeout_s=5)
            assert merged is None and problem is not None and problem.message.startswith("1 of 2 gateways")
            assert problem.reason == "GatewayUnreachable"
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_plain_host_name_is_used_as_given() -> None:
    assert await gateway_client.gateway_urls("http://127.0.0.1:8000/x") == ["http://127.0.0.1:8000/x"]
