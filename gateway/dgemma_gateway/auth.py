"""API keys on the HTTP API (the checker itself is `dgemma_common.auth`, shared with the gRPC fronts),
and the limit on concurrent streams per key."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from dgemma_common.auth import ApiKeys, AuthError
from dgemma_gateway.errors import GatewayError


def authenticate(keys: ApiKeys, headers: Mapping[str, str], on_refused: Callable[[str], None]) -> str:
    """The caller's key id from HTTP headers, or 401 (counted by `on_refused(reason)`)."""
    try:
        return keys.check(headers.get)
    except AuthError as err:
        on_refused(err.reason)
        raise GatewayError(401, err.message, code="invalid_api_key") from None


class StreamLimiter:
    """At most `limit` concurrent streams per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: dict[str, int] = {}

    def acquire(self, key_id: str) -> None:
        """Take a slot or raise 429."""
        n = self.active.get(key_id, 0)
        if self.limit > 0 and n >= self.limit:
            raise GatewayError(429, f"too many concurrent streams for this API key (limit {self.limit})",
                               code="too_many_streams", retry_after_s=1.0)
        self.active[key_id] = n + 1

    def release(self, key_id: str) -> None:
        """Give a slot back."""
        n = self.active.get(key_id, 0) - 1
        if n <= 0:
            self.active.pop(key_id, None)
        else:
            self.active[key_id] = n
