"""The endpoint registry's own bookkeeping: every task it starts is held and ended when it closes."""

from __future__ import annotations

import asyncio

import grpc

from dgemma_gateway.endpoints import EndpointSpec, Registry
from dgemma_gateway.types import Variant


async def test_closing_the_registry_closes_the_channels_of_forgotten_endpoints_and_leaves_no_task() -> None:
    registry = Registry()
    registry.apply("s", [EndpointSpec("v/a", "127.0.0.1:9", Variant("v", "m"))])
    state = registry.endpoints["v/a"]
    state.inflight = 1  # a call still running there: its channel is closed later, not at once
    registry.apply("s", [])  # the endpoint goes
    await asyncio.sleep(0)
    await registry.close()
    assert state.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
