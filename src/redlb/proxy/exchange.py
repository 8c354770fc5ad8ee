"""One request, top to bottom: pick a backend, get a connection, stream both ways, release.

When it may be retried is retry.py's answer; what is resent is replay.py's whole copy.

Body rules:
1. ``pending`` holds what the current attempt still owes its backend and is never dropped
   (bounded by pausing the client).  A retry of a sent request starts it again from the
   replay copy, so the new backend gets every byte once, or the request is not retried.
2. The backend's deadline runs only while the backend owes progress: from the end of the
   request (or while it stops taking the body) to the end of the response.  An upload
   is the client's pace (its body rate rule), a full client socket its send deadline.
3. A client whose socket is full pauses every backend connection the exchange attaches,
   not only the one attached when the socket filled up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from redlb import backend_tls
from redlb.address import Backend
from redlb.descriptors import is_own_shortage
from redlb.proxy import errors
from redlb.proxy.replay import ReplayBuffer
from redlb.proxy.retry import may_retry
from redlb.proxy.rules import UPGRADE_WEBSOCKET, completes_websocket, drop_connection_named
from redlb.proxy.upstream import BackendConnections, UpstreamConnection

if TYPE_CHECKING:
    from redlb.balancer.load import LoadView
    from redlb.proxy.context import ProxyContext
    from redlb.proxy.downstream import ClientConnection
    from redlb.proxy.poolstate import PoolState
    from redlb.routing import Route

# Past this many buffered body bytes (no upstream yet), stop reading from the client.
BUFFER_LIMIT: Final = 256 * 1024
NO_BODY_STATUSES: Final = frozenset({204, 304})
# A backend answering these is overloaded or broken; an idempotent request goes elsewhere.
RETRY_STATUSES: Final = frozenset({502, 503, 504})
_log = logging.getLogger("redlb.proxy")
_last_shortage_report = 0.0


def _report_out_of_descriptors(exc: OSError) -> None:
    """One line a minute at most: a crowd hitting the limit must not flood the log too."""
    global _last_shortage_report
    now = time.monotonic()
    if now - _last_shortage_report >= 60.0:
        _last_shortage_report = now
        _log.warning("cannot dial backends: %s (raise the descriptor limit, ulimit -n)", exc)


@dataclass(slots=True)
class RequestHead:
    """A parsed, validated request, ready to forward."""

    method: bytes
    target: bytes  # as the access log shows it
    head: bytes  # serialised request line + headers, CRLF CRLF included
    chunked: bool
    keep_alive: bool
    http10: bool
    idempotent: bool
    expect_continue: bool
    route: Route[PoolState] | None = None  # None: routes are configured and none matched
    max_body: int = 0  # the route's pool's limit (0 = unlimited)
    key: bytes = b""  # what a hashing pool hashes (balancer/requestkey.py)
    sticky: bytes = b""  # the pool's sticky-session cookie, as sent
    upgrade: bytes | None = None  # a WebSocket handshake: the Sec-WebSocket-Accept it needs


class Exchange:
    __slots__ = (
        "attempts",
        "backend",
        "body_bytes",
        "bytes_out",
        "client",
        "connect_task",
        "cookie",
        "counted",
        "ctx",
        "done",
        "first_byte",
        "keep_client",
        "pending",
        "pending_bytes",
        "queued_since",
        "reason",
        "rechunk",
        "replay",
        "replayed",
        "req",
        "request_done",
        "response_started",
        "retrying",
        "slot",
        "started",
        "status",
        "tried",
        "up",
        "upstream",
        "upstream_keep_alive",
    )

    def __init__(self, client: ClientConnection, req: RequestHead) -> None:
        self.ctx: ProxyContext = client.ctx
        self.client = client
        self.req = req
        route = req.route
        if route is not None:
            self.up: PoolState = route.target  # the pool this request goes to
        # Request side
        self.pending: list[bytes] = []  # framed body bytes not yet written upstream
        self.pending_bytes = 0
        # Idempotent requests only (nothing else is ever resent), made by the first body byte.
        self.replay: ReplayBuffer | None = None
        self.request_done = False
        self.body_bytes = 0  # for the metrics
        # Upstream side
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.slot: BackendConnections | None = None  # holds one of the backend's connections
        self.queued_since = 0.0  # waiting for a connection to this backend since
        self.tried: list[Backend] = []
        self.counted: LoadView | None = None  # the in-flight count this attempt is part of
        self.cookie: bytes | None = None  # a sticky-session Set-Cookie line to add
        self.attempts = 0
        self.replayed = False
        self.retrying = False
        # Response side
        self.response_started = False
        self.status = 0
        self.reason = b""
        self.rechunk = False
        self.keep_client = req.keep_alive
        self.upstream_keep_alive = False
        self.bytes_out = 0
        self.first_byte = 0.0
        self.started = 0.0
        self.done = False

    # Driven by the client connection

    def start(self) -> None:
        """This exchange is now at the head of its connection's queue."""
        self.started = time.monotonic()
        ctx = self.ctx
        ctx.active_exchanges += 1
        ctx.stats.requests += 1
        if self.req.route is None:
            # Else request_complete answers, keeping the connection; but a client waiting
            # for 100 Continue sends no body until it hears: the 404 now (RFC 9110 §10.1.1).
            if self.request_done or self.req.expect_continue:
                self._respond_error(errors.NO_ROUTE)
            return
        up = self.up
        up.budget.active_requests += 1
        up.requests += 1
        if self.req.expect_continue and not self.request_done:
            self.client.write(errors.CONTINUE_100)
        sticky = up.sticky
        value = self.req.sticky
        stuck = sticky.find(value, up.pool.healthy) if sticky is not None and value else None
        if stuck is not None or up.strategy.immediate:
            self._attempt(stuck)
        else:
            self.connect_task = ctx.loop.create_task(self._pick_then_attempt())

    def request_body(self, data: bytes) -> None:
        if self.req.route is None:
            return  # no route: the body is read and dropped, then 404
        self.body_bytes += len(data)
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self.req.chunked else data
        self._send_body(framed)

    def request_complete(self) -> None:
        self.request_done = True
        if self.req.route is None and self.started:
            self._respond_error(errors.NO_ROUTE)
            return
        if self.req.chunked:
            self._send_body(b"0\r\n\r\n")
        upstream = self.upstream
        if upstream is not None and not self.client.send_deadline:
            # Body rule 2: the backend has the whole request; the answer is its time now.
            upstream.deadline = time.monotonic() + self.up.config.upstream_timeout

    def abort(self) -> None:
        """The client went away: stop everything, keep no upstream connection half-used."""
        if self.done:
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.upstream is not None:
            self.upstream.detach()
            self.upstream = None
        self._finish(log=self.response_started)

    def check_timeout(self, now: float) -> None:
        if self.queued_since and now - self.queued_since > self.up.config.queue_timeout:
            self._respond_error(errors.BACKEND_BUSY)  # _finish leaves the line
            return
        upstream = self.upstream
        if upstream is not None and upstream.deadline and now > upstream.deadline:
            upstream.deadline = 0.0
            self.upstream = None
            upstream.detach()
            self.up.ejector.failure(upstream.owner.backend)
            if self.response_started:
                self.client.abort()
            else:
                self._retry_or_fail(errors.GATEWAY_TIMEOUT, sent=True, elsewhere=True)

    def client_congested(self, congested: bool) -> None:
        """The client's socket buffer is full (or drained): pause (resume) the backend."""
        upstream = self.upstream
        if upstream is None:
            return  # _attach looks at the client's state (body rule 3)
        if congested:
            upstream.pause_reading()
            upstream.deadline = 0.0  # a slow reader is not a slow backend
        else:
            upstream.resume_reading()
            if self.request_done or self.response_started:
                upstream.deadline = time.monotonic() + self.up.config.upstream_timeout

    # Picking and connecting (with _can_retry and _no_backend, the only users of the pool
    # and the strategy: those of self.up, the pool the routing table chose for the request)

    async def _pick_then_attempt(self) -> None:
        candidates = self.up.pool.healthy
        if not candidates:
            self._no_backend()
            return
        backend = await self.up.strategy.pick_async(candidates, self.req.key)
        self.connect_task = None
        if not self.done:
            self._attempt(backend)

    def _attempt(self, backend: Backend | None = None) -> None:
        if backend is None:
            candidates = self.up.pool.healthy
            if not candidates:
                self._no_backend()
                return
            backend = self.up.strategy.pick(candidates, self.req.key)
            if self.tried and backend in self.tried:
                backend = _another(candidates, self.tried, backend)
        up = self.up
        # The first attempt starts with the exchange (start() read the clock just now).
        now = time.monotonic() if self.attempts else self.started
        if self.counted is not None:  # a retry: the failed attempt is no longer in flight
            self.counted.finished(self.tried[-1], now - self.started, now)
            self.counted = None
        if up.strategy.counts:
            self.counted = up.load
            up.load.started(backend, now)
        sticky = up.sticky
        if sticky is not None:
            # Kept (no Set-Cookie) when its cookie names this backend: found in the snapshot
            # it was picked from, so the same object (after a refresh, one more Set-Cookie).
            value = self.req.sticky
            named = sticky.find(value, up.pool.healthy) if value else None
            self.cookie = None if named is backend else sticky.set_cookie(backend)
        self.attempts += 1
        self.backend = backend
        self.tried.append(backend)
        if self.slot is not None:
            self._release_slot()  # a retry gives back the slot of the failed attempt first
        host = self.req.route.host_header  # type: ignore[union-attr]  # start() checked it
        self.acquire(up.connections_to(backend, host))

    def acquire(self, conns: BackendConnections) -> None:
        """Take a connection to this backend: a pooled one, a new one, or a place in line.

        Backends have a connection cap (HAProxy's maxconn, Envoy's circuit breaker): past
        it, requests wait in a bounded line for a connection to come back, up to the queue
        timeout, then get a 503 — never an unbounded queue or a flood of connects.
        """
        self.queued_since = 0.0
        conn = conns.take_idle(self.req.idempotent)
        if conn is not None:
            conns.busy += 1
            self.slot = conns
            self.ctx.stats.upstream_reuses += 1
            self._attach(conn)
            return
        if conns.full():
            if len(conns.waiters) >= self.up.config.max_queue_per_backend:
                self._respond_error(errors.BACKEND_BUSY)
                return
            conns.waiters.append(self)
            self.queued_since = time.monotonic()
            return
        conns.busy += 1
        self.slot = conns
        self.connect_task = self.ctx.loop.create_task(self._connect(conns))

    def _leave_queue(self) -> None:
        self.queued_since = 0.0
        if self.backend is not None:
            route = self.req.route
            host = route.host_header if route is not None else None
            waiters = self.up.connections_to(self.backend, host).waiters
            if self in waiters:
                waiters.remove(self)

    def _release_slot(self) -> None:
        conns = self.slot
        if conns is not None:
            self.slot = None
            conns.release()

    async def _connect(self, conns: BackendConnections) -> None:
        ctx = self.ctx
        backend = conns.backend
        began = time.monotonic()
        tls = conns.tls
        if tls is None:
            connecting = ctx.loop.create_connection(
                lambda: UpstreamConnection(conns), backend.host, backend.port
            )
        elif conns.refused_until > began:  # backend_tls.py rule 5: not dialled again yet
            self.connect_task = None
            if not self.done:
                self._retry_or_fail(conns.refusal, sent=False)
            return
        else:  # the handshake is part of connecting: the connect timeout bounds both
            connecting = ctx.loop.create_connection(
                lambda: UpstreamConnection(conns),
                backend.host,
                backend.port,
                ssl=tls,
                server_hostname=conns.server_name,
            )
        ctx.stats.upstream_connects += 1
        try:
            _, conn = await asyncio.wait_for(connecting, self.up.config.connect_timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            self.connect_task = None
            if self.done:
                return
            if isinstance(exc, OSError) and is_own_shortage(exc):
                # redlb's own shortage (a crowd of clients or tunnels): the backend is not
                # at fault, so it is not counted against it (ejecting it would spread
                # this worker's shortage fleet-wide through Redis).
                reason = errors.OUT_OF_DESCRIPTORS
                _report_out_of_descriptors(exc)
            elif isinstance(exc, TimeoutError):
                reason = errors.CONNECT_TIMEOUT
                self.up.ejector.failure(backend)
            elif tls is None or isinstance(exc, ConnectionRefusedError):
                reason = errors.BAD_GATEWAY_REFUSED
                self.up.ejector.failure(backend)
            else:
                reason = self._tls_failed(conns, exc)
            self._retry_or_fail(reason, sent=False)
            return
        self.connect_task = None
        rec = ctx.recorder
        rec.upstream(rec.connect, (self.up.name, backend.key), time.monotonic() - began)
        if self.done:
            conn.close()
            return
        self._attach(conn)

    def _tls_failed(self, conns: BackendConnections, exc: Exception) -> tuple[int, str]:
        """A failed handshake, logged once (not per request).  A refused certificate ejects
        the backend at once and holds it off (backend_tls.py rule 5): no retry of the same
        handshake can succeed.  A server name TLS cannot send, or a route's Host override
        the certificate does not name, is the route's fault, not the backend's (other
        routes reach it by other names): held off too, but not counted against the backend."""
        self.ctx.stats.upstream_tls_failures += 1  # every one, where the log says one a minute
        backend = conns.backend
        name = conns.server_name
        reason = backend_tls.describe(exc, name)
        where = f" (as {name})" if name != backend.host else ""
        backend_tls.failures.report(backend, reason, where)
        if isinstance(exc, UnicodeError):
            conns.refusal = errors.BAD_GATEWAY_TLS
        elif backend_tls.is_certificate_refused(exc):
            conns.refusal = errors.BAD_GATEWAY_TLS_CERT
            if name == backend.host or not backend_tls.is_name_refused(exc):
                self.up.ejector.failed_for_good(backend)
        else:
            self.up.ejector.failure(backend)
            return errors.BAD_GATEWAY_TLS
        conns.refused_until = time.monotonic() + backend_tls.REFUSAL_HOLD
        return conns.refusal

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        client = self.client
        head = self.req.head
        pending = self.pending
        if pending:
            head = b"".join([head, *pending])
            self.pending = []
            self.pending_bytes = 0
        conn.start(self, head, self.req.method == b"HEAD")
        if client.send_deadline:
            conn.pause_reading()  # body rule 3: the client is not taking what we have
        elif self.request_done:
            conn.deadline = time.monotonic() + self.up.config.upstream_timeout
        if client.paused:
            client.unpause_for_buffer()
            client.pause_for_upload(False)  # a congested connection of a failed attempt

    # The request body (body rule 1)

    def _send_body(self, framed: bytes) -> None:
        if self.req.idempotent:
            replay = self.replay
            if replay is None:
                replay = self.replay = ReplayBuffer()
            replay.add(framed)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(framed)
            return
        self.pending.append(framed)
        self.pending_bytes += len(framed)
        if self.pending_bytes > BUFFER_LIMIT:
            self.client.pause_for_buffer()

    # Driven by the upstream connection

    def upstream_congested(self, congested: bool) -> None:
        """The backend stopped (resumed) taking the body: that wait is the backend's."""
        self.client.pause_for_upload(congested)
        upstream = self.upstream
        if upstream is None:
            return
        if congested:
            if not upstream.deadline:
                upstream.deadline = time.monotonic() + self.up.config.upstream_timeout
        elif not self.request_done:
            upstream.deadline = 0.0  # the upload goes at the client's pace again

    def response_head(self, status: int, upstream_keep_alive: bool) -> bool:
        """Forward the response head; False means it is dropped and the request retried."""
        upstream = self.upstream
        assert upstream is not None
        if status in RETRY_STATUSES and self._can_retry(sent=True, elsewhere=True):
            self.upstream = None
            self.up.ejector.answered(upstream.owner.backend, status)
            self._retry(sent=True)
            return False
        req = self.req
        now = time.monotonic()
        self.first_byte = now - self.started  # for the metrics
        if not upstream.deadline and not self.client.send_deadline:
            upstream.deadline = now + self.up.config.upstream_timeout  # early answer
        self.status = status
        self.reason = upstream.reason
        self.upstream_keep_alive = upstream_keep_alive
        self.response_started = True
        lines = upstream.lines
        if upstream.connection:
            # Rare: the fields Connection names are hop-by-hop too (RFC 9110 §7.6.1).
            lines = drop_connection_named(lines, upstream.connection)
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, upstream.reason), *lines]
        if self.cookie is not None:
            parts.append(self.cookie)
        # Framing is written here, after the drop above: the backend cannot remove it.
        if upstream.length is not None:
            parts.append(b"Content-Length: %b\r\n" % upstream.length)
        elif req.method == b"HEAD" or status in NO_BODY_STATUSES:
            pass
        elif req.http10:
            self.keep_client = False  # close-delimited: HTTP/1.0 knows no chunked
        else:
            self.rechunk = True
            if upstream.codings:
                # Codings other than chunked stay applied to the body: say so (RFC 9112 §6.1).
                parts.append(b"Transfer-Encoding: %b, chunked\r\n" % upstream.codings)
            else:
                parts.append(b"Transfer-Encoding: chunked\r\n")
        if not self.request_done:
            self.keep_client = False  # the rest of the request body will not be read
        if self.ctx.draining:
            self.keep_client = False
        if not self.keep_client:
            parts.append(b"Connection: close\r\n\r\n")
        elif req.http10:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        self.client.write(b"".join(parts))
        return True

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.rechunk:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)
        upstream = self.upstream
        if upstream is not None and upstream.deadline:
            upstream.deadline = time.monotonic() + self.up.config.upstream_timeout

    def response_complete(self, conn: UpstreamConnection) -> None:
        if self.rechunk:
            self.client.write(b"0\r\n\r\n")
        self.upstream = None
        now = time.monotonic()
        if self.upstream_keep_alive and self.request_done and not conn.broken:
            conn.owner.put_idle(conn, now)
        else:
            conn.detach()
        self.up.ejector.answered(conn.owner.backend, self.status)
        self._finish()

    def switch_protocols(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The backend answered 101: a tunnel if it completes the client's WebSocket
        handshake, else a 502 (a 101 nobody asked for is never relayed)."""
        accept = self.req.upgrade
        if accept is None:
            conn.fail(errors.BAD_GATEWAY_UPGRADE)
            return
        if not completes_websocket(conn.upgrade, conn.lines, accept):
            self.keep_client = False
            conn.fail(errors.BAD_GATEWAY_HANDSHAKE)
            return
        self.upstream = None
        self.status = 101
        self.reason = conn.reason
        self.response_started = True
        self.first_byte = time.monotonic() - self.started
        lines = conn.lines
        if conn.connection:
            lines = drop_connection_named(lines, conn.connection)
        head = [b"HTTP/1.1 101 %b\r\n" % conn.reason, *lines]
        if self.cookie is not None:
            head.append(self.cookie)
        head += (UPGRADE_WEBSOCKET, b"\r\n")
        self.up.ejector.answered(conn.owner.backend, 101)
        # The tunnel keeps this backend connection, and so its slot: --max-conns-per-backend
        # bounds tunnels too (HAProxy's maxconn, nginx's max_conns count them likewise).
        slot = self.slot
        self.slot = None
        tunnel = self.client.start_tunnel(conn.hand_over(), b"".join(head), rest, slot, self)
        self._finish(log=not tunnel)  # a tunnel has its own line, at its end

    def upstream_lost(self) -> None:
        self.upstream = None
        if self.response_started:
            self.client.abort()  # a truncated body must look truncated: no clean end
            return
        self._retry_or_fail(errors.BAD_GATEWAY_RESET, sent=True)

    def upstream_failed(self, conn: UpstreamConnection, reason: tuple[int, str]) -> None:
        self.upstream = None
        self.up.ejector.failure(conn.owner.backend)
        if self.response_started:
            self.client.abort()
            return
        self._respond_error(reason)

    # Retries: retry.py says whether, the replay copy supplies the bytes

    def _retry_or_fail(self, reason: tuple[int, str], sent: bool, elsewhere: bool = False) -> None:
        if self._can_retry(sent, elsewhere):
            self._retry(sent)
        else:
            self._respond_error(reason)

    def _can_retry(self, sent: bool, elsewhere: bool) -> bool:
        """Whether the retry rules (retry.py) allow one more attempt; takes a budget token."""
        ctx = self.ctx
        up = self.up
        replay = self.replay
        if not may_retry(
            sent,
            self.req.idempotent,
            replay is None or replay.whole,
            self.replayed,
            self.attempts,
            up.config.max_connect_attempts,
            up.pool.healthy,
            self.tried,
            elsewhere,
        ):
            return False
        if not self.retrying:
            if not up.budget.try_acquire():
                ctx.stats.retries_refused += 1
                return False
            self.retrying = True
        return True

    def _retry(self, sent: bool) -> None:
        self.ctx.stats.retries += 1
        if sent:
            # Body rule 1: the new attempt owes its backend everything from the first byte.
            self.replayed = True
            replay = self.replay
            if replay is not None:
                self.pending = replay.copy()
                self.pending_bytes = replay.size
        self._attempt()

    # Endings

    def _no_backend(self) -> None:
        reason = errors.NO_BACKEND if self.up.pool.known else errors.NOT_READY
        self._respond_error(reason)

    def _respond_error(self, reason: tuple[int, str]) -> None:
        status, detail = reason
        self.status = status
        self.reason = errors.phrase(status)
        self.ctx.stats.proxy_errors += 1
        if not self.request_done or self.ctx.draining:
            self.keep_client = False
        self.client.write(errors.cached_response(status, detail, not self.keep_client))
        self._finish()

    def _finish(self, log: bool = True) -> None:
        if self.done:
            return
        self.done = True
        if not self.started:  # queued behind another request when the client left: no
            return  # count was taken, so none is given back (in flight went negative)
        if self.queued_since:
            self._leave_queue()
        self._release_slot()
        now = time.monotonic()  # one clock read for the in-flight count and the metrics
        if self.counted is not None:
            self.counted.finished(self.tried[-1], now - self.started, now)
            self.counted = None
        ctx = self.ctx
        ctx.active_exchanges -= 1
        route = self.req.route
        if route is not None:
            self.up.budget.active_requests -= 1
            if self.retrying:
                self.up.budget.release()
        seconds = now - self.started
        ctx.recorder.request(self, seconds)
        if log and ctx.access_log.enabled:
            ctx.access_log.request(
                self.req.method,
                self.req.target,
                self.status,
                self.reason,
                self.backend,
                seconds,
                self.bytes_out,
                route.label if route is not None else b"no route",
            )
        self.client.exchange_finished(self)


def _another(candidates: tuple[Backend, ...], tried: list[Backend], first: Backend) -> Backend:
    """The next candidate after ``first`` in pool order that was not tried yet, if any."""
    start = candidates.index(first) if first in candidates else 0
    n = len(candidates)
    for offset in range(1, n + 1):
        candidate = candidates[(start + offset) % n]
        if candidate not in tried:
            return candidate
    return first
