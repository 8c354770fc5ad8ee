"""The status listener (loopback only): /-/live, /-/ready and /metrics for Prometheus.

It shares the data plane's parser (httptools) and refuses anything but a plain GET.
/metrics is the whole instance, summed over its workers (metrics/snapshot.py), whichever
worker answers; the per-route gauges (the same in every worker) come from this one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from itertools import chain

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
ROUTE_SLICE = 500  # per-route lines written between two turns of the loop

Answer = tuple[int, bytes, bytes]  # status, content type, body
Route = Callable[[], Answer | Awaitable[Answer]]

log = logging.getLogger("redlb.status")


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
        return b"".join(self.render_in_steps())

    def render_in_steps(self) -> Iterator[bytes]:
        """The text ``ROUTE_SLICE`` routes a part (the caller lets the loop run between
        parts: ten thousand routes written in one go held it for 10-20 ms a scrape)."""
        table = self.ctx.table
        if table.single is not None:
            return
        if table is not self.table:
            lines: list[tuple[bytes, PoolState]] = []
            routes = table.routes
            for start in range(0, len(routes), ROUTE_SLICE):
                lines += [
                    (
                        b'{pool="%b",route="%b"} '
                        % (label_value(r.target.name), label_value(r.label)),
                        r.target,
                    )
                    for r in routes[start : start + ROUTE_SLICE]
                ]
                yield b""
            self.table, self.lines = table, lines
        yield from self._gauge(b"members", b"Valid entries of the route's pool", False)
        yield from self._gauge(b"healthy", b"Backends of the route's pool taking traffic", True)

    def _gauge(self, name: bytes, help_text: bytes, healthy: bool) -> Iterator[bytes]:
        """One per-route gauge of the pool's size: its members, or its healthy backends."""
        lines = self.lines
        yield b"# HELP redlb_route_%b %b\n# TYPE redlb_route_%b gauge\n" % (name, help_text, name)
        for start in range(0, len(lines), ROUTE_SLICE):
            yield b"".join(
                b"redlb_route_%b%b%d.0\n"
                % (name, k, len(s.pool.healthy if healthy else s.pool.members))
                for k, s in lines[start : start + ROUTE_SLICE]
            )


class StatusProtocol(asyncio.Protocol):
    """A route answers at once (a tuple) or over several turns of the loop (an awaitable:
    /metrics of a big table).  Answers go out in the order asked; while one is built,
    nothing more is read, and the requests already read wait their turn."""

    def __init__(self, routes: dict[bytes, Route]) -> None:
        self.routes = routes
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.timer: asyncio.TimerHandle | None = None
        self.building: asyncio.Task[None] | None = None
        self.waiting: deque[tuple[bytes, bytes, bool] | None] = deque()  # None: a bad request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None
        self.waiting.clear()

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
            if self.building is not None:
                self.waiting.append(None)  # answered after what was asked before it
            else:
                self._send(400, b"text/plain", b"bad request\n", close=True)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > 1024:
            raise ValueError("target too long")

    def on_message_complete(self) -> None:
        path = self.url.partition(b"?")[0]
        self.url = b""
        request = (path, self.parser.get_method(), not self.parser.should_keep_alive())
        if self.building is not None:
            self.waiting.append(request)
            return
        self._answer(request)
        if self.transport is None:
            raise ValueError("answers left unread")  # stops parsing the rest of this read

    def _answer(self, request: tuple[bytes, bytes, bool] | None) -> None:
        if request is None:
            self._answered((400, b"text/plain", b"bad request\n"), False, True)
            return
        path, method, close = request
        route = self.routes.get(path)
        if method not in (b"GET", b"HEAD") or route is None:
            self._answered((404, b"text/plain", b"not found\n"), False, close)
            return
        answer = route()
        if isinstance(answer, tuple):
            self._answered(answer, method == b"HEAD", close)
            return
        if self.transport is not None:
            self.transport.pause_reading()
        if self.timer is not None:  # asked in time: not idle while its answer is built
            self.timer.cancel()
            self.timer = None
        self.building = asyncio.get_running_loop().create_task(
            self._build(answer, method == b"HEAD", close)
        )

    async def _build(self, answer: Awaitable[Answer], head_only: bool, close: bool) -> None:
        try:
            result = await answer
        except Exception:
            log.exception("cannot answer a status request")
            result = (500, b"text/plain", b"internal error\n")
            close = True
        self.building = None
        self._answered(result, head_only, close)
        while self.waiting and self.building is None and self.transport is not None:
            self._answer(self.waiting.popleft())
        transport = self.transport
        if self.building is None and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _answered(self, answer: Answer, head_only: bool, close: bool) -> None:
        if self.transport is None:
            return  # the client left while its answer was built
        status, content_type, body = answer
        self._send(status, content_type, body, close=close, head_only=head_only)
        if close:
            self.waiting.clear()  # asked after a request that closes: never answered
        if (
            self.transport is not None
            and self.transport.get_write_buffer_size() > STATUS_MAX_UNSENT
        ):
            self.transport.abort()
            self.transport = None
            self.waiting.clear()
            return
        self._arm_timer()

    def _send(
        self, status: int, content_type: bytes, body: bytes, close: bool, head_only: bool = False
    ) -> None:
        if self.transport is None:
            return
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %b\r\nContent-Length: %d\r\n%b\r\n" % (
            status,
            b"OK" if status == 200 else b"Error",
            content_type,
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        if head_only or len(body) < 65536:
            self.transport.write(head if head_only else head + body)
        else:  # a big /metrics: not copied once more behind its head
            self.transport.write(head)
            self.transport.write(body)
        if close:
            self.transport.close()


def status_routes(ctx: ProxyContext, publisher: Publisher) -> dict[bytes, Route]:
    inst = publisher.instance
    info = {"id": inst.id, "host": inst.host, "version": inst.version}

    def live() -> Answer:
        return 200, b"text/plain", b"live\n"

    def ready() -> Answer:
        if ctx.draining:
            return 503, b"text/plain", b"draining\n"
        if not ctx.listening:
            return 503, b"text/plain", b"not ready: starting\n"
        if not ctx.known:
            return 503, b"text/plain", b"not ready: no pool read from Redis yet\n"
        return 200, b"text/plain", b"ready\n"

    per_route = RouteMetrics(ctx)

    async def metrics() -> Answer:
        # Never older than the others' share; built a part at a time, the loop free between.
        await publisher.write_snapshot_in_steps(SCRAPE_FRESHNESS)
        await asyncio.sleep(0)
        view = snapshot.read_all(inst.metrics_dir)
        await asyncio.sleep(0)
        parts: list[bytes] = []
        for part in chain(exposition.render_in_steps(view, info), per_route.render_in_steps()):
            parts.append(part)
            await asyncio.sleep(0)
        return 200, b"text/plain; version=0.0.4", b"".join(parts)

    return {b"/-/live": live, b"/-/ready": ready, b"/metrics": metrics}
