"""How long an event loop is blocked: a probe that sleeps a short interval and records how late it woke.

Every server runs one (`dgemma_worker_event_loop_lag_seconds`, `dgemma_gateway_event_loop_lag_seconds`): a
handler that blocks the loop (a large parse, tokenizing on the loop) or a C call that holds the GIL on another
thread shows up as a late wake-up, whatever caused it. On Linux the time the loop's thread spent waiting for a
CPU (the run queue, from /proc/thread-self/schedstat) is subtracted, so an overloaded host does not read as a
blocked loop. At 10 ms, the probe costs ~100 wake-ups a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTERVAL_S = 0.01
_SCHEDSTAT = "/proc/thread-self/schedstat"


def _run_queue_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 where the kernel does not say)."""
    try:
        with open(_SCHEDSTAT) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = INTERVAL_S) -> None:
    """Observe each wake-up's lateness in seconds, less the time spent waiting for a CPU, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        start, waited = loop.time(), _run_queue_s()
        await asyncio.sleep(interval_s)
        late = loop.time() - start - interval_s
        observe(max(0.0, late - (_run_queue_s() - waited)))
