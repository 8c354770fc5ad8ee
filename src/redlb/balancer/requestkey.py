"""What a hashing pool hashes on, and the sticky cookie a request carries.

A key spec is ``ip`` (the client's address), ``path``, ``header:NAME``, ``cookie:NAME`` or
``query:NAME``.  A request without the named part hashes on the client's address, so
keyless requests spread over the pool instead of all landing on one backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

KINDS = ("ip", "path", "header", "cookie", "query")
_NAMED = ("header", "cookie", "query")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class KeySpec:
    kind: str
    name: bytes = b""  # lower case for a header

    def __str__(self) -> str:
        return f"{self.kind}:{self.name.decode()}" if self.name else self.kind


def parse_key_spec(text: str) -> KeySpec:
    """``header:X-User`` -> KeySpec; ValueError with a sentence naming what is wrong."""
    kind, sep, name = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError("must be ip, path, header:NAME, cookie:NAME or query:NAME")
    if kind not in _NAMED:
        if sep:
            raise ValueError(f"{kind} takes no name")
        return KeySpec(kind)
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) > 256 or any(c not in _TOKEN for c in raw):
        raise ValueError(f"{kind}:NAME needs a name made of token characters")
    if kind == "query" and b"&" in raw:  # '&' separates parameters: no request has this one
        raise ValueError("query:NAME cannot contain '&'")
    return KeySpec(kind, raw.lower() if kind == "header" else raw)


def parse_cookie_name(text: str) -> str:
    """A cookie name (RFC 6265 token) for sticky sessions; ValueError otherwise."""
    raw = text.encode("ascii", "replace")
    if not raw or len(raw) > 64 or any(c not in _TOKEN for c in raw):
        raise ValueError("a cookie name is 1-64 token characters (letters, digits, -_.)")
    return text


def cookie(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """The value of cookie ``name`` in the request's Cookie fields, or b""."""
    for field, value in headers:
        if len(field) == 6 and field.lower() == b"cookie":
            for pair in value.split(b";"):
                key, sep, found = pair.strip().partition(b"=")
                if sep and key == name:
                    return found.strip(b'"')
    return b""


def request_key(
    spec: KeySpec, peer: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> bytes:
    """The bytes a hashing strategy hashes for this request (the client's address if absent)."""
    kind = spec.kind
    if kind == "ip":
        return peer
    found = b""
    if kind == "path":
        found = target.partition(b"?")[0] or b"/"
    elif kind == "header":
        for field, value in headers:
            if field.lower() == spec.name:
                found = value
                break
    elif kind == "cookie":
        found = cookie(headers, spec.name)
    elif kind == "query":
        query = target.partition(b"?")[2]
        for pair in query.split(b"&"):
            key, _, value = pair.partition(b"=")
            if unquote_to_bytes(key.replace(b"+", b" ")) == spec.name:
                found = unquote_to_bytes(value.replace(b"+", b" ")) or b"\0"
                break
    return found or peer
