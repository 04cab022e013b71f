"""Fixtures that run the operator with kopf's own test runner against the emulator."""

from __future__ import annotations

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
def operator(k8s: EmulatorThread, crd: None) -> Iterator[KopfRunner]:
    """The operator running in a thread (kopf's KopfRunner) against the emulator."""
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
