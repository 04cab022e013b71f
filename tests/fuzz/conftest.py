"""The fuzzed stack: a `dgemma gateway` process in front of one `dgemma worker` process on the tiny model, with
limits small enough that whatever valid request the fuzzer stumbles on costs a fraction of a second."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.stack import GatewayProcess, HealthProbe, record, rss_mib, worker_health

MODEL = "tiny"
API_KEY = "fuzz-key"
# Examples per surface (an RPC method, or an HTTP operation in one generation mode). CI's default keeps the
# suite to a few tens of seconds; bench/bench_reliability.py runs more.
EXAMPLES = int(os.environ.get("DGEMMA_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=True)
# Memory a process may gain over the whole run, after its warm-up (MiB): a leak or an allocation sized by a
# number in the request shows up well above these; allocator noise stays well below.
RSS_GROWTH_BOUND_MIB = {"worker": 256.0, "gateway": 128.0}
WORKER_ARGS = ["--max-active", "2", "--max-queue", "4", "--max-new-tokens", "32", "--max-denoising-steps", "4",
               "--default-max-denoising-steps", "4", "--default-max-new-tokens", "16", "--max-prompt-tokens", "256"]
GATEWAY_ARGS = ["--max-tokens", "32", "--default-max-tokens", "16", "--max-n", "2", "--max-prompt-tokens", "256"]


@dataclass
class FuzzStack:
    """The processes, their memory at the start, and what every surface answered."""

    workers: LocalWorkers
    gateway: GatewayProcess
    probe: HealthProbe
    baseline_mib: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def worker_address(self) -> str:
        return self.workers.workers[0].address

    def pids(self) -> dict[str, int]:
        return {"worker": self.workers.workers[0].process.pid, "gateway": self.gateway.pid}

    def count(self, surface: str, outcome: str) -> None:
        by_outcome = self.outcomes.setdefault(surface, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1

    def check_invariants(self) -> None:
        """Both processes alive and healthy, neither grown beyond its bound, no health probe failed."""
        for name, pid in self.pids().items():
            rss, _ = rss_mib(pid)
            grown, bound = rss - self.baseline_mib[name], RSS_GROWTH_BOUND_MIB[name]
            assert grown <= bound, f"{name} grew {grown:.0f} MiB (bound {bound:.0f})"
        assert worker_health(self.worker_address) == "SERVING"
        assert self.gateway.ready(), f"the gateway is not ready:\n{self.gateway.log_tail()}"
        assert not self.probe.failures, f"health probes failed: {self.probe.failures[:5]}"


def _warm_up(gateway: GatewayProcess) -> None:
    body = b'{"model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}'
    request = urllib.request.Request(f"{gateway.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200


@pytest.fixture(scope="session")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    workdir = tmp_path_factory.mktemp("fuzz")
    workers = LocalWorkers(str(tiny_model_dir()), 1, MODEL, WORKER_ARGS, workdir=workdir)
    gateway: GatewayProcess | None = None
    try:
        workers.start()
        workers.wait_bound()
        keys = workdir / "api-keys"
        keys.write_text(API_KEY + "\n")
        gateway = GatewayProcess(workdir, [w.address for w in workers.workers], MODEL,
                                 [*GATEWAY_ARGS, "--api-keys-file", str(keys)])
        gateway.wait_ready()
        _warm_up(gateway)
        with HealthProbe(gateway.url, [w.address for w in workers.workers]) as probe:
            stack = FuzzStack(workers, gateway, probe)
            stack.baseline_mib = {name: rss_mib(pid)[0] for name, pid in stack.pids().items()}
            yield stack
        peaks = {name: rss_mib(pid)[1] for name, pid in stack.pids().items()}
        record("fuzz", {"outcomes": stack.outcomes, "worst_probe_ms": dict(probe.worst_ms), "peak_rss_mib": peaks,
                        "probe_failures": probe.failures, "baseline_rss_mib": stack.baseline_mib})
    finally:
        if gateway is not None:
            gateway.stop()
        workers.stop(timeout=10)


def describe(value: Any, limit: int = 600) -> str:
    """A failing input, short enough for an assertion message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
