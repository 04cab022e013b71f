"""API keys: read from a file (so a Kubernetes Secret can supply them), compared in constant time,
with a limit on concurrent streams per key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from dgemma_gateway.errors import GatewayError

log = logging.getLogger(__name__)

ANONYMOUS = "-"


def parse_keys(text: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class ApiKeys:
    """The keys of a file, re-read when the file changes (Secrets are updated in place)."""

    def __init__(self, path: Path | None, recheck_s: float = 5.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._digests: list[bytes] = []
        self._mtime: float | None = None
        self._checked = 0.0
        if path is not None:
            self._load()
            if not self._digests:
                log.warning("API key file %s holds no key: every request will be refused", path)

    @property
    def enabled(self) -> bool:
        """Keys are configured."""
        return self.path is not None

    def _load(self) -> None:
        assert self.path is not None
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            log.error("cannot read API key file %s: %s", self.path, exc)
            return
        if stat.st_mtime == self._mtime:
            return
        self._mtime = stat.st_mtime
        # Digests of equal length make compare_digest's time independent of the key's length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in parse_keys(self.path.read_text())]

    def check(self, authorization: str | None) -> str:
        """The caller's key id from an `Authorization: Bearer KEY` header; 401 when keys are on and it fails."""
        if self.path is None:
            return ANONYMOUS
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            self._load()
        if not authorization or not authorization.startswith("Bearer "):
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        given = hashlib.sha256(authorization[len("Bearer "):].strip().encode()).digest()
        matched = False
        for digest in self._digests:  # all of them, so the time does not tell which key matched
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise GatewayError(401, "invalid API key", code="invalid_api_key")
        return given.hex()[:16]  # an id for per-key limits that never holds the key itself


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
