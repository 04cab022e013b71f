"""The operator's one call to the gateway: its demand snapshot (I/O at the edge, asyncio HTTP)."""

from __future__ import annotations

from typing import Any

import aiohttp


async def fetch_variant(
    session: aiohttp.ClientSession, url: str, name: str, timeout_s: float
) -> tuple[dict[str, Any] | None, str | None]:
    """The gateway's view of one variant, or None and why not (never raises for network or data errors)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
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
