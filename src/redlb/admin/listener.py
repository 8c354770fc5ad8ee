"""The admin listener: bound once per instance, HTTP/1.1 parsed by httptools as on the data plane.

Requests on one connection are answered in order, one at a time (reading pauses while a
handler runs).  Limits: 8 KiB of target, 16 KiB of headers, 64 KiB of body; past them the
connection gets a 4xx and is closed.  A connection must send a whole request within
``idle_timeout`` of opening or of its last answer, and read its answers within it too
(no answer is written while the client leaves the previous ones unread): a client cannot
hold a worker's descriptors or memory by sending nothing or reading nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

from redlb.address import parse_listen

log = logging.getLogger("redlb.admin")

MAX_TARGET = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY = 64 * 1024


def bind(listen: str) -> socket.socket:
    """A listening socket for every worker of this instance (they inherit it)."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[bytes, bytes]  # lower-case names; a repeated field keeps the last
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(status: int, value: object, **kw: object) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode(), **kw)  # type: ignore[arg-type]


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


PHRASES = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request",
           401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 409: b"Conflict", 413: b"Content Too Large",
           414: b"URI Too Long",
           415: b"Unsupported Media Type", 421: b"Misdirected Request",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           503: b"Service Unavailable"}  # fmt: skip

Handler = Callable[[Request], Awaitable[Response]]


class AdminProtocol(asyncio.Protocol):
    def __init__(self, handle: Handler, idle_timeout: float = 10.0) -> None:
        self.handle = handle
        self.idle_timeout = idle_timeout
        self.timer: asyncio.TimerHandle | None = None
        self.writable: asyncio.Future[None] | None = None  # set while the kernel is full
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.queue: list[tuple[Request, bool]] = []
        self.busy = False
        self.closing = False
        self.refusal: Response | None = None  # sent once the requests before it are answered
        self.too_large: tuple[int, str] | None = None
        self.task: asyncio.Task[None] | None = None

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.refusal is not None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not supported")
        except (httptools.HttpParserError, _TooLarge):
            # httptools wraps what a callback raises: the limit that tripped is kept here.
            status, message = self.too_large or (400, "malformed HTTP request")
            self._refuse(status, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm_timer()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def _arm_timer(self) -> None:
        self._disarm_timer()
        self.timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle)

    def _disarm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle(self) -> None:
        self.closing = True
        if self.transport is None:
            return
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # close would wait for the unread answers, maybe forever
        else:
            self.transport.close()  # a plain FIN: a browser reopens an idle keep-alive quietly

    # Parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.header_bytes = 0
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_TARGET:
            self._over(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._over(431, "request header fields too large")
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_BODY:
            self._over(413, f"request body over {MAX_BODY} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "malformed request target")
            return
        request = Request(
            method=self.parser.get_method().decode(),
            path=(parsed.path or b"/").decode("latin-1"),
            query=(parsed.query or b"").decode("latin-1"),
            headers=self.headers,
            body=b"".join(self.body),
        )
        self.queue.append((request, self.parser.should_keep_alive()))
        if self.transport is not None:
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self._disarm_timer()  # a handler may wait on Redis longer than a client may idle
            self.task = asyncio.get_running_loop().create_task(self._serve())

    def _over(self, status: int, message: str) -> None:
        self.too_large = (status, message)
        raise _TooLarge(message)

    # Answering

    async def _serve(self) -> None:
        while self.queue and not self.closing:
            request, keep_alive = self.queue.pop(0)
            try:
                response = await self.handle(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("admin API: %s %s failed", request.method, request.path)
                response = error(500, "internal error (logged)")
            self._send(response, close=not keep_alive)
            if self.writable is not None:  # the client is not reading: wait for it, a while
                self._arm_timer()
                await self.writable
                self._disarm_timer()
        self.busy = False
        if self.refusal is not None:
            self._send(self.refusal, close=True)
        elif not self.closing and self.transport is not None:
            self._arm_timer()
            self.transport.resume_reading()

    def _send(self, response: Response, close: bool) -> None:
        if self.transport is None or self.closing:
            return
        head = [
            b"HTTP/1.1 %d %b\r\n" % (response.status, PHRASES.get(response.status, b"Status")),
            b"Content-Type: %b\r\n" % response.content_type,
            b"Content-Length: %d\r\n" % len(response.body),
            b"Cache-Control: no-store\r\n",
            b"X-Content-Type-Options: nosniff\r\n",
            b"X-Frame-Options: DENY\r\n",
            b"Content-Security-Policy: default-src 'self'; frame-ancestors 'none'\r\n",
        ]
        head.extend(b"%b: %b\r\n" % (name, value) for name, value in response.headers)
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head) + response.body)
        if close:
            self.closing = True
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self.refusal = error(status, message)
        if not self.busy:
            with contextlib.suppress(Exception):
                self._send(self.refusal, close=True)


class _TooLarge(Exception):
    """A limit was passed (the status and message are in AdminProtocol.too_large)."""
