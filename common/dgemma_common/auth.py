"""API keys: read from a file (so a Kubernetes Secret can supply them), compared in constant time.

One checker for every port that serves inference: the gateway's HTTP API reads the key from HTTP headers,
the gRPC fronts from call metadata (`guard.RequestGuard`); both accept `Authorization: Bearer KEY` (the
scheme is case-insensitive, RFC 7235) and `x-api-key: KEY`.

One rule for every key file and key Secret value, whoever reads it (`parse_key_lines`): one key per line;
whitespace around a key (the newline `echo` leaves, a CR) is not part of it; blank lines and lines starting with
`#` are skipped. A server accepts every key listed; a client presents the first (`first_key`). Files are read
again when they change (`KeyFile`): the kubelet updates a mounted Secret by swapping a symlink.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

ANONYMOUS = "-"
MISSING = "missing"
INVALID = "invalid"
# A key longer than this is not one of ours; hashing it anyway would let a client make us hash megabytes.
MAX_KEY_CHARS = 4096


class AuthError(Exception):
    """The caller gave no key, or a wrong one; `reason` is MISSING or INVALID (a metrics label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# Options that may follow a key on its line, separated by whitespace.
NO_OVERFLOW = "no-overflow"  # this key's requests never go to an external API (docs/runtimes.md)
KEY_OPTIONS = frozenset({NO_OVERFLOW})


def parse_keys(text: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    return [key for key, _ in parse_key_lines(text)]


def parse_key_lines(text: str) -> list[tuple[str, frozenset[str]]]:
    """Each key with its options (`KEY no-overflow`); a line whose trailing words are not all options is one
    key, as it was before options existed."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *words = line.split()
        out.append((key, frozenset(words)) if words and set(words) <= KEY_OPTIONS else (line, frozenset()))
    return out


def first_key(text: str) -> str | None:
    """The key a client presents from a key file or Secret value: its first key (None when it holds none)."""
    return next(iter(parse_keys(text)), None)


# A key file larger than this is not a key file; reading it all would cost memory out of proportion.
MAX_KEY_FILE_BYTES = 1 << 20


def read_key_text(path: Path) -> str:
    """A key file's text (bounded); OSError when it cannot be read, ValueError when it is too large."""
    with open(path, "rb") as f:
        raw = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    return raw.decode("utf-8", "replace")


class KeyFile:
    """A key file read again when it changes: its inode, size or modification time (os.stat follows the kubelet's
    `..data` symlink, so a swapped Secret volume is a new inode even within one clock tick)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self.lines: list[tuple[str, frozenset[str]]] = []

    def refresh(self) -> bool:
        """Read the file if it changed; True when its keys were read again. OSError/ValueError when unreadable
        (the last keys stay)."""
        s = os.stat(self.path)
        signature = (s.st_ino, s.st_size, s.st_mtime_ns)
        if signature == self._signature:
            return False
        self.lines = parse_key_lines(read_key_text(self.path))
        self._signature = signature
        return True

    @property
    def first(self) -> str | None:
        """The key a client presents."""
        return self.lines[0][0] if self.lines else None


def key_from_headers(get: Callable[[str], str | None]) -> str | None:
    """The key a request presents: `authorization: Bearer KEY` (any case of the scheme), else `x-api-key`."""
    authorization = get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    api_key = get("x-api-key")
    if api_key is not None and api_key.strip():
        return api_key.strip()
    return None


def metadata_getter(metadata: Iterable[tuple[str, str | bytes]] | None) -> Callable[[str], str | None]:
    """A header lookup over gRPC call metadata (keys are lower-case on the wire)."""
    values: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            values.setdefault(key.lower(), value)
    return values.get


class ApiKeys:
    """The keys of a file, re-read when the file changes (Secrets are updated in place)."""

    def __init__(self, path: Path | None, recheck_s: float = 5.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._digests: list[bytes] = []
        self._no_overflow: frozenset[str] = frozenset()  # ids of the keys with `no-overflow`
        self._file = None if path is None else KeyFile(path)
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
        assert self._file is not None
        try:
            if not self._file.refresh():
                return
        except (OSError, ValueError) as exc:
            log.error("cannot read API key file %s: %s", self.path, exc)
            return
        # Digests of equal length make compare_digest's time independent of the key's length.
        lines = self._file.lines
        self._digests = [hashlib.sha256(k.encode()).digest() for k, _ in lines]
        self._no_overflow = frozenset(_key_id(d) for d, (_, options) in zip(self._digests, lines, strict=True)
                                      if NO_OVERFLOW in options)

    def allows_overflow(self, key_id: str) -> bool:
        """Whether this key's requests may go to an external API (not when its line says `no-overflow`)."""
        return key_id not in self._no_overflow

    def check(self, get: Callable[[str], str | None]) -> str:
        """The caller's key id from its headers or metadata; AuthError when keys are on and none matches.

        A missing, a wrong and a right key cost the same work (one digest, a comparison with every key),
        so the time taken says nothing about the keys.
        """
        if self.path is None:
            return ANONYMOUS
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            self._load()
        key = key_from_headers(get)
        given = hashlib.sha256((key or "")[:MAX_KEY_CHARS].encode("utf-8", "replace")).digest()
        matched = False
        for digest in self._digests:  # all of them, so the time does not tell which key matched
            matched |= hmac.compare_digest(given, digest)
        if key is None:
            raise AuthError(MISSING, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        if not matched or len(key) > MAX_KEY_CHARS:
            raise AuthError(INVALID, "invalid API key")
        return _key_id(given)


def _key_id(digest: bytes) -> str:
    return digest.hex()[:16]  # an id for per-key limits that never holds the key itself
