"""No process outlives the one that started it, even one killed with SIGKILL: `dgemma serve`'s workers, and
every server the tests and benchmarks start (dgemma_serve.lifetime.die_with_parent). A worker left behind holds
its port, its memory and, on a GPU machine, the GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dgemma_serve.lifetime import die_with_parent
from dgemma_worker.model import tiny_model_dir
from tests.waiting import eventually

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")]

WORKER = [sys.executable, "-m", "dgemma_worker.server", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
          "--port", "0", "--metrics-port", "off"]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that nobody has reaped yet (it runs no more)."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def workers_of(parent: int) -> list[int]:
    """The live `dgemma_worker.server` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[1]) == parent:
            try:
                if b"dgemma_worker.server" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test if they still run (so that a failure here leaves nothing behind)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_dgemma_serve_leaves_no_worker_behind(leftovers: list[int]) -> None:
    # The workers run in their own session (Ctrl-C reaches only `dgemma serve`, which stops them in order), so a
    # kill of serve's process group does not reach them either: before, each one lived on with parent pid 1.
    serve = subprocess.Popen([sys.executable, "-m", "dgemma_cli.main", "serve", "--model", str(tiny_model_dir()),
                              "--replicas", "2", "--port", "0", "--grpc-port", "-1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=die_with_parent())
    workers = eventually(lambda: len(w := workers_of(serve.pid)) == 2 and w, 60, "serve to start two workers")
    leftovers.extend(workers)
    os.killpg(serve.pid, signal.SIGKILL)
    serve.wait(10)
    eventually(lambda: all(gone(pid) for pid in workers), 10, "the workers to die with dgemma serve")


def test_a_worker_started_with_die_with_parent_dies_when_its_parent_is_sigkilled(leftovers: list[int]) -> None:
    # A pytest-like parent: it starts a worker the way the tests do and is then killed as `timeout -s KILL` would.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from dgemma_serve.lifetime import die_with_parent\n"
         f"w = subprocess.Popen({WORKER!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
         "start_new_session=True, preexec_fn=die_with_parent())\n"
         "print(w.pid, flush=True)\n"
         "time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent())
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    leftovers.append(worker)
    assert not gone(worker)
    parent.kill()
    parent.wait(10)
    eventually(lambda: gone(worker), 10, "the worker to die with its parent")
