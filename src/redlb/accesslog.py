"""The access log: one line per request, written in batches to stdout.

Each line begins as the seed printed it, ``GET / => 200 OK``, then the backend, the duration
and the response body bytes.  Nothing is formatted when the log is off.
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
        self.lines: list[str] = []
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
    ) -> None:
        self.lines.append(
            f"{method.decode('latin-1')} {target.decode('latin-1')} => {status} "
            f"{reason.decode('latin-1')}  {backend or '-'} {seconds * 1000:.1f}ms {body_bytes}B\n"
        )
        self._schedule()

    def refused(self, status: int, target: bytes) -> None:
        if self.enabled:
            shown = target[:80].decode("latin-1") if target.isascii() else "(invalid)"
            self.lines.append(f"- {shown or '-'} => {status} refused by redlb\n")
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
        data = "".join(self.lines).encode("utf-8", "replace")
        self.lines = []
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except BlockingIOError:
            pass  # a stalled log reader must not stall the proxy
        except OSError:
            self.enabled = False
