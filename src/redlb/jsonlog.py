"""``--log-format json``: the access log and the event log as one JSON object a line.

The access log keeps its batching (accesslog.py); only the line changes (a LineFormat it is
given).  Field names follow the text line: method, target, status, reason, backend, ms,
bytes, route; a tunnel's line adds from_client and end.
"""

from __future__ import annotations

import json
import logging
import time

from redlb.accesslog import AccessLog, LineFormat, TunnelEnd
from redlb.address import Backend


def _text(value: bytes) -> str:
    return value.decode("latin-1")


class JsonLines:
    """The access log's lines as JSON objects (an accesslog.LineFormat)."""

    def request(
        self,
        method: bytes,
        target: bytes,
        status: int,
        reason: bytes,
        backend: Backend | None,
        seconds: float,
        body_bytes: int,
        route: bytes,
    ) -> bytes:
        record: dict[str, object] = {
            "time": round(time.time(), 3),
            "method": _text(method),
            "target": _text(target),
            "status": status,
            "reason": _text(reason),
            "backend": backend.key if backend is not None else None,
            "ms": round(seconds * 1000, 3),
            "bytes": body_bytes,
        }
        if route:
            record["route"] = _text(route)
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def tunnel(self, end: TunnelEnd) -> bytes:
        backend = end.backend
        record = {
            "time": round(time.time(), 3),
            "method": _text(end.method),
            "target": _text(end.target),
            "status": 101,
            "reason": _text(end.reason),
            "backend": backend.key if backend is not None else None,
            "ms": round(end.seconds * 1000, 3),
            "bytes": end.to_client,
            "from_client": end.from_client,
            "end": _text(end.why),
        }
        if end.route:
            record["route"] = _text(end.route)
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def refused(self, status: int, target: bytes) -> bytes:
        shown = _text(target[:80]) if target.isascii() else "(invalid)"
        record = {"time": round(time.time(), 3), "target": shown or "-", "status": status,
                  "refused": True}  # fmt: skip
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def access_log(enabled: bool, log_format: str) -> AccessLog:
    line_format: LineFormat | None = JsonLines() if log_format == "json" else None
    return AccessLog(enabled, line_format=line_format)


class JsonFormatter(logging.Formatter):
    """Event log records (stderr) as JSON: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
