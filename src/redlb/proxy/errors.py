"""The proxy's own responses, precomputed as bytes.

Bodies are fixed text: an error page never reflects any part of the request (no XSS, no
header injection through error pages).
"""

from __future__ import annotations

from http import HTTPStatus


class Reject(Exception):
    """A request the proxy answers itself, then closes the connection: once a request is
    refused mid-parse, nothing after it on the connection can be framed with confidence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Python 3.11 still has the RFC 7231 names for these; RFC 9110 §15.5 renamed them.
_RFC9110_PHRASES = {413: "Content Too Large", 414: "URI Too Long"}


def _phrase_text(status: int) -> str:
    return _RFC9110_PHRASES.get(status) or HTTPStatus(status).phrase


def error_response(status: int, detail: str, close: bool = True) -> bytes:
    phrase = _phrase_text(status)
    body = f"{status} {phrase}: {detail}\n".encode()
    connection = b"close" if close else b"keep-alive"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: " + connection + b"\r\n",
            b"Cache-Control: no-store\r\n\r\n",
            body,
        )
    )


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# The upstream-side failures an exchange can end with, as (status, detail).
NO_BACKEND = (503, "no backend is available")
NO_ROUTE = (404, "no route for this host and path")
BACKEND_BUSY = (503, "the backend is at its connection limit")
NOT_READY = (503, "the backend pool is not known yet")
BAD_GATEWAY_REFUSED = (502, "the backend refused the connection")
BAD_GATEWAY_RESET = (502, "the backend closed the connection before answering")
BAD_GATEWAY_GARBAGE = (502, "the backend's reply was not valid HTTP")
BAD_GATEWAY_TOO_BIG = (502, "the backend's response headers were too large")
BAD_GATEWAY_FRAMING = (502, "the backend's response framing cannot be relayed")
BAD_GATEWAY_UPGRADE = (502, "the backend switched protocols unasked")
BAD_GATEWAY_TLS = (502, "the TLS handshake with the backend failed")
BAD_GATEWAY_TLS_CERT = (502, "the backend's TLS certificate was refused")
BAD_GATEWAY_HANDSHAKE = (502, "the backend's 101 does not complete the WebSocket handshake")
GATEWAY_TIMEOUT = (504, "the backend did not answer in time")
CONNECT_TIMEOUT = (504, "connecting to the backend timed out")
OUT_OF_DESCRIPTORS = (503, "redlb is out of file descriptors")


_CACHE: dict[tuple[int, str, bool], bytes] = {}


def cached_response(status: int, detail: str, close: bool) -> bytes:
    key = (status, detail, close)
    response = _CACHE.get(key)
    if response is None:
        response = _CACHE[key] = error_response(status, detail, close)
    return response


def phrase(status: int) -> bytes:
    return _phrase_text(status).encode()
