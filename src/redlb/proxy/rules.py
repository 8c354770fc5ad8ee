"""HTTP/1.1 message rules the proxy enforces, free of I/O (RFC 9110, RFC 9112).

llhttp (through httptools) already refuses most malformed syntax: bad tokens, CTL and NUL in
values, obs-fold, bare CR, duplicate or non-numeric Content-Length, TE together with CL,
chunk-size garbage.  What is left for us is the semantics a proxy owns: the version, the
request target, Host, the Transfer-Encoding coding list, hop-by-hop headers and forwarding.
"""

from __future__ import annotations

import base64
import hashlib
import re

from redlb.proxy.errors import Reject

# Headers that describe one connection, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
# Only the request side: credentials for this proxy, and the single-valued forwarding fields,
# which redlb sets itself (a client's value is never passed on).  The list-valued ones,
# X-Forwarded-For and Forwarded, are appended to instead: each hop adds its own element.
REQUEST_DROP = HOP_BY_HOP | {
    b"proxy-authorization",
    b"expect",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-real-ip",
}
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# RFC 3986 host (reg-name or IP literal) with optional port; '@', '/', space and the like
# make the Host header unusable for routing and are refused.
_HOST = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?$")


def check_version(major: int, minor: int) -> None:
    if major == 1 and minor in (0, 1):
        return
    if major == 0 and minor == 9:
        raise Reject(400, "HTTP/0.9 is not supported")
    raise Reject(505, "only HTTP/1.0 and HTTP/1.1 are supported")


def check_host(value: bytes) -> None:
    if not value or len(value) > 255 or not _HOST.match(value):
        raise Reject(400, "invalid Host header")


def normalise_target(
    method: bytes, target: bytes, host: bytes | None
) -> tuple[bytes, bytes | None]:
    """Return the origin-form target to forward and the Host to use.

    Absolute-form is accepted for ``http`` and rewritten to origin-form with the target's
    authority as Host (RFC 9112 §3.2.2); redlb routes by its own pool, never by what a client
    names, so no form of target can make it dial an address of the client's choosing.
    """
    if b"#" in target:
        raise Reject(400, "a fragment is not allowed in the request target")
    if target.startswith(b"/"):
        return target, host
    if target == b"*":
        if method == b"OPTIONS":
            return target, host
        raise Reject(400, "asterisk-form is only valid for OPTIONS")
    lowered = target[:8].lower()
    if lowered.startswith(b"http://"):
        rest = target[7:]
        slash = rest.find(b"/")
        authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        if b"@" in authority or not authority:
            raise Reject(400, "invalid authority in the request target")
        check_host(authority)
        if b"?" in authority:
            raise Reject(400, "invalid authority in the request target")
        return path, authority
    if lowered.startswith(b"https://"):
        raise Reject(400, "redlb does not proxy https:// targets")
    raise Reject(400, "invalid request target")


def check_transfer_encoding(values: list[bytes], http10: bool) -> None:
    """Accept exactly one ``chunked`` coding; anything else is refused (then close)."""
    if http10:
        raise Reject(400, "Transfer-Encoding is not allowed in HTTP/1.0 requests")
    if len(values) != 1:
        raise Reject(400, "repeated Transfer-Encoding header")
    codings = [c.strip().lower() for c in values[0].split(b",")]
    if codings == [b"chunked"]:
        return
    if any(not c for c in codings) or codings.count(b"chunked") > 1:
        raise Reject(400, "malformed Transfer-Encoding")
    raise Reject(501, "only the chunked transfer coding is supported")


def response_codings(values: list[bytes]) -> tuple[bool, bytes] | None:
    """A response's Transfer-Encoding as (chunked is final, the other codings in order).

    RFC 9112 §6.3: chunked final means chunked framing (llhttp decodes it); codings without
    chunked mean the body runs to the close.  The other codings stay applied to the body, so
    the caller must pass them on by name.  None: framing no recipient can rely on (chunked
    twice, not final, or with parameters) - a 502, never a guess.
    """
    # Split the way llhttp does, so that both always agree on the framing: only spaces are
    # OWS around "chunked" for llhttp ("chunked\t" is some other coding to it), and a
    # trailing empty element makes chunked not final.  Where they could differ: None.
    elements = [c.strip(b" ") for value in values for c in value.split(b",")]
    chunked = [e.partition(b";")[0].strip().lower() == b"chunked" for e in elements]
    others = [e.strip() for e in (elements if not any(chunked) else elements[:-1])]
    others = [e for e in others if e]  # empty list elements are ignored (RFC 9110 §5.6.1)
    if not any(chunked):
        return (False, b", ".join(others)) if others else None
    if sum(chunked) > 1 or elements[-1].lower() != b"chunked":
        return None
    return True, b", ".join(others)


def forwarded_node(address: bytes) -> bytes:
    """An address as a Forwarded ``for=`` value (RFC 7239 §6): IPv6 bracketed and quoted."""
    if b":" in address:
        return b'"[%b]"' % address
    return address


def connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def drop_connection_named(lines: list[bytes], connection_values: list[bytes]) -> list[bytes]:
    """Serialised field lines minus those Connection names: hop-by-hop too (RFC 9110 §7.6.1)."""
    named = connection_tokens(connection_values)
    return [line for line in lines if line.partition(b":")[0].lower() not in named]


# Upgrade (RFC 9110 §7.8, RFC 6455 §4): only WebSocket is tunnelled.  Any other token (h2c,
# TLS/1.x, custom ones) is dropped with the Upgrade field and the request is answered as
# HTTP/1.1, which RFC 9110 §7.8 allows: an upgrade is a request, never an obligation.
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
UPGRADE_WEBSOCKET = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"


def asks_websocket(upgrade_values: list[bytes]) -> bool:
    """Whether the Upgrade field lists ``websocket`` (case-insensitive, RFC 6455 §4.1)."""
    return any(
        token.strip().lower() == b"websocket"
        for value in upgrade_values
        for token in value.split(b",")
    )


def websocket_accept(method: bytes, http10: bool, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The Sec-WebSocket-Accept a backend must answer this opening handshake with.

    Refuses (400) a handshake no server could accept: RFC 6455 §4.1 asks for a GET in
    HTTP/1.1 or later and exactly one Sec-WebSocket-Key.
    """
    if method != b"GET" or http10:
        raise Reject(400, "a WebSocket handshake must be an HTTP/1.1 GET")
    keys = [value for name, value in headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1 or not keys[0].strip():
        raise Reject(400, "a WebSocket handshake needs one Sec-WebSocket-Key")
    digest = hashlib.sha1(keys[0].strip() + _WEBSOCKET_GUID).digest()
    return base64.b64encode(digest)


def completes_websocket(upgrade: bytes | None, lines: list[bytes], accept: bytes) -> bool:
    """Whether a 101's Upgrade and Sec-WebSocket-Accept complete the client's handshake."""
    if upgrade is None or upgrade.strip().lower() != b"websocket":
        return False
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() == b"sec-websocket-accept":
            return value.strip() == accept
    return False
