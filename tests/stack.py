"""Real processes for the tests: `dgemma gateway` in front of `dgemma worker` processes, any `dgemma` command
(`dgemma serve`) with its output collected, the processes' memory from /proc, a health prober that runs beside the
traffic, and a tally of outcomes that the reliability benchmark (bench/bench_reliability.py) collects when
DGEMMA_RELIABILITY_OUT names a folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgemma_serve.lifetime import die_with_parent

RELIABILITY_OUT_ENV = "DGEMMA_RELIABILITY_OUT"


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class GatewayProcess:
    """`dgemma gateway` as a process on free ports of 127.0.0.1, in front of the given workers."""

    def __init__(self, workdir: Path, endpoints: Sequence[str], model: str, args: Sequence[str] = ()) -> None:
        self.port_file = workdir / "gateway.json"
        self.log_path = workdir / "gateway.log"
        cmd = [sys.executable, "-m", "dgemma_cli.main", "gateway", "--host", "127.0.0.1", "--port", "0",
               "--grpc-port", "0", "--port-file", str(self.port_file), "--model", model,
               *(a for e in endpoints for a in ("--endpoint", e)), *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{ports['port']}"
        self.grpc_address = f"127.0.0.1:{ports['grpc_port']}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def ready_endpoints(self) -> int:
        """How many workers /readyz counts as ready (0 while it answers 503 or not at all)."""
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as r:
                return int(json.load(r)["endpoints_ready"])
        except OSError:
            return 0

    def ready(self) -> bool:
        """/readyz says some worker is ready."""
        return self.ready_endpoints() > 0

    def wait_ready(self, timeout: float = 120.0, endpoints: int = 1) -> None:
        """Until the gateway counts `endpoints` ready workers (routing ignores one it has not seen ready)."""
        deadline = time.monotonic() + timeout
        while self.ready_endpoints() < endpoints:
            assert self.process.poll() is None, f"the gateway exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"the gateway saw fewer than {endpoints} ready:\n{self.log_tail()}"
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class DgemmaProcess:
    """A `dgemma` command (`serve`, ...) as a process in its own session, its output collected line by line."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dgemma_cli.main", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=die_with_parent(),
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: self.lines.extend(iter(out.readline, "")), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the output; fails if the process exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                return match
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def serving(self, timeout: float = 180.0) -> str:
        """Once `dgemma serve` says it is ready: its gateway's URL."""
        self.wait_for(r"ready\. Try", timeout)
        return self.wait_for(r"gateway at (http://\S+)", 1).group(1)

    def kserve_address(self) -> str:
        """host:port of `dgemma serve`'s KServe gRPC front (once it is ready)."""
        port = self.wait_for(r"KServe gRPC on port (\d+)", 1).group(1)
        return f"127.0.0.1:{port}"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a drain), then SIGKILL if it is still there after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL to its process group, at once."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def worker_health(address: str, timeout: float = 5.0) -> str:
    """The worker's overall gRPC health status name, or the RPC's failure code name."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@dataclass
class HealthProbe:
    """Asks the gateway's /healthz and each worker's gRPC health every `interval_s` while traffic runs; keeps
    the worst round trip of each (an outside view of how long an event loop stalled) and every failed answer."""

    gateway_url: str
    worker_addresses: Sequence[str]
    interval_s: float = 0.02
    worst_ms: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _probe_gateway(self) -> None:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=10) as r:
                ok = r.status == 200
        except OSError as exc:
            ok, why = False, str(exc)
        else:
            why = "status"
        self._record("gateway", started, ok, why)

    def _record(self, who: str, started: float, ok: bool, why: str) -> None:
        self.worst_ms[who] = max(self.worst_ms[who], round((time.perf_counter() - started) * 1000, 1))
        if not ok:
            self.failures.append(f"{who}: {why}")

    def _run(self) -> None:
        channels = [grpc.insecure_channel(a) for a in self.worker_addresses]
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        try:
            while not self._stop.wait(self.interval_s):
                self._probe_gateway()
                for address, stub in zip(self.worker_addresses, stubs, strict=True):
                    started = time.perf_counter()
                    try:
                        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                        ok, why = status == health_pb2.HealthCheckResponse.SERVING, f"status {status}"
                    except grpc.RpcError as err:
                        ok, why = False, str(err.code())
                    self._record(f"worker {address}", started, ok, why)
        finally:
            for c in channels:
                c.close()

    def __enter__(self) -> HealthProbe:
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    @property
    def worst_worker_ms(self) -> float:
        return max((v for k, v in self.worst_ms.items() if k.startswith("worker")), default=0.0)


def record(name: str, data: dict[str, Any]) -> None:
    """Write one suite's measurements for the reliability benchmark (only when it asks for them)."""
    out = os.environ.get(RELIABILITY_OUT_ENV)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
