"""Errors steer retries: transient API failures back off; other failures are not disguised as transient."""

from __future__ import annotations

import kopf
import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from dgemma_operator.handlers import _transient, backoff


@pytest.mark.parametrize("status", [409, 429, 500, 502, 503, 504])
def test_conflicts_throttling_and_server_errors_are_temporary(status: int) -> None:
    error = _transient(ApiException(status=status, reason="x"), retry=2)
    assert isinstance(error, kopf.TemporaryError) and error.delay == 4.0


def test_timeouts_and_unreachable_apis_are_temporary() -> None:
    timeout = urllib3.exceptions.ReadTimeoutError(None, "/apis", "read timed out")
    assert isinstance(_transient(timeout, retry=0), kopf.TemporaryError)
    assert isinstance(_transient(ConnectionRefusedError(), retry=0), kopf.TemporaryError)


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_are_not_retried_as_transient(status: int) -> None:
    assert _transient(ApiException(status=status, reason="x"), retry=0) is None


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [backoff(r) for r in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
