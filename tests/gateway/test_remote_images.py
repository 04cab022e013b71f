"""Remote image URLs, fetched from a real HTTP server on 127.0.0.1: allowlist, address checks, redirects only
to the same host, and the size and time limits, each a 400 naming the part."""

from __future__ import annotations

import asyncio
import functools
import gzip
import ipaddress
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from dgemma_common.images import ImageLimits
from dgemma_gateway.errors import GatewayError
from dgemma_gateway.images import ImageIntake, ImageRef, ImageSettings
from dgemma_gateway.remote_images import (
    CheckedResolver,
    RemoteImages,
    RemoteImageSettings,
    host_allowed,
    public_address,
)
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from tests.common.imagefiles import image_bytes
from tests.procmem import peak_rss_growth

PNG = image_bytes("PNG", (40, 30))


@functools.cache
def bomb() -> bytes:
    """128 MiB of zeros in ~125 KiB of gzip."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    return b"".join(c.compress(zeros) for _ in range(128)) + c.flush()
FIELD = "messages[0].content[0]"


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """An image host on 127.0.0.1: an image, redirects, a huge body, a slow answer."""
    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def same_host(request: web.Request) -> web.Response:
        raise web.HTTPFound("/cat.png")

    async def other_host(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{request.url.port}/cat.png")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})  # no Content-Length: chunked
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"\0" * 65536)
        return response

    async def expands(request: web.Request) -> web.Response:
        return web.Response(body=bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(PNG), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", picture)
    app.router.add_get("/moved", same_host)
    app.router.add_get("/away", other_host)
    app.router.add_get("/huge.png", huge)
    app.router.add_get("/slow.png", slow)
    app.router.add_get("/bomb.png", expands)
    app.router.add_get("/gzipped.png", gzipped)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def loopback_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The test's image host is on 127.0.0.1, which the real check refuses (see test_addresses_...)."""
    return ip.is_loopback


async def fetch(url: str, **settings: object) -> bytes:
    remote = RemoteImages(RemoteImageSettings(**{"allowed_hosts": ("127.0.0.1",), "timeout_s": 1.0, **settings}),
                          max_bytes=1024 * 1024, address_allowed=loopback_allowed)
    try:
        data, _ = await remote.fetch(url, FIELD)
        return data
    finally:
        await remote.close()


async def refused(url: str, reason: str, **settings: object) -> None:
    with pytest.raises(GatewayError) as info:
        await fetch(url, **settings)
    assert info.value.status == 400 and info.value.param == FIELD
    assert reason in info.value.message


async def test_an_allowed_image_url_is_fetched_and_same_host_redirects_followed(server: str) -> None:
    assert await fetch(f"{server}/cat.png") == PNG
    assert await fetch(f"{server}/moved") == PNG


async def test_a_redirect_to_another_host_is_refused(server: str) -> None:
    await refused(f"{server}/away", "redirects to another host")


async def test_the_size_and_time_limits_hold(server: str) -> None:
    await refused(f"{server}/huge.png", "over the limit of 1048576 bytes")
    await refused(f"{server}/slow.png", "took longer than 1 s")


async def test_a_compressed_answer_counts_against_the_limit_as_it_expands(server: str) -> None:
    # An image host may gzip its answer: it is decompressed as it is read, so the byte limit holds for what it
    # expands to and a small answer cannot expand into memory (the gateway's own request bodies could: see
    # test_compressed_bodies.py).
    assert await fetch(f"{server}/gzipped.png") == PNG
    with peak_rss_growth() as growth:
        await refused(f"{server}/bomb.png", "over the limit of 1048576 bytes")
    assert growth.mib < 64, f"peak memory grew {growth.mib:.0f} MiB for a {len(bomb()) // 1024} KiB answer"


async def test_hosts_off_the_allowlist_and_internal_names_are_refused(server: str) -> None:
    await refused(f"{server}/cat.png", "remote image URLs are not enabled", allowed_hosts=())
    await refused(f"{server}/cat.png", "not on this server's list", allowed_hosts=("images.example.com",))
    assert host_allowed("a.example.com", ("*.example.com",))
    assert not host_allowed("example.com.evil", ("*.example.com",))
    for name in ("localhost", "api.default.svc", "api.default.svc.cluster.local", "metadata.google.internal"):
        assert not host_allowed(name, (name,))


async def test_names_resolving_to_inside_addresses_are_never_dialled(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    remote = RemoteImages(RemoteImageSettings(allowed_hosts=("127.0.0.1", "127.1", "2130706433")), max_bytes=1024)
    try:
        with pytest.raises(GatewayError, match="non-public address"):
            await remote.fetch(f"http://127.0.0.1:{port}/cat.png", FIELD)
        for disguised in ("127.1", "2130706433"):  # 127.0.0.1 to a resolver; refused before any lookup
            with pytest.raises(GatewayError, match="cannot fetch the image"):
                await remote.fetch(f"http://{disguised}:{port}/cat.png", FIELD)
    finally:
        await remote.close()
    # What the HTTP client dials is what the resolver returns, and it returns only checked addresses.
    with pytest.raises(OSError, match="localhost resolves to no public address"):
        await CheckedResolver(public_address).resolve("localhost", int(port))
    assert [r["host"] for r in await CheckedResolver(loopback_allowed).resolve("localhost", int(port))]


def test_addresses_inside_clusters_and_hosts_are_not_public() -> None:
    inside = ["127.0.0.1", "10.0.0.7", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
              "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"]
    for address in inside:
        assert not public_address(ipaddress.ip_address(address)), address
    assert public_address(ipaddress.ip_address("93.184.216.34"))
    assert public_address(ipaddress.ip_address("2606:2800:220:1:248:1893:25c8:1946"))


async def test_a_fetched_image_is_checked_like_any_other(server: str) -> None:
    remote = RemoteImages(RemoteImageSettings(allowed_hosts=("127.0.0.1",)), max_bytes=1024 * 1024,
                          address_allowed=loopback_allowed)
    intake = ImageIntake(ImageSettings(limits=ImageLimits(max_pixels=100)), remote)
    target = pb.Image()
    try:
        with pytest.raises(GatewayError, match="40x30 pixels; the limit is 100"):
            await intake.load([ImageRef(FIELD, f"{server}/cat.png", target)], "messages")
        intake = ImageIntake(ImageSettings(), remote)
        infos = await intake.load([ImageRef(FIELD, f"{server}/cat.png", target)], "messages")
        assert (infos[0].width, target.data, target.mime_type) == (40, PNG, "image/png")
    finally:
        await intake.close()
