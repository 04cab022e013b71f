"""The operator's one call to the gateway: its demand snapshot (I/O at the edge, asyncio HTTP).

The gateway usually runs several replicas behind a Service, and each measures only the requests it routed.
So the operator resolves the gateway's host name to every address it has (the chart points it at a headless
Service: one address per gateway pod), reads each replica's snapshot and merges them (`merge_views`, pure).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

# Flows each gateway replica measures for itself: the whole is their sum.
SUMMED_DEMAND = (
    "requests_per_s", "tokens_per_s", "canvases_per_s", "preferred_requests_per_s", "preferred_tokens_per_s",
    "preferred_canvases_per_s", "overflow_in_canvases_per_s", "routed_requests_per_s", "routed_tokens_per_s",
    "routed_canvases_per_s", "requests_held", "canvases_held", "requests_in_flight", "targets_met",
    "targets_missed", "requests_total", "targets_met_total", "targets_missed_total",
)
# Read from the workers' own reports, which every replica sees alike: counted once (the largest view).
SHARED_DEMAND = ("requests_waiting", "canvases_waiting")
SUMMED_DELIVERED = ("completion_tokens_per_s", "canvases_per_s_per_replica")


def merge_views(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One variant as the whole gateway fleet sees it, from each gateway replica's view of it."""
    if not views:
        raise ValueError("no views to merge")
    first = views[0]
    merged: dict[str, Any] = dict(first)
    demands = [v.get("demand") or {} for v in views]
    demand: dict[str, Any] = dict(demands[0])
    for key in SUMMED_DEMAND:
        if any(key in d for d in demands):
            demand[key] = sum(_num(d.get(key)) for d in demands)
    for key in SHARED_DEMAND:
        if any(key in d for d in demands):
            demand[key] = max(_num(d.get(key)) for d in demands)
    met, missed = _num(demand.get("targets_met")), _num(demand.get("targets_missed"))
    demand["target_miss_ratio"] = missed / (met + missed) if met + missed else 0.0
    merged["demand"] = demand
    delivered_views = [v.get("delivered") or {} for v in views]
    delivered: dict[str, Any] = dict(delivered_views[0])
    for key in SUMMED_DELIVERED:
        if any(key in d for d in delivered_views):
            delivered[key] = sum(_num(d.get(key)) for d in delivered_views)
    merged["delivered"] = delivered
    merged["replicas"] = max(int(_num(v.get("replicas"))) for v in views)
    merged["replicas_ready"] = max(int(_num(v.get("replicas_ready"))) for v in views)
    # Capacity comes from the workers' step timings: the view that measured the most replicas.
    merged["capacity"] = max((v.get("capacity") for v in views), key=_measured, default=first.get("capacity"))
    merged["gateways"] = len(views)
    return merged


def _measured(capacity: Any) -> int:
    return int(_num((capacity or {}).get("replicas_measured"))) if isinstance(capacity, Mapping) else -1


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


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
) -> tuple[dict[str, Any] | None, str | None]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                               server_hostname=server_hostname) as response:
            if response.status != 200:
                return None, f"the gateway answered {response.status} at {url}"
            snapshot = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return None, f"the gateway is unreachable at {url} ({type(e).__name__}: {e})".replace(" ()", "")
    variants = snapshot.get("variants") if isinstance(snapshot, dict) else None
    if not isinstance(variants, dict):
        return None, f"the gateway's answer at {url} has no variants"
    variant = variants.get(name)
    if not isinstance(variant, dict):
        return None, f"the gateway does not know variant {name!r} yet"
    return variant, None


async def fetch_variant(
    session: aiohttp.ClientSession, url: str, name: str, timeout_s: float
) -> tuple[dict[str, Any] | None, str | None]:
    """The gateway fleet's view of one variant, or None and why not (never raises for network or data errors).

    Every gateway replica must answer: a partial sum would understate demand and scale down wrongly.
    """
    urls = await gateway_urls(url)
    # Over HTTPS each pod address is checked against the name dialled: the gateway's certificate names the
    # Service, not its pods' addresses.
    hostname = urlsplit(url).hostname if urlsplit(url).scheme == "https" else None
    results = await asyncio.gather(*(_fetch_one(session, u, name, timeout_s, hostname) for u in urls))
    problems = [problem for _, problem in results if problem is not None]
    if problems:
        return None, problems[0] if len(urls) == 1 else f"{len(problems)} of {len(urls)} gateways: {problems[0]}"
    return merge_views([view for view, _ in results if view is not None]), None
