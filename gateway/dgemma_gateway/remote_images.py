"""Fetching `http(s)` image URLs for clients: off unless hosts are allowed, and never into the cluster.

Fetching a client's URL from inside a cluster is a server-side request forgery risk: the gateway can reach
Services, the cloud metadata endpoint and loopback that the client cannot. So a URL is fetched only when its
host is on the allowlist; its name is resolved here and every address is checked (public unicast only: no
loopback, private, link-local, shared, reserved or multicast range), and the connection goes to an address
that passed the check (the HTTP client gets the checked addresses, so a second DNS answer cannot rebind the
name to an inside address). Redirects are followed only to the same host, each one checked again; the body is
read up to the byte limit and the whole fetch has one deadline. Every refusal is a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from dgemma_gateway.errors import bad_request

# Names that only mean something inside a cluster or a host; refused even when allowed by mistake.
INTERNAL_SUFFIXES = (".svc", ".cluster.local", ".local", ".internal", ".localhost")
MAX_REDIRECTS = 3
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class RemoteImageSettings:
    """Which image URLs the gateway may fetch, and within what bounds."""

    allowed_hosts: tuple[str, ...] = ()  # exact names, or "*.example.com" for its subdomains; empty: off
    timeout_s: float = 5.0  # the whole fetch, redirects included

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)


def public_address(ip: IpAddress) -> bool:
    """True for a globally routable unicast address (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether `host` is on the allowlist (and is not a cluster- or host-internal name)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(INTERNAL_SUFFIXES):
        return False
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver, returning only the addresses that pass the check (what is checked is what is dialled)."""

    def __init__(self, allowed: Callable[[IpAddress], bool]) -> None:
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        out: list[ResolveResult] = []
        for fam, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            if self._allowed(ipaddress.ip_address(address.split("%", 1)[0])):
                out.append(ResolveResult(hostname=host, host=address, port=int(sockaddr[1]), family=fam,
                                         proto=proto, flags=socket.AI_NUMERICHOST))
        if not out:
            raise OSError(f"{host} resolves to no public address")
        return out

    async def close(self) -> None:
        return None


class RemoteImages:
    """Fetches allowed image URLs; one HTTP client for the gateway's lifetime."""

    def __init__(self, settings: RemoteImageSettings, max_bytes: int,
                 address_allowed: Callable[[IpAddress], bool] = public_address) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self._address_allowed = address_allowed
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=CheckedResolver(self._address_allowed), use_dns_cache=False,
                                             limit=16)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  headers={"User-Agent": "dgemma-gateway"})
        return self._session

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str, field: str) -> tuple[bytes, str | None]:
        """The bytes at `url` and the MIME type the server declared; GatewayError 400 naming `field` otherwise."""
        if not self.settings.enabled:
            raise bad_request(field, "remote image URLs are not enabled on this server; send the image as a "
                                     "data: URL (data:image/png;base64,...)")
        target = self._checked(URL(url), field, None)
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    async with self._client().get(target, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            location = response.headers.get("Location", "")
                            target = self._checked(target.join(URL(location)), field, target.host)
                            continue
                        return await self._body(response, field)
                raise bad_request(field, f"the image URL redirects more than {MAX_REDIRECTS} times")
        except TimeoutError:
            raise bad_request(field, f"fetching the image took longer than {self.settings.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise bad_request(field, f"cannot fetch the image: {_reason(exc)}") from None

    def _checked(self, url: URL, field: str, previous_host: str | None) -> URL:
        if url.scheme not in ("http", "https") or not url.host:
            raise bad_request(field, "an image URL must be an http(s) URL or a data: URL")
        if url.user is not None or url.password is not None:
            raise bad_request(field, "an image URL must not carry credentials")
        if previous_host is not None and url.host != previous_host:
            raise bad_request(field, "the image URL redirects to another host")
        if not host_allowed(url.host, self.settings.allowed_hosts):
            raise bad_request(field, f"the host {url.host!r} is not on this server's list of image hosts")
        try:
            literal: IpAddress | None = ipaddress.ip_address(url.host)
        except ValueError:
            literal = None
        # An address in the URL is dialled without a lookup, so it is checked here.
        if literal is not None and not self._address_allowed(literal):
            raise bad_request(field, f"the image URL points to a non-public address {url.host}")
        return url

    async def _body(self, response: aiohttp.ClientResponse, field: str) -> tuple[bytes, str | None]:
        if response.status != 200:
            raise bad_request(field, f"fetching the image answered HTTP {response.status}")
        if (response.content_length or 0) > self.max_bytes:
            raise bad_request(field, f"the image has {response.content_length} bytes; the limit is {self.max_bytes}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise bad_request(field, f"the image is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        mime = response.content_type if response.content_type.startswith("image/") else None
        return b"".join(chunks), mime


def _reason(exc: BaseException) -> str:
    """A short description of a fetch failure."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return str(exc.os_error) if exc.os_error else "connection failed"
    return (str(exc) or type(exc).__name__)[:200]

