"""Child processes that cannot outlive the process that started them: `dgemma serve`'s workers, and every server
the tests and benchmarks start. A parent killed with SIGKILL (a test run cut by `timeout`, an OOM kill) cannot
stop its children, and a worker left behind holds its port, its memory and a GPU; on Linux the kernel stops them
instead (prctl PR_SET_PDEATHSIG).

The signal is sent when the *thread* that started the child ends, not the process: start children from a thread
that outlives them (the main thread, or the one thread that also stops them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def die_with_parent(then: Callable[[], object] | None = None) -> Callable[[], None]:
    """A `preexec_fn` for subprocess/asyncio: the child gets SIGKILL when the calling thread ends (Linux; elsewhere
    nothing), then `then` runs in the child."""
    parent = os.getpid()
    prctl = _prctl()  # looked up here: the child runs as little as it can between fork and exec

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the prctl: no signal will come
                os._exit(1)
        if then is not None:
            then()

    return preexec
