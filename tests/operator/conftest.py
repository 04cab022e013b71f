"""Fixtures that run the operator with kopf's own test runner against the emulator."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from kopf.testing import KopfRunner

from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import CRD_PATH, DemandStub

OPERATOR_ARGS = ["run", "--standalone", "--namespace", "default", "-m", "dgemma_operator.handlers"]


@pytest.fixture
def crd(k8s: EmulatorThread) -> None:
    """The DiffusionGemma CRD, installed with kubectl from the file in deploy/."""
    k8s.kubectl("apply", "-f", CRD_PATH)


@pytest.fixture
def metrics_port(monkeypatch: pytest.MonkeyPatch) -> int:
    """A free port for the operator's metrics endpoint (DGEMMA_OPERATOR_METRICS_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    monkeypatch.setenv("DGEMMA_OPERATOR_METRICS_PORT", str(port))
    return port


@pytest.fixture
def operator(k8s: EmulatorThread, crd: None, metrics_port: int) -> Iterator[KopfRunner]:
    """The operator running in a thread (kopf's KopfRunner) against the emulator, its metrics on `metrics_port`."""
    with KopfRunner(OPERATOR_ARGS, timeout=30) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output[-5000:]


@pytest.fixture
def demand(monkeypatch: pytest.MonkeyPatch) -> Iterator[DemandStub]:
    """A stand-in for the gateway's demand JSON; the operator's autoscaler reads it (DGEMMA_GATEWAY_URL)."""
    stub = DemandStub()
    monkeypatch.setenv("DGEMMA_GATEWAY_URL", stub.url)
    try:
        yield stub
    finally:
        stub.close()
