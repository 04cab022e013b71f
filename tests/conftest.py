"""Shared pytest fixtures. Each component keeps its fixtures in its own clearly named section."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from tests.k8s_emulator import EmulatorThread

# The operator's autoscaler timer interval is fixed when kopf registers the handlers (at import), so the
# tests choose a short one before anything imports them. Only resources with autoscaling on use it.
os.environ.setdefault("DGEMMA_AUTOSCALE_INTERVAL_S", "0.5")

# --- Kubernetes API emulator (operator; reusable by gateway and end-to-end tests) ------------------


@pytest.fixture
def k8s(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    """A fresh Kubernetes API on 127.0.0.1 (own thread and loop); KUBECONFIG points at it."""
    with EmulatorThread(tmp_path / "k8s") as emulator:
        monkeypatch.setenv("KUBECONFIG", emulator.kubeconfig)
        yield emulator


# --- end of the Kubernetes API emulator section --------------------------------------------------
