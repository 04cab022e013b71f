"""Compressed request bodies (Content-Encoding), decompressed no further than the body limit.

A few hundred kilobytes of gzip can expand to gigabytes. aiohttp's own decompression fed the whole expansion
into the request's buffer before the size limit was checked (a 0.5 MB gzip body of 500 MB raised the gateway's
memory by 1 GB before the 413) and answered a corrupt stream with a 500. So the server takes bodies as sent
(`auto_decompress=False`) and `decode_body` decompresses gzip and deflate itself, stopping one byte past the
limit; other encodings are refused (415) before any work is spent on them.
"""

from __future__ import annotations

import zlib

from dgemma_common.logsafe import clip
from dgemma_gateway.errors import GatewayError

FIELD = "Content-Encoding"
IDENTITY = ("", "identity")
GZIP = ("gzip", "x-gzip")
DEFLATE = "deflate"


def body_too_large(limit: int) -> GatewayError:
    """The refusal of a body over --max-body-bytes (as sent, or once decompressed)."""
    return GatewayError(413, f"the body exceeds {limit} bytes", code="body_too_large")


def check_encoding(header: str | None) -> str:
    """The body's encoding, normalized: "" (none), "gzip" or "deflate"; anything else is refused before the
    body is read."""
    name = (header or "").strip().lower()
    if name in IDENTITY:
        return ""
    if name in GZIP:
        return "gzip"
    if name == DEFLATE:
        return DEFLATE
    raise GatewayError(415, f"{FIELD} must be gzip, deflate or identity, got {clip(header or '', 64)!r}",
                       param=FIELD, code="unsupported_media_type")


def _wbits(encoding: str, first: int) -> int:
    """zlib's window bits for the encoding: a gzip wrapper, a zlib wrapper (RFC 1950, what HTTP's deflate
    means), or raw deflate (RFC 1951, which some clients send as deflate: its first byte is not 0x?8)."""
    if encoding == "gzip":
        return 16 + zlib.MAX_WBITS
    return zlib.MAX_WBITS if first & 0x0F == 8 else -zlib.MAX_WBITS


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body uncompressed, at most `limit` bytes of it: 413 past the limit, 400 for a stream that is not
    `encoding` or is cut short. CPU-bound (tens of milliseconds for 16 MiB): call it off the event loop."""
    if not encoding:
        return raw
    if not raw:
        raise GatewayError(400, f"the body is empty but says it is {encoding}", param=FIELD, code="invalid_body")
    parts: list[bytes] = []
    size, data = 0, raw
    while data:  # gzip may hold several members, one after the other
        stream = zlib.decompressobj(_wbits(encoding, data[0]))
        try:
            part = stream.decompress(data, limit + 1 - size)  # never more than one byte past the limit
        except zlib.error as exc:
            raise GatewayError(400, f"the body is not valid {encoding} data: {exc}", param=FIELD,
                               code="invalid_body") from None
        size += len(part)
        if size > limit:
            raise body_too_large(limit)
        if not stream.eof:
            raise GatewayError(400, f"the body's {encoding} data ends before its end", param=FIELD,
                               code="invalid_body")
        parts.append(part)
        data = stream.unused_data
        if data and encoding != "gzip":
            raise GatewayError(400, f"the body has bytes after its {encoding} data", param=FIELD, code="invalid_body")
    return b"".join(parts)
