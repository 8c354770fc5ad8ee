"""The access log: one line per request, written in batches to stdout.

Each line begins as the seed printed it, ``GET / => 200 OK``, then the backend, the duration,
the response body bytes and, once routes are configured, ``route=MATCH`` (or
``route=no route``).  Nothing is formatted when the log is off.
"""

from __future__ import annotations

import asyncio
import os
import sys

from redlb.address import Backend

FLUSH_DELAY = 0.05
FLUSH_LINES = 256


class AccessLog:
    def __init__(self, enabled: bool, fd: int | None = None) -> None:
        self.enabled = enabled
        self.fd = sys.stdout.fileno() if fd is None else fd
        self.lines: list[bytes] = []
        self.flush_scheduled = False

    def request(
        self,
        method: bytes,
        target: bytes,
        status: int,
        reason: bytes,
        backend: Backend | None,
        seconds: float,
        body_bytes: int,
        route: bytes = b"",  # b"" while no routes are configured: the line stays as it was
    ) -> None:
        self.lines.append(
            b"%b %b => %d %b  %b %.1fms %dB%b\n"
            % (
                method,
                target,
                status,
                reason,
                backend.label if backend is not None else b"-",
                seconds * 1000,
                body_bytes,
                b" route=" + route if route else b"",
            )
        )
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif not self.flush_scheduled:
            self._schedule()

    def refused(self, status: int, target: bytes) -> None:
        if self.enabled:
            shown = target[:80] if target.isascii() else b"(invalid)"
            self.lines.append(b"- %b => %d refused by redlb\n" % (shown or b"-", status))
            self._schedule()

    def _schedule(self) -> None:
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.lines:
            return
        data = b"".join(self.lines)
        self.lines = []
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except BlockingIOError:
            pass  # a stalled log reader must not stall the proxy
        except OSError:
            self.enabled = False
