"""`dgemma serve --autoscale`: load starts a second local worker that takes traffic; idle retires it."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import pytest
from openai import OpenAI

from tests.stack import DgemmaProcess

pytestmark = pytest.mark.timeout(180)

# A slower step (as on a slower GPU) keeps the two CPU cores free while requests take long enough to queue.
STEP_DELAY_S = "0.02"


def ready_endpoints(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    match = re.search(r'^dgemma_gateway_endpoints_ready\{variant="local"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"dgemma serve exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_serve_autoscale_adds_a_worker_under_load_and_retires_it_when_idle() -> None:
    p = DgemmaProcess(["serve", "--autoscale", "--min-replicas", "1", "--max-replicas", "2", "--port", "0",
                       "--grpc-port", "-1", "--max-active", "2", "--autoscale-interval-s", "0.5",
                       "--scale-down-window-s", "3", "--demand-window-s", "3", "--target-utilization", "0.5"],
                      env={"DGEMMA_DEBUG_STEP_DELAY_S": STEP_DELAY_S})
    served: Counter[str] = Counter()
    stop_load = threading.Event()
    try:
        url = p.serving(120)
        assert ready_endpoints(url) == 1.0
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

        def load() -> None:
            while not stop_load.is_set():
                raw = client.chat.completions.with_raw_response.create(
                    model="dgemma-tiny", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
                served[raw.headers["x-dgemma-endpoint"]] += 1

        clients = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for t in clients:
            t.start()
        wait_for(lambda: ready_endpoints(url) == 2.0, 90, "a second worker to be ready", p.proc)
        wait_for(lambda: len(served) == 2, 30, "the second worker to serve requests", p.proc)
        stop_load.set()
        for t in clients:
            t.join(60)
        wait_for(lambda: ready_endpoints(url) == 1.0, 60, "the idle second worker to be retired", p.proc)
        changes = [line for line in p.lines if " workers: " in line]
        assert changes[0].startswith("dgemma serve: 1 -> 2 workers: scale up"), changes
        assert changes[1].startswith("dgemma serve: 2 -> 1 workers: scale down"), changes
        assert len(changes) == 2, changes  # no flapping under steady load
        assert min(served.values()) >= 1, served
    finally:
        stop_load.set()
        p.proc.send_signal(signal.SIGTERM)
        try:
            assert p.proc.wait(30) == 0
        finally:
            p.kill()
