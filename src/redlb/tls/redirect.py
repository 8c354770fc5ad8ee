"""``--redirect-https``: the plain listener answers every request with a redirect to https.

Not the data path: one request a connection (answered, then closed), one timer a
connection (the header timeout), and the same limits as the proxy listener.  The Location
is built from the request's own Host, validated like the proxy's, with the TLS listener's
port unless it is 443: a client cannot make redlb redirect to a host it does not serve when
``--host`` is given.
"""

from __future__ import annotations

import asyncio

import httptools

from redlb.config import Config
from redlb.proxy import errors
from redlb.proxy.errors import Reject
from redlb.proxy.rules import check_host, check_version, normalise_target

_KEEP_METHOD = frozenset({b"GET", b"HEAD"})  # 301 for these; 308 keeps any other method


class RedirectProtocol(asyncio.Protocol):
    __slots__ = (
        "config",
        "host",
        "hosts",
        "parser",
        "port",
        "received",
        "timer",
        "transport",
        "url",
    )

    def __init__(self, config: Config, tls_port: int) -> None:
        self.config = config
        self.port = b"" if tls_port == 443 else b":%d" % tls_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.url = b""
        self.host: bytes | None = None
        self.hosts = 0
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.config.header_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.received += len(data)
        try:
            if self.received > self.config.max_request_line + self.config.max_header_bytes:
                raise Reject(431, "request head too large")
            self.parser.feed_data(data)
        except Reject as reject:
            self._answer(errors.cached_response(reject.status, reject.detail, True))
        except httptools.HttpParserUpgrade:
            pass  # the head is complete: on_headers_complete has answered
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._answer(errors.cached_response(cause.status, cause.detail, True))
            else:
                self._answer(errors.cached_response(400, "malformed request", True))

    # Parser callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        limit = self.config.max_request_line
        if len(self.url) > limit:  # as the proxy listener: no Location that long handed out
            raise Reject(414, f"request target over {limit} bytes (--max-request-line)")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.hosts += 1
            self.host = value

    def on_headers_complete(self) -> None:
        major, _, minor = self.parser.get_http_version().partition(".")
        check_version(int(major), int(minor))
        if self.hosts > 1:
            raise Reject(400, "more than one Host header")
        target, host = normalise_target(self.parser.get_method(), self.url, self.host)
        if host is None:
            raise Reject(400, "missing Host header")
        check_host(host)
        name = host.rpartition(b":")[0] if host.rfind(b":") > host.rfind(b"]") else host
        allowed = self.config.allowed_hosts
        if allowed and name.decode("ascii", "replace").lower() not in allowed:
            raise Reject(421, "this balancer does not serve that host")
        if target == b"*":
            target = b"/"
        method = self.parser.get_method()
        status = b"301 Moved Permanently" if method in _KEEP_METHOD else b"308 Permanent Redirect"
        self._answer(
            b"HTTP/1.1 %b\r\nLocation: https://%b%b%b\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n" % (status, name, self.port, target)
        )

    # Internals

    def _answer(self, response: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()

    def _timed_out(self) -> None:
        if self.received:
            self._answer(errors.cached_response(408, "request not received in time", True))
        elif self.transport is not None:
            self.transport.close()
