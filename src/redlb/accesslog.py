"""The access log: one line per request, batched in the event loop, written by one thread.

Each line begins as the seed printed it, ``GET / => 200 OK``, then the backend, the duration,
the response body bytes and, once routes are configured, ``route=MATCH`` (or
``route=no route``).  A WebSocket tunnel has one line, at its end (``TunnelEnd``).  Nothing
is formatted when the log is off.

A log reader that stops reading (a full pipe, a stopped ``less``) blocks the writer thread,
never the event loop.  Stdout is left blocking: making an inherited descriptor non-blocking
would change it for every process sharing it.  At most ``MAX_PENDING`` bytes wait for the
thread; past that, batches are dropped and counted in ``dropped`` (lines) for the metrics.

The text line is formatted here (compiled with the data path: one native call a request);
another format (``--log-format json``, jsonlog.py) is a ``LineFormat`` it is given.
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
import sys
import threading
from collections import deque
from typing import Final, NamedTuple, Protocol

from redlb.address import Backend

FLUSH_DELAY: Final = 0.05
# Lines a batch: each batch wakes the writer thread, a few context switches and GIL hand-offs
# on the loop's core (256 a batch: ~900 switches a second at 55,000 requests a second).
FLUSH_LINES: Final = 1024
# Bytes handed to the writer thread and not yet written: seconds of log at a high request
# rate, on top of the pipe's own buffer; a reader stalled for longer loses lines, not time.
MAX_PENDING: Final = 256 * 1024
PIPE_BUF: Final = select.PIPE_BUF  # bytes a write to a pipe puts in it whole


class TunnelEnd(NamedTuple):
    """A WebSocket tunnel's line, written when it ends: the request that opened it, status
    101, the time since that request began, bytes relayed to the client (the usual ``B``
    field) and from it, and why it ended (``client-closed``, ``backend-reset``,
    ``idle-timeout``, ``drain``...)."""

    method: bytes
    target: bytes
    reason: bytes
    backend: Backend | None
    seconds: float
    to_client: int
    from_client: int
    route: bytes
    why: bytes


class LineFormat(Protocol):
    """A line format other than the text one (AccessLog.request's arguments, as bytes)."""

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
    ) -> bytes: ...

    def refused(self, status: int, target: bytes) -> bytes: ...

    def tunnel(self, end: TunnelEnd) -> bytes: ...


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class AccessLog:
    def __init__(
        self,
        enabled: bool,
        fd: int | None = None,
        max_pending: int = MAX_PENDING,
        line_format: LineFormat | None = None,  # None: the text line
    ) -> None:
        self.enabled = enabled
        self.line_format = line_format
        self.fd = sys.stdout.fileno() if fd is None else fd
        self.pipe = _is_pipe(self.fd)
        self.lines: list[bytes] = []
        self.flush_scheduled = False
        self.dropped = 0  # lines lost because the reader did not keep up
        self.max_pending = max_pending
        # Shared with the writer thread, under ``ready``.
        self.ready = threading.Condition()
        self.batches: deque[bytes] = deque()
        self.pending = 0
        self.closing = False
        self.writer: threading.Thread | None = None

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
        if self.line_format is not None:
            line = self.line_format.request(
                method, target, status, reason, backend, seconds, body_bytes, route
            )
        else:
            # Tenths of a millisecond, rounded, in integers: a float format costs more.
            tenths = int(seconds * 10000.0 + 0.5)
            line = b"%b %b => %d %b  %b %d.%dms %dB%b\n" % (
                method,
                target,
                status,
                reason,
                backend.label if backend is not None else b"-",
                tenths // 10,
                tenths % 10,
                body_bytes,
                b" route=" + route if route else b"",
            )
        self.lines.append(line)
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif not self.flush_scheduled:
            self._schedule()

    def refused(self, status: int, target: bytes) -> None:
        if self.enabled:
            if self.line_format is not None:
                self.lines.append(self.line_format.refused(status, target))
            else:
                shown = target[:80] if target.isascii() else b"(invalid)"
                self.lines.append(b"- %b => %d refused by redlb\n" % (shown or b"-", status))
            self._schedule()

    def tunnel(self, end: TunnelEnd) -> None:
        if self.line_format is not None:
            self.lines.append(self.line_format.tunnel(end))
            self._schedule()
            return
        self.lines.append(
            b"%b %b => 101 %b  %b %.1fms %dB%b from_client=%dB end=%b\n"
            % (
                end.method,
                end.target,
                end.reason,
                end.backend.label if end.backend is not None else b"-",
                end.seconds * 1000,
                end.to_client,
                b" route=" + end.route if end.route else b"",
                end.from_client,
                end.why,
            )
        )
        self._schedule()

    def _schedule(self) -> None:
        if len(self.lines) >= FLUSH_LINES:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        # One timer at a time: a batch flushed for its size leaves the timer running (a
        # new timer after each such flush doubled the batches under load).
        self.flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Hand the batch to the writer thread; never waits for the reader."""
        if not self.lines:
            return
        lines = self.lines
        self.lines = []
        if not self.enabled:
            return
        data = b"".join(lines)
        with self.ready:
            # A batch is taken whole while nothing waits, however big: FLUSH_LINES lines
            # of ~300 bytes (a long target, JSON) are more than max_pending on their own,
            # and were dropped though the reader kept up.  A stalled reader still loses
            # every batch after the one it holds.
            if self.pending and self.pending + len(data) > self.max_pending:
                self.dropped += len(lines)
                return
            self.batches.append(data)
            self.pending += len(data)
            self.ready.notify()
        if self.writer is None:
            self.writer = threading.Thread(target=self._write_batches, name="access-log")
            self.writer.daemon = True  # a reader that never reads must not hold up the exit
            self.writer.start()

    def close(self, timeout: float = 1.0) -> None:
        """Flush, then give the writer thread ``timeout`` seconds to finish."""
        self.flush()
        with self.ready:
            self.closing = True
            self.ready.notify()
        if self.writer is not None:
            self.writer.join(timeout)

    def _write_batches(self) -> None:
        while True:
            with self.ready:
                while not self.batches and not self.closing:
                    self.ready.wait()
                if not self.batches:
                    return
                data = self.batches.popleft()
            size = len(data)
            try:
                self._write_all(data)
            except OSError:
                self.enabled = False  # stdout closed for good (EPIPE, EBADF): stop logging
            with self.ready:
                self.pending -= size

    def _write_all(self, data: bytes) -> None:
        if not self.pipe or len(data) <= PIPE_BUF:
            self._write_part(memoryview(data))
            return
        # A pipe the workers share (a log shipper reading stdout): a write of more than
        # PIPE_BUF bytes is not atomic, and another worker's lines landed inside a line.
        # Whole lines of at most PIPE_BUF bytes a write are never cut.
        view = memoryview(data)
        start = 0
        while start < len(data):
            end = len(data)
            if end - start > PIPE_BUF:
                cut = data.rfind(b"\n", start, start + PIPE_BUF)
                end = cut + 1 if cut >= start else start + PIPE_BUF  # a line longer: cut
            self._write_part(view[start:end])
            start = end

    def _write_part(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:  # another process made the shared stdout non-blocking
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[written:]
