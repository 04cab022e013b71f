"""Client strings on their way into logs: escaped and bounded.

A client chooses request ids, model names, paths, stop strings and error inputs. Written raw, a newline or
ESC in one forges log lines or rewrites a terminal, and a 100 kB id doubles the log volume. `clip` makes any
string safe to log: control, format (bidirectional overrides, zero-width) and line/paragraph separator
characters become visible escapes, and the text is cut to a bound with a note of how much was cut. Cutting
happens first, so the cost is bounded too. `SafeFormatter` applies the same escaping to whole log messages,
a second line of defence for a call site that forgot.
"""

from __future__ import annotations

import logging
import re
from typing import Any

# Cc (C0, DEL, C1), Cf (format: bidi overrides, zero-width, BOM), Zl, Zp, and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
                     "\ufff9-\ufffb\ud800-\udfff]")
DEFAULT_LIMIT = 256
MESSAGE_LIMIT = 16384


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clip(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as one printable line of at most about `limit` characters (escapes and a cut marker added)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = _UNSAFE.sub(_escape, text)
    return f"{text}...[{cut} more chars]" if cut > 0 else text


def brief(value: object, limit: int = 64) -> str:
    """A short, escaped picture of a client's value for an error message; never builds a huge repr first."""
    if isinstance(value, str | bytes):
        shown = repr(value[:limit]) + ("..." if len(value) > limit else "")
    elif isinstance(value, list | tuple | dict | set):
        shown = f"a {type(value).__name__} of {len(value)} items" if len(value) > 8 else repr(value)
    else:
        shown = repr(value)
    return clip(shown, limit * 2)


class SafeFormatter(logging.Formatter):
    """A logging.Formatter whose message part is escaped and bounded; tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clip(record.message, MESSAGE_LIMIT)
        return super().formatMessage(record)


def safe_fields(fields: dict[str, Any], limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Structured log fields with every string value clipped (numbers and booleans pass as they are)."""
    return {k: clip(v, limit) if isinstance(v, str) else v for k, v in fields.items()}


def install(level: int | None = None) -> None:
    """Give every handler of the root logger a SafeFormatter with its current format."""
    root = logging.getLogger()
    for handler in root.handlers:
        old = handler.formatter
        fmt = old._fmt if old is not None else None  # reuse the configured format
        datefmt = old.datefmt if old is not None else None
        if not isinstance(old, SafeFormatter):
            handler.setFormatter(SafeFormatter(fmt, datefmt))
    if level is not None:
        root.setLevel(level)
