"""The client side of the data path: one asyncio.Protocol per client connection.

httptools parses; the callbacks validate and build a RequestHead; exchanges run one at a time
in arrival order (pipelined requests wait their turn, answered in order).  A malformed request
is answered by the proxy (400, or the precise 4xx) and the connection is closed: once framing
is in doubt nothing that follows on the connection can be trusted (RFC 9112 §6.3).

Rules:
1. A read is parsed whole before any request in it is started: bytes that follow a head in
   the same read (a bad chunk size, say) are seen before the head can reach a backend.
2. At most about _PIPELINE_DEPTH requests are parsed ahead; the rest of what a pipelining
   client sent waits as bytes, reading paused, until the line is half empty again.
3. Forwarding fields: list-valued ones (X-Forwarded-For, Forwarded) keep what the client sent
   and get redlb's own element appended, the rightmost being the only trustworthy one;
   single-valued ones (X-Forwarded-Host/-Proto/-Port, X-Real-IP) are always set by redlb.
4. A keep-alive client repeats its request heads: a head equal to the previous one (method,
   version, target, fields, keep-alive) under the same routing table and settings is
   forwarded as built the first time, without being checked, routed and serialised again.
5. Most keep-alive clients send each request in one read, the same bytes every time: a read
   equal, byte for byte, to the last one, which was one whole request without a body whose
   head rule 4 kept, is that request again and is not fed to the parser.  The parser is
   where that read left it (a new message), and would make the same calls from the same
   bytes; any other read forgets the bytes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

import httptools

from redlb.proxy import deadlines, errors
from redlb.proxy.context import ProxyContext
from redlb.proxy.errors import Reject
from redlb.proxy.exchange import Exchange, RequestHead
from redlb.proxy.rules import (
    IDEMPOTENT_METHODS,
    REQUEST_DROP,
    UPGRADE_WEBSOCKET,
    asks_websocket,
    check_host,
    check_transfer_encoding,
    check_version,
    drop_connection_named,
    forwarded_node,
    normalise_target,
    websocket_accept,
)
from redlb.proxy.tunnel import DRAIN, Tunnel
from redlb.proxy.upstream import BackendConnections
from redlb.routing import BadPath

log = logging.getLogger("redlb.downstream")

_NO_HEADERS: list[tuple[bytes, bytes]] = []  # never appended to: on_message_begin makes a new one

# Module constants are Final: compiled, constants rather than lookups in the module's dict.

# Reasons to stop reading from the client, as bits: reading resumes when none is left.
_PAUSE_PIPELINE: Final = 1  # a request is waiting behind the one in flight
_PAUSE_BUFFER: Final = 2  # body bytes are waiting for an upstream connection
_PAUSE_UPLOAD: Final = 4  # the backend is not taking the body as fast as it comes
_PAUSE_REFUSED: Final = 8  # the connection is finished; only the answer remains to be sent
_PAUSE_BACKLOG: Final = 16  # pipelined bytes are waiting to be parsed (rule 2)

# Requests parsed ahead on one connection, the one in flight included (rule 2).
_PIPELINE_DEPTH: Final = 32
# Reads are parsed in slices, so that chunk-extension bytes can be counted (LIM-07) and so
# that one read of tiny pipelined requests cannot make thousands of exchanges at once: a
# slice holds at most slice/18 requests, checked against _PIPELINE_DEPTH after each.
_FEED_SLICE: Final = 16 * 1024  # inside the body of the only request
_HEAD_SLICE: Final = 2048  # a request head, most fit whole
_PIPELINED_SLICE: Final = 512  # once requests are queued behind the one in flight
# Wire bytes a chunked body may spend on framing (size lines, extensions) beyond its data.
_CHUNK_OVERHEAD_BASE: Final = 4096
_CHUNK_OVERHEAD_PER_CHUNK: Final = 64

# Fields never forwarded as received: hop-by-hop ones, and those redlb writes itself.
_SET_BY_REDLB: Final = REQUEST_DROP | {b"host", b"content-length", b"x-forwarded-for", b"forwarded"}

# SO_LINGER on, zero seconds: close() sends a reset, so a cut response looks cut.
_LINGER_RESET = struct.pack("ii", 1, 0)

# Busy connections keep their parser between requests while there are at most this many
# connections; past it, a parser is dropped as soon as its connection goes idle.
_KEEP_PARSERS_UP_TO: Final = 2000

# Parse phases of the connection, for timeouts.
_IDLE: Final = 0
_HEADERS: Final = 1
_BODY: Final = 2


class ClientConnection(asyncio.Protocol):
    # Slots: ten thousand idle keep-alive connections should cost little memory each.
    __slots__ = (
        "backlog",
        "backlog_due",
        "body_received",
        "body_started_at",
        "checked_host",
        "chunk_wire",
        "chunks",
        "closing",
        "corked",
        "ctx",
        "eof",
        "forwarded",
        "handshake_done",
        "header_bytes",
        "header_deadline",
        "headers",
        "idle_deadline",
        "local_port",
        "node",
        "parser",
        "parsing",
        "paused",
        "peer",
        "phase",
        "queue",
        "refusal",
        "repeat",
        "scheme",
        "send_deadline",
        "transport",
        "tunnel",
        "url",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        scheme: bytes = b"http",
        handshake_done: Callable[[], object] | None = None,
    ) -> None:
        # Global state
        self.ctx = ctx
        self.scheme = scheme  # X-Forwarded-Proto and Forwarded proto= (https: the TLS listener)
        # The TLS listener's handshake accounting (tls/handshakes.py), told when it is done.
        self.handshake_done = handshake_done
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        # Made on the first byte of a request and dropped by the sweeper between messages
        # (or at once past _KEEP_PARSERS_UP_TO connections): an idle keep-alive connection
        # holds no parser (about 0.6 KB with its callbacks), a busy one keeps its own.  What
        # else a request builds and the next one reuses goes with it (_hibernate).
        self.parser: httptools.HttpRequestParser | None = None
        self.eof = False
        self.peer = b""
        self.local_port = -1  # the listener's, for X-Forwarded-Port (-1: unknown)
        self.forwarded = b""  # the closing fields of every request head, made when needed
        self.node = b""  # the peer as a Forwarded node
        self.queue: list[Exchange] = []  # pipelined requests; rarely more than one
        self.backlog: bytes | None = None  # received, not parsed yet (rule 2)
        self.backlog_due = False
        self.paused = 0
        self.corked: list[bytes] | None = None
        self.closing = False
        self.refusal: Reject | None = None
        self.phase = _IDLE
        # One deadline per purpose (deadlines.py says who arms and disarms each).
        self.header_deadline = 0.0
        self.idle_deadline = 0.0
        self.send_deadline = 0.0  # also "the client's socket is full", for the exchange
        self.body_started_at = 0.0
        self.checked_host = b""  # clients repeat their Host: it is validated once
        self.tunnel: Tunnel | None = None  # a WebSocket: this connection is no longer HTTP
        # The last head built, with what it was built from (rule 4); dropped with the parser.
        self.repeat: _Repeat | None = None
        # Per-request (parse side) state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = _NO_HEADERS
        self.header_bytes = 0
        self.parsing: Exchange | None = None
        self.body_received = 0
        self.chunks = 0
        self.chunk_wire = 0  # bytes fed while inside a chunked body

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.handshake_done is not None:  # over TLS the loop calls this after the handshake
            self.handshake_done()
            self.handshake_done = None
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b"unknown"
        self.node = forwarded_node(self.peer)
        local = transport.get_extra_info("sockname")
        self.local_port = local[1] if local else -1
        self.ctx.clients.add(self)
        self.ctx.stats.client_connections += 1
        # Connecting and sending nothing is held to the header timeout too (slowloris).
        self.header_deadline = time.monotonic() + self.ctx.config.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.refusal is not None or self.closing:
            return
        if self.backlog is not None:  # reading is paused meanwhile; this keeps the order anyway
            data = self.backlog + data
            self.backlog = None
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Parse one read (rule 1), then start the request at the head of the line."""
        queue = self.queue
        repeat = self.repeat
        fresh = self.phase == _IDLE and not queue
        if repeat is not None and repeat.raw is not None:
            if fresh and data == repeat.raw and self._repeat_is_current(repeat):
                self._repeat_request(repeat)  # rule 5
                return
            repeat.raw = None  # other bytes go through the parser: its state changes
        if self.phase == _IDLE:
            self.phase = _HEADERS
            self.header_deadline = time.monotonic() + self.ctx.config.header_timeout
        try:
            if len(data) <= _HEAD_SLICE and not queue:
                self._feed(data)  # the common case: one small request
                if fresh and len(queue) == 1:
                    self._remember_read(data, queue[0])
            else:
                start, end = 0, len(data)
                while start < end and self.refusal is None and not self.closing:
                    if len(queue) >= _PIPELINE_DEPTH:
                        self.backlog = data[start:]
                        self._pause(_PAUSE_BACKLOG)
                        break
                    if len(queue) > 1:
                        step = _PIPELINED_SLICE
                    elif self.parsing is not None:
                        step = _FEED_SLICE
                    else:
                        step = _HEAD_SLICE
                    self._feed(data[start : start + step] if start or step < end else data)
                    start += step
                    if self.backlog is not None:  # held behind a WebSocket handshake (_feed)
                        self.backlog += data[start:]
                        break
        except Reject as reject:
            self.refuse(reject)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self.refuse(cause)
            else:
                if cause is not None:
                    log.error("error handling a request", exc_info=cause)
                self.refuse(Reject(400, "malformed request"))
        if queue and not queue[0].started and not self.closing:
            queue[0].start()

    def _remember_read(self, data: bytes, exchange: Exchange) -> None:
        """Keep the bytes of a read that was exactly one whole request (rule 5)."""
        repeat = self.repeat
        if (
            repeat is not None
            and exchange.req is repeat.req
            and exchange.request_done
            and self.phase == _IDLE
            and self.parsing is None
            and not self.body_received
            and not repeat.req.chunked
            and repeat.keep_alive
            and self.backlog is None
            and self.refusal is None
            and not self.closing
        ):
            repeat.raw = data

    def _repeat_is_current(self, repeat: _Repeat) -> bool:
        """The head rule 4 kept is still the one to forward: same table and settings."""
        ctx = self.ctx
        if repeat.table is not ctx.table or repeat.config is not ctx.config or ctx.draining:
            return False
        route = repeat.req.route
        return route is None or route.target.config is repeat.pool_config

    def _repeat_request(self, repeat: _Repeat) -> None:
        """What parsing ``repeat.raw`` again would do (rule 5): the callbacks of one message,
        then the start of its exchange."""
        # on_message_begin / on_url
        self.url = repeat.url
        self.idle_deadline = 0.0
        self.header_deadline = 0.0
        # on_headers_complete
        exchange = Exchange(self, repeat.req)
        self.queue.append(exchange)
        # on_message_complete (phase stays _IDLE, nothing is being parsed)
        exchange.request_complete()
        exchange.start()

    def _parse_backlog(self) -> None:
        self.backlog_due = False
        data = self.backlog
        if data is None or self.closing or self.refusal is not None:
            return
        self.backlog = None
        if data:  # empty: a declined WebSocket handshake held nothing back
            self._parse(data)
        if not self._backlog_held():
            self._resume(_PAUSE_BACKLOG)

    def _backlog_held(self) -> bool:
        """Whether bytes wait to be parsed, read anew: in _parse_backlog, mypy takes
        ``self.backlog`` for the None it set before _parse, and compiled, that read was a
        cast to None raising TypeError whenever _parse had held a new backlog."""
        return self.backlog is not None

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        in_chunked_body = self.parsing
        if in_chunked_body is not None and not in_chunked_body.req.chunked:
            in_chunked_body = None
        while True:
            try:
                parser.feed_data(data)
                break
            except httptools.HttpParserUpgrade as upgrade:
                # A non-CONNECT Upgrade request, without a body (on_headers_complete).
                data = data[upgrade.args[0] :]
                if self.queue and self.queue[-1].req.upgrade is not None:
                    # A WebSocket handshake: what follows is the tunnel's if the backend
                    # accepts, the next request if it declines.  It waits for the answer,
                    # reading paused; exchange_finished parses it (or start_tunnel takes it).
                    self.backlog = data
                    self._pause(_PAUSE_BACKLOG)
                    break
                # Any other token: Upgrade was stripped, parsing simply goes on after it.
                if not data:
                    break
        if in_chunked_body is not None and in_chunked_body is self.parsing:
            # llhttp does not bound chunk extensions (RFC 9112 §7.1.1 says we ought to).
            self.chunk_wire += len(data)
            allowed = _CHUNK_OVERHEAD_BASE + _CHUNK_OVERHEAD_PER_CHUNK * self.chunks
            if self.chunk_wire - self.body_received > allowed:
                raise Reject(400, "chunk framing too large")

    def eof_received(self) -> bool | None:
        if self.scheme == b"https":
            # The client's close_notify.  The loop's SSL layer shuts the connection down after
            # it whatever this returns (no half-close over TLS, as with nginx), and logs a
            # warning for every True: a line per connection that a client could repeat at will.
            return None
        if self.queue and self.parsing is None:
            self.eof = True  # half-close: answer what was asked, then close
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        self.ctx.clients.discard(self)
        self.backlog = None
        while self.queue:
            exchange = self.queue.pop(0)
            if exchange.started:  # one never started has nothing to stop or count
                exchange.abort()

    def pause_writing(self) -> None:
        self.send_deadline = time.monotonic() + self.ctx.config.send_timeout
        if self.queue:
            self.queue[0].client_congested(True)

    def resume_writing(self) -> None:
        self.send_deadline = 0.0
        if self.queue:
            self.queue[0].client_congested(False)

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.body_received = 0
        self.chunks = 0
        self.chunk_wire = 0
        self.phase = _HEADERS
        self.idle_deadline = 0.0
        if not self.header_deadline:
            # A head that follows a complete request in the same read (pipelining) gets
            # its own header deadline too: data_received only arms one from idle.
            self.header_deadline = time.monotonic() + self.ctx.config.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        limit = self.ctx.config.max_request_line
        if len(self.url) > limit:
            raise Reject(414, f"request target over {limit} bytes (--max-request-line)")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:
            return  # trailer fields of a chunked body: not forwarded
        self.header_bytes += len(name) + len(value) + 4
        self.headers.append((name, value))
        config = self.ctx.config
        if self.header_bytes > config.max_header_bytes:
            limit = config.max_header_bytes
            raise Reject(431, f"request header fields over {limit} bytes (--max-header-bytes)")
        if len(self.headers) > config.max_headers:
            raise Reject(431, f"more than {config.max_headers} header fields (--max-headers)")

    def on_headers_complete(self) -> None:
        req = self._request_head()
        self.headers = _NO_HEADERS  # nothing of the request is kept while it is forwarded
        exchange = Exchange(self, req)
        self.parsing = exchange
        self.phase = _BODY
        self.body_started_at = time.monotonic()
        self.header_deadline = 0.0
        self.queue.append(exchange)  # started once the whole read is parsed (rule 1)
        if len(self.queue) > 1:
            self._pause(_PAUSE_PIPELINE)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        exchange = self.parsing
        max_body = exchange.req.max_body if exchange is not None else self.ctx.config.max_body
        if max_body and self.body_received > max_body:
            raise _body_too_large(max_body)
        if exchange is not None:
            exchange.request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        self.phase = _IDLE
        if exchange is not None and not exchange.done:
            exchange.request_complete()
        elif exchange is not None:
            exchange.request_done = True

    # Building the request to forward

    def _request_head(self) -> RequestHead:
        parser = self.parser
        assert parser is not None
        method: bytes = parser.get_method()
        version: str = parser.get_http_version()
        ctx = self.ctx
        keep_alive: bool = parser.should_keep_alive() and not ctx.draining
        repeat = self.repeat
        if (
            repeat is not None
            and repeat.headers == self.headers
            and repeat.url == self.url
            and repeat.method == method
            and repeat.version == version
            and repeat.keep_alive == keep_alive
            and repeat.table is ctx.table
            and repeat.config is ctx.config
        ):
            route = repeat.req.route
            if route is None or route.target.config is repeat.pool_config:
                return repeat.req  # rule 4
        req = self._build_request_head(parser, method, version, keep_alive)
        if not req.expect_continue and not parser.should_upgrade():
            self.repeat = _Repeat(
                method, version, self.url, self.headers, keep_alive, ctx.table, ctx.config, req
            )
        return req

    def _build_request_head(
        self, parser: httptools.HttpRequestParser, method: bytes, version: str, keep_alive: bool
    ) -> RequestHead:
        if version != "1.1":
            major, _, minor = version.partition(".")
            check_version(int(major), int(minor))
        http10 = version == "1.0"
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported")

        host: bytes | None = None
        hosts = 0
        te_values: list[bytes] = []
        connection_values: list[bytes] = []
        forwarded_for: list[bytes] = []
        forwarded: list[bytes] = []
        content_length = -1
        expect_continue = False
        parts = [b""]  # the request line goes first, once the target is known
        append = parts.append
        for name, value in self.headers:
            lowered = name.lower()
            if lowered not in _SET_BY_REDLB:
                if b"_" not in name:  # X_Forwarded_For and X-Forwarded-For mean the same to CGI
                    append(b"%b: %b\r\n" % (name, value))
                continue
            if lowered == b"host":
                hosts += 1
                host = value
            elif lowered == b"content-length":
                content_length = int(value)  # llhttp has checked it is one run of digits
            elif lowered == b"transfer-encoding":
                te_values.append(value)
            elif lowered == b"connection":
                connection_values.append(value)
            elif lowered == b"x-forwarded-for":
                forwarded_for.append(value)
            elif lowered == b"forwarded":
                forwarded.append(value)
            elif lowered == b"expect":
                if value.lower() != b"100-continue":
                    raise Reject(417, "only Expect: 100-continue is supported")
                expect_continue = not http10

        if hosts > 1:
            raise Reject(400, "more than one Host header")
        if host is None:
            if not http10:
                raise Reject(400, "missing Host header")
        elif host != self.checked_host:
            check_host(host)
            self.checked_host = host
        target, host = normalise_target(method, self.url, host)
        allowed = self.ctx.config.allowed_hosts
        if allowed and (host is None or _host_name(host) not in allowed):
            raise Reject(421, "this balancer does not serve that host")
        if host is None:
            # HTTP/1.0 without Host: the authority the client reached, the listener's own
            # address (RFC 9112 §3.3), since HTTP/1.1 requires a Host (RFC 9112 §3.2).
            host = self._local_authority()
        table = self.ctx.table
        route = table.single
        if route is None:  # routes are configured: the forwarded target is the normalised one
            try:
                route, target = table.resolve(host, target)
            except BadPath as exc:
                raise Reject(400, str(exc)) from None
        chunked = bool(te_values)
        if chunked:
            check_transfer_encoding(te_values, http10)
        max_body = route.target.config.max_body if route is not None else self.ctx.config.max_body
        key = sticky = b""
        if route is not None and route.target.reads_request:  # hashing or sticky pools only
            key, sticky = route.target.request_keys(self.peer, target, self.headers)
        if max_body and content_length > max_body:
            raise _body_too_large(max_body)
        has_body = chunked or content_length > 0
        accept = None
        if parser.should_upgrade():
            if has_body:
                raise Reject(400, "an Upgrade request with a body is not supported")
            if asks_websocket([v for n, v in self.headers if n.lower() == b"upgrade"]):
                accept = websocket_accept(method, http10, self.headers)

        if connection_values:
            # RFC 9110 §7.6.1: the fields Connection names are hop-by-hop too.  What redlb
            # sets itself (framing, Host, X-Forwarded-*) is added after this, so a client
            # cannot strip it this way.
            parts = drop_connection_named(parts, connection_values)
            append = parts.append
        parts[0] = b"%b %b HTTP/1.1\r\n" % (method, target)
        if accept is not None:
            append(UPGRADE_WEBSOCKET)
        if chunked:
            append(b"Transfer-Encoding: chunked\r\n")
        elif content_length >= 0:
            append(b"Content-Length: %d\r\n" % content_length)
        if forwarded_for:
            forwarded_for.append(self.peer)
            x_forwarded_for = b", ".join(forwarded_for)
        else:
            x_forwarded_for = self.peer
        if forwarded:
            forwarded.append(b"")  # redlb's element goes last
        # A route may name the Host its pool expects; the client's stays in the X-Forwarded-Host
        # and Forwarded fields.
        upstream_host = host if route is None or route.host_header is None else route.host_header
        append(
            b"Host: %b\r\nX-Forwarded-Host: %b\r\nX-Forwarded-For: %b\r\n"
            b'Forwarded: %bfor=%b;host="%b";proto=%b\r\n'
            % (
                upstream_host,
                host,
                x_forwarded_for,
                b", ".join(forwarded) if forwarded else b"",
                self.node,
                host,
                self.scheme,
            )
        )
        forwarded_fields = self.forwarded
        if not forwarded_fields:  # the first head since the connection was made or idle
            forwarded_fields = self.forwarded = self._forwarded_fields()
        append(forwarded_fields)
        return RequestHead(
            method=method,
            target=self.url if len(self.url) <= 200 else self.url[:200] + b"...",
            head=b"".join(parts),
            chunked=chunked,
            keep_alive=keep_alive,
            http10=http10,
            # A handshake is never resent once sent, nor sent on a long-idle connection.
            idempotent=method in IDEMPOTENT_METHODS and accept is None,
            expect_continue=expect_continue and has_body,
            route=route,
            max_body=max_body,
            key=key,
            sticky=sticky,
            upgrade=accept,
        )

    def _forwarded_fields(self) -> bytes:
        """The closing fields of every request head from this client."""
        port = self.local_port
        port_field = b"X-Forwarded-Port: %d\r\n" % port if port >= 0 else b""
        return b"X-Real-IP: %b\r\nX-Forwarded-Proto: %b\r\n%b\r\n" % (
            self.peer,
            self.scheme,
            port_field,
        )

    # Exchange interface

    def write(self, data: bytes) -> None:
        if self.corked is not None:
            self.corked.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until uncork(): a response head, body and end go out in one send."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        corked = self.corked
        self.corked = None
        if corked and self.transport is not None:
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def abort(self) -> None:
        """End the connection without a clean end of message (truncation stays visible)."""
        self.closing = True
        self.uncork()
        transport = self.transport
        if transport is not None:
            # A reset, not a FIN: a close-delimited body (HTTP/1.0) cut short would look whole.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()

    def pause_for_buffer(self) -> None:
        self._pause(_PAUSE_BUFFER)

    def unpause_for_buffer(self) -> None:
        self._resume(_PAUSE_BUFFER)

    def pause_for_upload(self, congested: bool) -> None:
        if congested:
            self._pause(_PAUSE_UPLOAD)
        else:
            self._resume(_PAUSE_UPLOAD)

    def exchange_finished(self, exchange: Exchange) -> None:
        queue = self.queue
        if not queue or queue[0] is not exchange:
            return
        queue.pop(0)
        if self.closing:
            return
        if not exchange.keep_client:
            self._close()
            return
        if (
            self.backlog is not None
            and not self.backlog_due
            and len(queue) <= _PIPELINE_DEPTH // 2
            # Bytes held behind a WebSocket handshake (the last one queued, see _feed) wait
            # for its answer: they are the tunnel's if it is accepted, never HTTP before.
            and (not queue or queue[-1].req.upgrade is None)
        ):
            self.backlog_due = True  # parsed from the loop: this may run inside a parse
            self.ctx.loop.call_soon(self._parse_backlog)
        if queue:
            if len(queue) == 1:
                self._resume(_PAUSE_PIPELINE)
            queue[0].start()
            return
        if self.refusal is not None:
            self._send_refusal()
            return
        if (self.ctx.draining or self.eof) and self.parsing is None:
            self._close()
            return
        if self.phase == _IDLE:
            self.idle_deadline = time.monotonic() + self.ctx.config.keepalive_timeout
            if len(self.ctx.clients) > _KEEP_PARSERS_UP_TO:
                self._hibernate()  # so many connections that memory comes first

    # Timeouts, driven by the sweeper

    def check_timeouts(self, now: float) -> None:
        if self.tunnel is not None:
            self.tunnel.check(now)
            return
        if self.queue:
            self.queue[0].check_timeout(now)
        verdict = deadlines.verdict(
            now, self.header_deadline, self.idle_deadline, self.send_deadline
        )
        if verdict == deadlines.ABORT:
            # Even a closing connection: its close waits for a flush that never comes.
            # connection_lost then aborts the exchanges, which frees their backends.
            self.abort()
        elif self.closing:
            return
        elif verdict == deadlines.REFUSE:
            self.header_deadline = 0.0
            if self.phase == _IDLE and not self.queue:
                self._close()  # connected and never sent a byte: nothing to answer
            elif self.refusal is None:  # the first reason to refuse is the one answered
                self._timeout_refusal()
        elif verdict == deadlines.CLOSE:
            self._close()
        elif self.phase == _BODY and self.parsing is not None and not self.parsing.done:
            elapsed = now - self.body_started_at
            config = self.ctx.config
            if (
                config.body_min_rate
                and elapsed > config.body_rate_grace
                and self.body_received < elapsed * config.body_min_rate
                and not self.paused
            ):
                self._timeout_refusal()
        elif self.phase == _IDLE and not self.queue:
            self._hibernate()  # between messages: nothing to keep (see __init__)

    def _hibernate(self) -> None:
        """Idle between messages: drop what the next request rebuilds, the parser (about
        0.6 KB), the last head, the fields made from the peer, Host and target (0.2 KB more):
        ten thousand idle keep-alive connections are held within a worker's 60 MB."""
        self.parser = None
        self.repeat = None
        self.forwarded = b""
        self.checked_host = b""
        self.url = b""

    def flushed(self) -> bool:
        """Nothing is left for this client: no exchange, no byte waiting to be sent."""
        if self.tunnel is not None:
            return False  # a tunnel is never done by itself: the drain waits its whole time
        transport = self.transport
        return not self.queue and (transport is None or not transport.get_write_buffer_size())

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else after the response in flight."""
        if not self.queue and self.phase == _IDLE:
            self._close()

    def end_drain(self) -> None:
        """The drain is over: a client whose answer is all handed to the kernel gets a clean
        close (the kernel still delivers what it holds; a reset would discard it); any other
        is cut off visibly."""
        if self.tunnel is not None:
            self.tunnel.close(DRAIN)
        elif self.flushed():
            self._close()
        else:
            self.abort()

    # WebSocket (tunnel.py)

    def start_tunnel(
        self,
        backend: asyncio.Transport,
        head: bytes,
        to_client: bytes,
        slot: BackendConnections | None,
        exchange: Exchange,
    ) -> bool:
        """The backend completed the handshake: both transports now belong to a tunnel, and
        the backend connection's slot too.  This connection stays in ctx.clients (it counts
        as open) until tunnel_ended.  False if the client was already gone (no tunnel)."""
        transport = self.transport
        if transport is None:
            backend.close()
            if slot is not None:
                slot.release()
            return False
        self.uncork()
        early = self.backlog or b""
        self.backlog = None
        self.transport = None  # nothing of the HTTP side may write to it any more
        self.closing = True
        self.paused = 0
        self.parser = None
        self.header_deadline = self.idle_deadline = self.send_deadline = 0.0
        tunnel = self.tunnel = Tunnel(self.ctx, self, transport, backend, slot, exchange)
        tunnel.start(head, to_client, early)
        return True

    def tunnel_ended(self) -> None:
        self.tunnel = None
        self.ctx.clients.discard(self)

    # Internals

    def _local_authority(self) -> bytes:
        local = self.transport.get_extra_info("sockname") if self.transport else None
        if not local:
            return b"localhost"
        address = local[0].encode()
        if b":" in address:
            address = b"[%b]" % address
        return b"%b:%d" % (address, local[1])

    def refuse(self, reject: Reject) -> None:
        self.ctx.stats.rejected += 1
        self.refusal = reject
        self.backlog = None
        self._pause(_PAUSE_REFUSED)
        exchange = self.parsing
        self.parsing = None
        if exchange is not None and (
            not exchange.started or exchange is not (self.queue[0] if self.queue else None)
        ):
            self.queue.remove(exchange)  # never started: nothing of it was forwarded (rule 1)
        elif exchange is not None:
            # The request in flight is itself the bad one (e.g. body over the limit).
            self.queue.pop(0)
            already_answered = exchange.response_started
            exchange.keep_client = False
            exchange.abort()
            if already_answered:
                self._close()
                return
        if not self.queue:
            self._send_refusal()

    def _timeout_refusal(self) -> None:
        self.refuse(Reject(408, "request not received in time"))

    def _send_refusal(self) -> None:
        reject = self.refusal
        assert reject is not None
        self.ctx.access_log.refused(reject.status, self.url)
        self.write(errors.cached_response(reject.status, reject.detail, True))
        self._close()

    def _close(self) -> None:
        self.closing = True
        self.uncork()
        if self.transport is not None:
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()


class _Repeat:
    """A request head built, and what it was built from (rule 4)."""

    __slots__ = (
        "config",
        "headers",
        "keep_alive",
        "method",
        "pool_config",
        "raw",
        "req",
        "table",
        "url",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        version: str,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        table: object,
        config: object,
        req: RequestHead,
    ) -> None:
        self.method = method
        self.version = version
        self.url = url
        self.headers = headers
        self.keep_alive = keep_alive
        self.table = table
        self.config = config  # the worker's settings (allowed hosts, limits)
        # The route's pool's settings (its body limit, what it hashes).
        self.pool_config = req.route.target.config if req.route is not None else None
        self.req = req
        # The read that was exactly this request, while the parser is where it left it
        # (rule 5); None once any other byte is parsed.
        self.raw: bytes | None = None


def _body_too_large(limit: int) -> Reject:
    return Reject(413, f"request body over {limit} bytes (--max-body)")


def _host_name(host: bytes) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    name = host.decode("ascii", "replace").lower()
    if name.startswith("["):
        return name.partition("]")[0] + "]"
    return name.rpartition(":")[0] if ":" in name else name
