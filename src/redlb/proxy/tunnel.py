"""A WebSocket tunnel: once a backend has completed the handshake, bytes go both ways as is.

Both transports (the client's and the backend's) are handed over here with set_protocol:
no HTTP parser sees a byte of the tunnel.

Rules:
1. Flow control: a side whose write buffer passes its high-water mark (pause_writing) stops
   reading from the other side until it drains (resume_writing), so a tunnel holds about two
   write buffers whatever either peer does (never reads, floods, or both).
2. Half-close: an EOF from one side is passed on (write_eof) and the other direction keeps
   flowing; the tunnel ends when both sides have sent EOF, or when either connection is lost.
3. Endings: close() lets each side flush what it holds, then FIN; a side that has not taken
   its bytes within the send timeout after that is reset.  The idle timeout
   (--tunnel-timeout) counts from the last byte read on either side.  Both are checked by the
   sweeper through the client connection: no timer per tunnel.
4. A tunnel is never retried, and its backend connection ends with it (never pooled); it
   holds that connection's slot under --max-conns-per-backend until both sides are gone.
5. Accounting: each side counts the bytes it hands to the other (one addition a read).  The
   access log gets one line when the tunnel ends (close(): no byte is read after it), with
   both counts, the time since the request began and why it ended; the sweeper adds an open
   tunnel's new bytes to the metrics, so a long tunnel shows before it ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from redlb.accesslog import TunnelEnd

if TYPE_CHECKING:
    from redlb.address import Backend
    from redlb.proxy.context import ProxyContext
    from redlb.proxy.downstream import ClientConnection
    from redlb.proxy.exchange import Exchange
    from redlb.proxy.upstream import BackendConnections

# Why a tunnel ended, as the access log says it: a side's FIN (the first one) or its loss
# without one, or redlb's own decision.
IDLE = b"idle-timeout"
DRAIN = b"drain"


class _Side(asyncio.Protocol):
    """One of the tunnel's two connections; what it reads goes to the other one."""

    __slots__ = (
        "closed",
        "counted",
        "eof",
        "lost",
        "other",
        "relayed",
        "reset",
        "transport",
        "tunnel",
    )

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, name: bytes) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.other: _Side = self
        self.eof = False
        self.lost = False
        self.relayed = 0  # bytes read from this side and handed to the other
        self.counted = 0  # of those, the ones already in the metrics
        self.closed = name + b"-closed"  # the reasons this side can end the tunnel for
        self.reset = name + b"-reset"

    def data_received(self, data: bytes) -> None:
        self.tunnel.active = True
        try:
            self.other.transport.write(data)
        except RuntimeError:  # the other handle closed in this loop pass, before its
            self.tunnel.close(self.other.reset)  # connection_lost: nothing left to relay to
            return
        self.relayed += len(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        self.tunnel.active = True
        other = self.other
        # Over TLS (close_notify) the loop's SSL layer shuts this side down whatever we
        # return, and warns once a tunnel for a True: a log line a client can repeat.
        keep_open = True if self.transport.can_write_eof() else None
        if other.eof or other.lost or not other.transport.can_write_eof():
            self.tunnel.close(other.closed if other.eof else self.closed)
            return keep_open  # close() closes this transport too, once it has flushed
        other.transport.write_eof()  # rule 2: the other direction keeps flowing
        return keep_open

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()  # rule 1

    def resume_writing(self) -> None:
        other = self.other
        if not other.eof and not other.lost:
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.side_lost(self.closed if exc is None else self.reset)


class Tunnel:
    __slots__ = (
        "active",
        "backend",
        "client",
        "closing_since",
        "ctx",
        "downstream",
        "idle_since",
        "method",
        "reason",
        "route",
        "slot",
        "started",
        "target",
        "upstream",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        client: ClientConnection,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport,
        slot: BackendConnections | None,
        exchange: Exchange,
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.slot = slot  # the backend connection's place under --max-conns-per-backend
        self.downstream = _Side(self, client_transport, b"client")
        self.upstream = _Side(self, backend_transport, b"backend")
        self.downstream.other = self.upstream
        self.upstream.other = self.downstream
        self.active = False  # a byte was read since the sweeper last looked
        self.idle_since = time.monotonic()
        self.closing_since = 0.0
        # The request that opened it, for its access log line (the exchange itself is done).
        req = exchange.req
        self.method = req.method
        self.target = req.target
        self.reason = exchange.reason
        self.backend: Backend | None = exchange.backend
        self.route = req.route.label if req.route is not None else b"no route"
        self.started = exchange.started
        ctx.open_tunnels += 1
        ctx.stats.tunnels += 1

    def start(self, head: bytes, to_client: bytes, to_backend: bytes) -> None:
        """Take over both transports; the 101 head (and any bytes the backend sent after
        it) go to the client, bytes the client sent early go to the backend."""
        client = self.downstream.transport
        backend = self.upstream.transport
        # A pause_writing that came before set_protocol went to the HTTP protocols: carry
        # its effect over, the matching resume_writing comes to the sides (rule 1).
        client_full = _above_high_water(client)
        backend_full = _above_high_water(backend)
        client.set_protocol(self.downstream)
        backend.set_protocol(self.upstream)
        if client_full:
            backend.pause_reading()
        else:
            backend.resume_reading()
        if backend_full:
            client.pause_reading()
        else:
            client.resume_reading()
        # Written last: a pause_writing these cause reaches the sides and stays in force.
        client.write(head + to_client if to_client else head)
        self.upstream.relayed = len(to_client)
        if to_backend:
            backend.write(to_backend)
            self.downstream.relayed = len(to_backend)

    def check(self, now: float) -> None:
        """The sweeper's visit (rule 3)."""
        if self.closing_since:
            if now - self.closing_since > self.ctx.config.send_timeout:
                for side in (self.downstream, self.upstream):
                    if not side.lost:
                        side.transport.abort()
            return
        if self.active:
            self.active = False
            self.idle_since = now
            self._count()
        elif now - self.idle_since > self.ctx.config.tunnel_timeout:
            self.close(IDLE)

    def close(self, why: bytes) -> None:
        """End both connections cleanly: what is buffered is sent, then FIN.  The tunnel's
        access log line is written here: neither side reads after this."""
        if self.closing_since:
            return
        self.closing_since = now = time.monotonic()
        for side in (self.downstream, self.upstream):
            if not side.lost:
                side.transport.close()
        self._count()
        log = self.ctx.access_log
        if log.enabled:
            log.tunnel(
                TunnelEnd(
                    self.method,
                    self.target,
                    self.reason,
                    self.backend,
                    now - self.started,
                    self.upstream.relayed,
                    self.downstream.relayed,
                    self.route,
                    why,
                )
            )

    def _count(self) -> None:
        """Add the bytes relayed since the last count to the metrics."""
        stats = self.ctx.stats
        up = self.upstream
        down = self.downstream
        stats.tunnel_bytes_to_client += up.relayed - up.counted
        stats.tunnel_bytes_from_client += down.relayed - down.counted
        up.counted = up.relayed
        down.counted = down.relayed

    def side_lost(self, why: bytes) -> None:
        self.close(why)  # one side gone: the other gets what it is owed, then FIN
        if self.downstream.lost and self.upstream.lost:
            self.ctx.open_tunnels -= 1
            slot = self.slot
            if slot is not None:
                self.slot = None
                slot.release()
            self.client.tunnel_ended()


def _above_high_water(transport: asyncio.Transport) -> bool:
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
