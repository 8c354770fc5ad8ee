"""The status listener (loopback only): /-/live, /-/ready and /metrics for Prometheus.

It shares the data plane's parser (httptools) and refuses anything but a plain GET.
/metrics is the whole instance, summed over its workers (metrics/snapshot.py), whichever
worker answers; the per-route gauges (the same in every worker) come from this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from redlb.fleet.publisher import Publisher
from redlb.metrics import exposition, snapshot
from redlb.metrics.exposition import label_value
from redlb.proxy.context import ProxyContext
from redlb.proxy.poolstate import PoolState

# A scrape refreshes this worker's snapshot unless it is younger than this (back-to-back
# scrapes of a big routing table would otherwise rebuild it each time).
SCRAPE_FRESHNESS = 0.25
# A scraper sends its request at once: a connection idle (or mid-request) this long is closed.
STATUS_IDLE_TIMEOUT = 5.0
# Answers a client has left unread: a scraper reads each one; a client that pipelines
# requests and never reads would otherwise make the worker hold every /metrics it asked for.
STATUS_MAX_UNSENT = 1 << 20


class RouteMetrics:
    """Once routes are configured: each route with its pool's size and health, written as
    Prometheus text directly (each pool's requests, summed over the workers, are in
    metrics/exposition.py).  Ten thousand routes through
    prometheus_client's objects held the event loop ~200 ms a scrape; the label part of every
    line is made once per routing table here, and a scrape only writes the numbers."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.table: object = None
        self.lines: list[tuple[bytes, PoolState]] = []

    def render(self) -> bytes:
        table = self.ctx.table
        if table.single is not None:
            return b""
        if table is not self.table:
            self.table = table
            self.lines = [
                (
                    b'{pool="%b",route="%b"} ' % (label_value(r.target.name), label_value(r.label)),
                    r.target,
                )
                for r in table.routes
            ]
        members = [b"redlb_route_members%b%d.0\n" % (k, len(s.pool.members)) for k, s in self.lines]
        healthy = [b"redlb_route_healthy%b%d.0\n" % (k, len(s.pool.healthy)) for k, s in self.lines]
        return b"".join(
            [
                b"# HELP redlb_route_members Valid entries of the route's pool\n"
                b"# TYPE redlb_route_members gauge\n",
                *members,
                b"# HELP redlb_route_healthy Backends of the route's pool taking traffic\n"
                b"# TYPE redlb_route_healthy gauge\n",
                *healthy,
            ]
        )


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
        # abort, not close: close waits for the unread answers to be flushed, maybe forever.
        if self.transport is not None:
            self.transport.abort()

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
        if (
            self.transport is not None
            and self.transport.get_write_buffer_size() > STATUS_MAX_UNSENT
        ):
            self.transport.abort()
            self.transport = None
            raise ValueError("answers left unread")  # stops parsing the rest of this read
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

    per_route = RouteMetrics(ctx)

    def metrics() -> tuple[int, bytes, bytes]:
        publisher.write_snapshot(SCRAPE_FRESHNESS)  # never older than the others' share
        view = snapshot.read_all(inst.metrics_dir)
        body = exposition.render(view, info) + per_route.render()
        return 200, b"text/plain; version=0.0.4", body

    return {b"/-/live": live, b"/-/ready": ready, b"/metrics": metrics}
