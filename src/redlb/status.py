"""The status listener (loopback only): /-/live, /-/ready and /metrics for Prometheus.

It shares the data plane's parser (httptools) and refuses anything but a plain GET.
/metrics is the whole instance, summed over its workers (metrics/snapshot.py), whichever
worker answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from redlb.fleet.publisher import Publisher
from redlb.metrics import exposition, snapshot
from redlb.proxy.context import ProxyContext

# A scraper sends its request at once: a connection idle (or mid-request) this long is closed.
STATUS_IDLE_TIMEOUT = 5.0


class StatusProtocol(asyncio.Protocol):
    def __init__(self, routes: dict[bytes, Callable[[], tuple[int, bytes, bytes]]]) -> None:
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(STATUS_IDLE_TIMEOUT, self._idle)

    def _idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, b"text/plain", b"bad request\n", close=True)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 1024:
            raise ValueError("target too long")

    def on_message_complete(self) -> None:
        path = self.url.partition(b"?")[0]
        self.url = b""
        route = self.routes.get(path)
        if self.parser.get_method() not in (b"GET", b"HEAD") or route is None:
            self._send(404, b"text/plain", b"not found\n", close=False)
            return
        status, content_type, body = route()
        head_only = self.parser.get_method() == b"HEAD"
        close = not self.parser.should_keep_alive()
        self._send(status, content_type, body, close=close, head_only=head_only)
        self._arm_timer()

    def _send(
        self, status: int, content_type: bytes, body: bytes, close: bool, head_only: bool = False
    ) -> None:
        if self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %b\r\nContent-Length: %d\r\n%b\r\n%b"
            % (
                status,
                b"OK" if status == 200 else b"Error",
                content_type,
                len(body),
                b"Connection: close\r\n" if close else b"",
                b"" if head_only else body,
            )
        )
        if close:
            self.transport.close()


def status_routes(
    ctx: ProxyContext, publisher: Publisher
) -> dict[bytes, Callable[[], tuple[int, bytes, bytes]]]:
    inst = publisher.instance
    info = {"id": inst.id, "host": inst.host, "version": inst.version}

    def live() -> tuple[int, bytes, bytes]:
        return 200, b"text/plain", b"live\n"

    def ready() -> tuple[int, bytes, bytes]:
        if ctx.draining:
            return 503, b"text/plain", b"draining\n"
        if not ctx.listening:
            return 503, b"text/plain", b"not ready: starting\n"
        if not ctx.known:
            return 503, b"text/plain", b"not ready: no pool read from Redis yet\n"
        return 200, b"text/plain", b"ready\n"

    def metrics() -> tuple[int, bytes, bytes]:
        publisher.write_snapshot()  # this worker's share is never older than the others'
        view = snapshot.read_all(inst.metrics_dir)
        return 200, b"text/plain; version=0.0.4", exposition.render(view, info)

    return {b"/-/live": live, b"/-/ready": ready, b"/metrics": metrics}
