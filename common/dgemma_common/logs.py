"""Logging for every component: plain text for people, one JSON object per line for log pipelines.

Structured fields travel in `extra={"fields": {...}}`; the JSON formatter merges them into the object,
the text formatter appends them as key=value. Both escape control characters and bound every string
(`dgemma_common.logsafe`): request ids, error messages and prompts come from clients, and a newline or
ESC in one must not forge a log line. Each record of a request carries its `request_id`
(dgemma_common.tracing.RequestIdFilter).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dgemma_common.logsafe import MESSAGE_LIMIT, SafeFormatter, clip, safe_fields
from dgemma_common.tracing import RequestIdFilter

# Prompts and replies (with --log-prompts) are the longest fields; anything longer is cut with a note.
FIELD_LIMIT = 65536


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage(), MESSAGE_LIMIT),
        }
        out.update(safe_fields(getattr(record, "fields", None) or {}, FIELD_LIMIT))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(SafeFormatter):
    """The usual text line, escaped, with the record's fields appended as key=value (values escaped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={clip(v, FIELD_LIMIT)}" for k, v in fields.items() if k != "event")
        return line


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send the root logger to stderr in the given format (json or text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
