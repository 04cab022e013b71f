"""Memory bounds in tests: the growth of a process's peak resident set while some code runs (Linux /proc)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Growth:
    """Peak RSS growth in MiB, filled in when the block ends."""

    mib: float = 0.0


@contextlib.contextmanager
def peak_rss_growth(pid: int | str = "self") -> Iterator[Growth]:
    """How far the process's peak RSS rose above its RSS at the start of the block.

    The kernel's high-water mark is reset first (clear_refs 5), so an earlier peak does not hide this one.
    """
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    start = _status_kib(pid, "VmRSS")
    growth = Growth()
    try:
        yield growth
    finally:
        growth.mib = (_status_kib(pid, "VmHWM") - start) / 1024
