"""Waiting in tests for something that happens in another process or thread: poll a check until it holds, or
fail naming what never happened. The timeouts are bounds for a hang, never a measurement."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """check()'s first truthy result; fails after `timeout` seconds saying it timed out waiting for `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


async def until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Wait, without blocking the event loop, until check() is truthy; fails after `timeout` seconds like
    `eventually`."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)
