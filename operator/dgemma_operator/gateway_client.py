"""The operator's one call to the gateway: its demand snapshot (I/O at the edge, asyncio HTTP).

The gateway usually runs several replicas behind a Service, and each measures only the requests it routed.
So the operator resolves the gateway's host name to every address it has (the chart points it at a headless
Service: one address per gateway pod), reads each replica's snapshot, parses it strictly against the contract
(`dgemma_common.demand`) and merges them (`merge_views`, pure, by the rules the contract declares per field).
"""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from dgemma_common.demand import SnapshotError, VariantView, merge_views, parse_snapshot
from dgemma_operator.autoscale import Problem


async def gateway_urls(url: str) -> list[str]:
    """The URL once per address its host resolves to (every pod of a headless Service), else as given."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if host is None:
        return [url]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]  # let the fetch report the failure
    addresses = sorted({str(info[4][0]) for info in infos})
    if len(addresses) <= 1:
        return [url]
    netloc = lambda a: f"[{a}]:{port}" if ":" in a else f"{a}:{port}"  # noqa: E731
    return [urlunsplit((parts.scheme, netloc(a), parts.path, parts.query, "")) for a in addresses]


async def _fetch_one(
    session: aiohttp.ClientSession, url: str, name: str, timeout_s: float, server_hostname: str | None = None
) -> VariantView | Problem:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                               server_hostname=server_hostname) as response:
            if response.status != 200:
                return Problem("GatewayUnreachable", f"the gateway answered {response.status} at {url}")
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        message = f"the gateway is unreachable at {url} ({type(e).__name__}: {e})".replace(" ()", "")
        return Problem("GatewayUnreachable", message)
    try:
        snapshot = parse_snapshot(json.loads(body))
    except ValueError as e:  # not JSON, or not this version of the contract (SnapshotError)
        what = e if isinstance(e, SnapshotError) else "is not JSON"
        return Problem("InvalidDemandSnapshot", f"the gateway's demand snapshot at {url} {what}")
    view = snapshot.variants.get(name)
    if view is None:
        return Problem("VariantUnknown", f"the gateway does not know variant {name!r} yet")
    return view


async def fetch_variant(
    session: aiohttp.ClientSession, url: str, name: str, timeout_s: float
) -> tuple[VariantView | None, Problem | None]:
    """The gateway fleet's view of one variant, or None and why not (never raises for network or data errors).

    Every gateway replica must answer with a snapshot this operator can read: a partial sum would understate
    demand and scale down wrongly.
    """
    urls = await gateway_urls(url)
    # Over HTTPS each pod address is checked against the name dialled: the gateway's certificate names the
    # Service, not its pods' addresses.
    hostname = urlsplit(url).hostname if urlsplit(url).scheme == "https" else None
    results = await asyncio.gather(*(_fetch_one(session, u, name, timeout_s, hostname) for u in urls))
    problems = [r for r in results if isinstance(r, Problem)]
    if problems:
        first = problems[0]
        prefix = "" if len(urls) == 1 else f"{len(problems)} of {len(urls)} gateways: "
        return None, Problem(first.reason, prefix + first.message)
    return merge_views([r for r in results if isinstance(r, VariantView)]), None
