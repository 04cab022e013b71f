"""Local `dgemma worker` processes on 127.0.0.1, each on a free port, for `dgemma serve` and benchmarks."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dgemma_gateway.endpoints import EndpointSpec
from dgemma_gateway.types import Variant
from dgemma_serve.lifetime import die_with_parent


@dataclass
class LocalWorker:
    """One `dgemma worker` child process."""

    index: int
    process: subprocess.Popen[bytes]
    port_file: Path
    log_path: Path
    port: int | None = None
    stopping: bool = False  # SIGTERM sent: draining, then gone

    @property
    def address(self) -> str:
        """host:port of its gRPC server."""
        return f"127.0.0.1:{self.port}"


@dataclass
class LocalWorkers:
    """N worker processes on 127.0.0.1, each on a free port, logs in a temporary directory."""

    model: str
    replicas: int = 1
    served_model_name: str = ""
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    variant: str = ""  # the gateway's name for the variant, put on the workers' metrics as `variant`
    drain_grace_s: float = 30.0  # on SIGTERM, how long a worker lets in-flight requests run (its --drain-grace-s)
    # The key every worker requires (its --api-keys-file, written to the work directory, readable by us only) and
    # the endpoints carry; None: the workers take calls without a key.
    api_key: str | None = field(default=None, repr=False)
    workers: list[LocalWorker] = field(default_factory=list)
    _index: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def start(self) -> None:
        """Spawn the processes (they bind at once and load the model in the background)."""
        for _ in range(self.replicas):
            self.spawn()

    @contextlib.contextmanager
    def running(self, stop_timeout: float | None = None) -> Iterator[LocalWorkers]:
        """Started and bound (the model may still be loading) for the `with` block; stopped after it."""
        try:
            self.start()
            self.wait_bound()
            yield self
        finally:
            self.stop(stop_timeout)

    def spawn(self) -> LocalWorker:
        """Start one more worker process (on a free port; it loads the model in the background). Call it from a
        thread that outlives the worker (see dgemma_serve.lifetime): the worker is killed when that thread ends."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="dgemma-serve-"))
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **self.env}
        i = next(self._index)
        port_file = self.workdir / f"worker-{i}.json"
        port_file.unlink(missing_ok=True)
        log_path = self.workdir / f"worker-{i}.log"
        cmd = [sys.executable, "-m", "dgemma_worker.server", "--model", self.model, "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "off", "--port-file", str(port_file),
               "--drain-grace-s", f"{self.drain_grace_s:g}",
               *(["--served-model-name", self.served_model_name] if self.served_model_name else []),
               *(["--variant", self.variant] if self.variant else []),
               *(["--api-keys-file", str(self._key_file())] if self.api_key is not None else []),
               *self.extra_args]
        with open(log_path, "wb") as log:
            # Its own session, so Ctrl-C reaches only us and we stop the workers in order; killed with us, so a
            # `dgemma serve` that dies without stopping them (SIGKILL) leaves none behind.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=die_with_parent())
        worker = LocalWorker(i, proc, port_file, log_path)
        self.workers.append(worker)
        return worker

    def _key_file(self) -> Path:
        """The workers' API key file (written once, mode 0600: another local user must not read the key)."""
        assert self.workdir is not None and self.api_key is not None
        path = self.workdir / "worker-api-keys"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.api_key}\n")
        return path

    def poll_bound(self, w: LocalWorker) -> bool:
        """Whether the worker has written its port file (reads the port once it has)."""
        if w.port is None and w.port_file.exists():
            w.port = int(json.loads(w.port_file.read_text())["port"])
        return w.port is not None

    def retire(self, w: LocalWorker) -> None:
        """SIGTERM one worker: it stops taking requests, finishes those in flight, exits (see reap)."""
        w.stopping = True
        if w.process.poll() is None:
            w.process.send_signal(signal.SIGTERM)

    def reap(self) -> list[LocalWorker]:
        """Forget the workers whose process has exited; returns them."""
        gone = [w for w in self.workers if w.process.poll() is not None]
        self.workers = [w for w in self.workers if w.process.poll() is None]
        return gone

    def wait_bound(self, timeout: float = 120.0) -> None:
        """Wait until every worker has written its port file."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while not self.poll_bound(w):
                if w.process.poll() is not None:
                    raise RuntimeError(f"worker {w.index} exited with {w.process.returncode}:\n{self.log_tail(w)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {w.index} did not bind within {timeout:.0f} s:\n{self.log_tail(w)}")
                time.sleep(0.05)

    def log_tail(self, w: LocalWorker, lines: int = 20) -> str:
        """The end of a worker's log."""
        try:
            return "\n".join(w.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def endpoints(self, variant: Variant) -> list[EndpointSpec]:
        """The (bound) workers as static endpoints of one variant."""
        return [EndpointSpec(f"{variant.name}/{w.address}", w.address, variant, api_key=self.api_key)
                for w in self.workers if w.port is not None]

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (drain), then SIGKILL whatever is left after the timeout (default: the drain grace + 10 s)."""
        timeout = self.drain_grace_s + 10.0 if timeout is None else timeout
        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait(5)
