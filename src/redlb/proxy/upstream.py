"""Connections to backends: a keep-alive pool per backend and the response-side protocol.

Rules:
1. A connection is in exactly one place: idle in its backend's pool, or owned by one exchange.
2. An idle connection that receives any byte or an EOF is discarded: it was left half-used or
   the backend is closing it, and reusing it would hand a stale reply to the next client.
3. A response completes only after feed_data returns, so bytes trailing a response in the
   same read are seen (and poison the connection) before it can go back to the pool.
4. The framing fields (Content-Length, Transfer-Encoding) are never copied into the head as
   received: the exchange writes the framing it forwards by itself, after the fields that
   Connection names are dropped, so a backend cannot strip it (RFC 9112 §6.3).
5. A backend answering the same resource sends the same head again (until its Date changes):
   a read that is the last response's head byte for byte, then exactly its Content-Length
   of body, when that last response was one whole read of a plain keep-alive answer (see
   _Repeat), is that answer again with another body and is not fed to the parser, which is
   where that read left it and would make the same calls.  Any other read forgets it first.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import httptools

from redlb.address import Backend
from redlb.proxy import errors
from redlb.proxy.rules import HOP_BY_HOP, response_codings

if TYPE_CHECKING:
    from redlb.proxy.exchange import Exchange

log = logging.getLogger("redlb.upstream")

MAX_RESPONSE_HEADER_BYTES: Final = 64 * 1024
MAX_RESPONSE_HEADERS: Final = 200
# A connection idle longer than this is closed by us first, to stay well clear of the
# backend's own keep-alive timeout (the reuse race is then rare, and retried when it happens).
IDLE_EXPIRY: Final = 20.0
# Non-idempotent requests only reuse a connection that was busy very recently: the keep-alive
# race cannot be retried for them, so a long-idle connection is not worth the risk.
FRESH_ENOUGH_FOR_UNSAFE: Final = 2.0


class BackendConnections:
    """The idle keep-alive connections of one backend, most recently used first.

    For an https:// backend, those made with one server name (backend_tls.py rule 3): a
    route that sends another Host to the same backend has its own BackendConnections.
    """

    __slots__ = (
        "backend",
        "busy",
        "idle",
        "max_conns",
        "max_idle",
        "refusal",
        "refused_until",
        "server_name",
        "tls",
        "waiters",
    )

    def __init__(
        self,
        backend: Backend,
        max_idle: int,
        max_conns: int = 0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.backend = backend
        self.tls = tls  # None: plain TCP
        self.server_name = server_name
        # Its certificate (or server name) was refused: not dialled before then, this answer.
        self.refused_until = 0.0
        self.refusal = errors.BAD_GATEWAY_TLS_CERT
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.max_conns = max_conns  # 0: no cap
        self.busy = 0  # connections owned by exchanges, or being opened for one
        self.waiters: deque[Exchange] = deque()

    def full(self) -> bool:
        return bool(self.max_conns) and self.busy >= self.max_conns

    def release(self) -> None:
        """One of the connections owned by an exchange (or a tunnel) is no longer."""
        self.busy -= 1
        if self.waiters:
            self.wake()

    def wake(self) -> None:
        """A connection came back: let the longest-waiting live request take it."""
        while self.waiters and not self.full():
            exchange = self.waiters.popleft()
            if exchange.queued_since and not exchange.done:
                exchange.acquire(self)

    def take_idle(self, idempotent: bool) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.broken:
                continue
            if not idempotent and time.monotonic() - conn.idle_since > FRESH_ENOUGH_FOR_UNSAFE:
                conn.close()
                continue
            return conn
        return None

    def put_idle(self, conn: UpstreamConnection, now: float) -> None:
        if conn.broken or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def expire(self, now: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.broken or now - conn.idle_since > IDLE_EXPIRY:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One connection to a backend; parses responses and hands them to its exchange."""

    __slots__ = (
        "body_started",
        "broken",
        "chunked",
        "close_notified",
        "closed",
        "codings",
        "connection",
        "deadline",
        "exchange",
        "finished",
        "head_bytes",
        "idle_since",
        "in_body",
        "length",
        "lines",
        "no_body",
        "owner",
        "parser",
        "reason",
        "repeat",
        "set_aside",
        "te",
        "to_close",
        "transport",
        "upgrade",
    )

    def __init__(self, owner: BackendConnections) -> None:
        # Per-connection state
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = _response_parser(self)
        self.broken = False
        self.closed = False
        # TLS: the backend said close_notify (the loop's SSL layer calls eof_received only
        # for that; a bare TCP close goes straight to connection_lost).
        self.close_notified = False
        self.idle_since = 0.0
        # The backend owes progress by then: armed by the exchange from the end of the
        # request (or while the body is not taken) to the end of the response; never while
        # the client is the slow side (exchange.py, body rule 2).
        self.deadline = 0.0
        # Per-response state
        self.exchange: Exchange | None = None
        self.no_body = False
        self.reason = b""
        # The head, sorted as it is parsed: end-to-end fields already serialised for the
        # client; hop-by-hop and framing fields set aside (counted), only their facts kept.
        self.lines: list[bytes] = []
        self.set_aside = 0
        self.connection: list[bytes] = []  # Connection values naming more than keep-alive
        self.upgrade: bytes | None = None  # the Upgrade field, for a 101
        self.length: bytes | None = None  # Content-Length, unless Transfer-Encoding overrides
        self.te: list[bytes] | None = None  # Transfer-Encoding values
        # Framing, decided once the head is complete (RFC 9112 §6.3):
        self.chunked = False  # chunked is the final coding (llhttp decodes it)
        self.codings = b""  # the other transfer codings, still applied to the body
        self.to_close = False  # the body ends when the backend closes
        self.head_bytes = 0  # wire bytes read while the head is incomplete
        self.in_body = False
        self.body_started = False
        self.finished = False
        self.repeat: _Repeat | None = None  # rule 5

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.broken = True  # rule 2
            self.close()
            return
        client = exchange.client
        repeat = self.repeat
        if repeat is not None:
            self.repeat = None  # the parser is fed, or this read is the repeat: taken again below
            if (
                not self.head_bytes
                and not self.in_body
                and not self.no_body
                and len(data) == repeat.size
                and data.startswith(repeat.head)
            ):
                client.cork()
                try:
                    self._repeat_response(exchange, repeat, data)
                finally:
                    client.uncork()
                return
        fresh = not self.head_bytes and not self.in_body
        if not self.in_body:
            self.head_bytes += len(data)
        client.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as switched:
            if self.finished:  # rule 3: a 101 after a whole response is junk too
                self.broken = True
                self._complete()
            else:
                # A 101 (llhttp stops after its head): the exchange decides; what follows
                # it is the new protocol's first bytes.
                exchange.switch_protocols(self, data[switched.args[0] :])
        except httptools.HttpParserError as exc:
            if self.finished:
                # Rule 3: junk after a whole response poisons this connection only; the
                # client already has its complete answer (and may have more requests queued).
                self.broken = True
                self._complete()
            else:
                self._parse_failed(exc)
        else:
            if self.finished:
                if fresh:
                    self._remember(exchange, data)
                self._complete()
            elif not self.in_body and self.head_bytes > MAX_RESPONSE_HEADER_BYTES:
                # Counted per read, not per field: a head is bounded to within one read.
                self.fail(errors.BAD_GATEWAY_TOO_BIG)
        finally:
            client.uncork()

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        # Exceptions raised in our callbacks arrive wrapped; the original is the context.
        cause = exc.__context__
        if isinstance(cause, _Abandoned):
            # The exchange retries elsewhere; the rest of this response is never read.
            self.exchange = None
            self.broken = True
            self.close()
        elif isinstance(cause, _TooBig):
            self.fail(errors.BAD_GATEWAY_TOO_BIG)
        elif isinstance(cause, _BadFraming):
            self.fail(errors.BAD_GATEWAY_FRAMING)
        elif isinstance(cause, httptools.HttpParserUpgrade):
            self.fail(errors.BAD_GATEWAY_UPGRADE)
        else:
            if cause is not None:
                log.error("error handling a response from %s", self.owner.backend, exc_info=cause)
            self.fail(errors.BAD_GATEWAY_GARBAGE)

    def eof_received(self) -> bool | None:
        self.close_notified = True
        return None  # close the transport; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broken = True
        self.transport = None
        if self in self.owner.idle:
            self.owner.idle.remove(self)
        exchange = self.exchange
        if exchange is None:
            return
        if (
            self.in_body
            and not self.finished
            and self.to_close
            and (self.close_notified or self.owner.tls is None)
        ):
            # RFC 9112 §6.3 rule 8: the body ends at connection close.  Over TLS only at a
            # close_notify: a TCP close without one may be a truncation (RFC 8446 §6.1).
            self.finished = True
            self._complete()
            return
        self.exchange = None
        exchange.upstream_lost()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_congested(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_congested(False)

    # Exchange interface

    def start(self, exchange: Exchange, head: bytes, no_body: bool) -> None:
        self.exchange = exchange
        self.no_body = no_body
        self._new_head()
        self.in_body = False
        self.body_started = False
        self.finished = False
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def detach(self) -> None:
        """The exchange is done with this connection and it must not be reused."""
        self.exchange = None
        self.broken = True
        self.close()

    def hand_over(self) -> asyncio.Transport:
        """The transport, for a tunnel; this connection is finished (never pooled)."""
        transport = self.transport
        assert transport is not None
        self.transport = None
        self.exchange = None
        self.broken = True
        self.closed = True
        self.deadline = 0.0
        return transport

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def fail(self, reason: tuple[int, str]) -> None:
        exchange = self.exchange
        self.exchange = None
        self.broken = True
        self.close()
        if exchange is not None:
            exchange.upstream_failed(self, reason)

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self.finished:
            self.broken = True  # a second response nobody asked for (rule 3)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:
            return  # trailer fields: not forwarded
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            # RFC 9110 §7.6.1: never forwarded; only the framing and the names that
            # Connection adds to the hop-by-hop set matter.
            self.set_aside += 1
            if lowered == b"transfer-encoding":
                if self.te is None:
                    self.te = [value]
                else:
                    self.te.append(value)
            elif lowered == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                self.connection.append(value)
            elif lowered == b"upgrade":
                self.upgrade = value
            return
        if lowered == b"content-length":
            self.set_aside += 1
            self.length = value  # llhttp refuses a second one, and anything but digits
            return
        self.lines.append(b"%b: %b\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        if self.finished:
            return
        parser = self.parser
        status = parser.get_status_code()
        reason = self.reason
        if reason not in _PLAIN_REASONS:
            # llhttp takes any byte but CR and LF here: control bytes become spaces before
            # the phrase reaches the client's status line (RFC 9112 §4) or the access log.
            self.reason = reason.translate(_REASON_BYTES)
        if status == 101:
            return  # llhttp stops after this head: data_received hands it to the exchange
        if 100 <= status < 200:
            # Interim responses (100, 103) are consumed here: redlb already answered the
            # client's Expect itself, and 103 hints are optional (RFC 9110 §15.2).
            # Their bytes still count: toward the head bound, and so that a read beginning
            # inside the final head is never taken for a whole response (rule 5).
            head_bytes = self.head_bytes
            self._new_head()
            self.head_bytes = head_bytes
            return
        if len(self.lines) + self.set_aside > MAX_RESPONSE_HEADERS:
            raise _TooBig
        exchange = self.exchange
        assert exchange is not None
        if self.te is not None:
            if self.no_body or status in (204, 304):
                self.length = None  # TE overrides CL; there is no body to frame either way
            else:
                self._transfer_codings(exchange.req.http10)
        else:
            self.to_close = self.length is None
        self.in_body = True
        accepted = exchange.response_head(status, parser.should_keep_alive())
        if not accepted:
            raise _Abandoned
        if self.no_body:
            # HEAD: llhttp cannot be told there is no body; start a fresh parser for the
            # next response instead, and count any byte that follows as a protocol error.
            self.finished = True
            self.parser = _response_parser(self)

    def on_body(self, body: bytes) -> None:
        if self.finished:
            self.broken = True
            return
        self.body_started = True
        assert self.exchange is not None
        self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.in_body:
            self.finished = True

    # Rule 5: a response read again

    def _remember(self, exchange: Exchange, data: bytes) -> None:
        """Keep a read that was exactly one plain keep-alive response, head and whole body."""
        length = self.length
        if (
            length is None
            or self.exchange is not exchange
            or self.te is not None
            or self.connection
            or self.upgrade is not None
            or self.no_body
            or self.broken
            or not exchange.upstream_keep_alive
            or not 200 <= exchange.status < 500
            or exchange.status in (204, 304)
            or exchange.rechunk
        ):
            return
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or len(data) - end != int(length):
            return  # an interim response before it, or a body not read whole
        self.repeat = _Repeat(data[:end], len(data), exchange.status, self.reason, self.lines,
                              length, self.set_aside)  # fmt: skip

    def _repeat_response(self, exchange: Exchange, repeat: _Repeat, data: bytes) -> None:
        """What feeding ``data`` to the parser would do (rule 5)."""
        # on_status, on_header (the head as the last one left it; never edited in place)
        self.reason = repeat.reason
        self.lines = repeat.lines
        self.length = repeat.length
        self.set_aside = repeat.set_aside
        # on_headers_complete
        self.to_close = False
        self.in_body = True
        if not exchange.response_head(repeat.status, True):
            # Retried elsewhere (a status the retry rules act on): as _Abandoned does.
            self.exchange = None
            self.broken = True
            self.close()
            return
        # on_body, on_message_complete
        body = data[len(repeat.head) :]
        if body:
            self.body_started = True
            exchange.response_body(body)
        self.finished = True
        self.repeat = repeat
        self._complete()

    # Internals

    def _new_head(self) -> None:
        self.reason = b""
        self.lines = []
        self.set_aside = 0
        if self.connection:
            self.connection = []
        if self.upgrade is not None:
            self.upgrade = None
        self.length = None
        self.te = None
        self.chunked = False
        self.codings = b""
        self.head_bytes = 0

    def _transfer_codings(self, to_http10: bool) -> None:
        """Framing when Transfer-Encoding is present: it wins over any Content-Length."""
        assert self.te is not None
        framing = response_codings(self.te)
        if framing is None:
            raise _BadFraming
        self.chunked, self.codings = framing
        self.to_close = not self.chunked
        if self.codings and to_http10:
            raise _BadFraming  # RFC 9112 §6.1: no transfer coding to an HTTP/1.0 recipient
        if self.length is not None or self.parser.get_http_version() == "1.0":
            # TE with CL (RFC 9112 §6.3), or TE in HTTP/1.0 (§6.1): faulty framing; the CL
            # is dropped, the body read as TE says, and the connection never reused.
            self.length = None
            self.broken = True

    def _complete(self) -> None:
        exchange = self.exchange
        self.exchange = None
        self.deadline = 0.0
        if exchange is not None:
            exchange.response_complete(self)


# Reason phrases as sent by most servers (one set lookup), and the translation for others:
# CTLs other than HTAB become SP.
_PLAIN_REASONS: Final = frozenset(status.phrase.encode() for status in HTTPStatus)
_CONTROL_BYTES: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_REASON_BYTES: Final = bytes.maketrans(_CONTROL_BYTES, b" " * len(_CONTROL_BYTES))

# Connection values that name no other field: the common case, nothing more to drop.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})


def _response_parser(conn: UpstreamConnection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(conn)
    # TE with CL: llhttp would stop; RFC 9112 §6.3 lets TE win (CL dropped, no reuse).
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    return parser


class _Repeat:
    """A whole response read in one piece (rule 5): its head's bytes and what parsing them
    recorded."""

    __slots__ = ("head", "length", "lines", "reason", "set_aside", "size", "status")

    def __init__(
        self,
        head: bytes,
        size: int,
        status: int,
        reason: bytes,
        lines: list[bytes],
        length: bytes,
        set_aside: int,
    ) -> None:
        self.head = head
        self.size = size  # the head and its Content-Length of body
        self.status = status
        self.reason = reason
        self.lines = lines
        self.length = length
        self.set_aside = set_aside


class _TooBig(Exception):
    pass


class _BadFraming(Exception):
    pass


class _Abandoned(Exception):
    pass
