"""The route syntax stored in Redis: ``HSET redlb:routes MATCH "POOL [options]"``.

MATCH is ``host/path``, ``*.suffix/path`` or ``/path`` (any host); a bare host means its
root.  The value is the pool (a Redis list key) optionally followed by ``strip-prefix`` and
``host=NAME`` (the Host sent upstream).  Both sides are parsed here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from redlb.routing.paths import BadPath, normalise_path

ANY, WILDCARD, EXACT = 0, 1, 2  # also their precedence: exact beats wildcard beats any
_LABELS = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_POOL = re.compile(r"[!-~]{1,200}")  # printable, no space: a Redis key redis-cli can type
_HOST_HEADER = re.compile(r"[A-Za-z0-9._-]+(?::[0-9]{1,5})?")
MAX_MATCH = 1024


class BadRoute(ValueError):
    """A route entry that cannot be used (skipped with a warning, refused by the CLI)."""


@dataclass(frozen=True, slots=True)
class Match:
    kind: int  # ANY, EXACT or WILDCARD
    host: str  # "" (any), "api.example.com", or the suffix ".example.com" of "*.example.com"
    prefix: str  # "/" or "/api": normalised, no trailing slash
    # Made once here, so that building a table of thousands of routes makes nothing twice.
    label: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", str(self).encode())

    def __str__(self) -> str:
        host = "*" + self.host if self.kind == WILDCARD else self.host
        return host + self.prefix if host else self.prefix

    @property
    def priority(self) -> tuple[int, int, int]:
        """Higher wins: host class, then host length (longest suffix), then prefix length."""
        return (self.kind, len(self.host), len(self.prefix))


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One route as configured (before its pool is resolved)."""

    match: Match
    pool: str
    strip_prefix: bool = False
    host_header: str | None = None
    list_start: int = 0  # Hipache lists begin with an identifier, not a backend

    def value(self) -> str:
        """The Redis hash value that reads back as this route."""
        parts = [self.pool]
        if self.strip_prefix:
            parts.append("strip-prefix")
        if self.host_header:
            parts.append(f"host={self.host_header}")
        return " ".join(parts)


def parse_match(text: str) -> Match:
    if not text or len(text) > MAX_MATCH:
        raise BadRoute("empty or over-long match")
    slash = text.find("/")
    host, path = (text, "/") if slash < 0 else (text[:slash], text[slash:])
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        kind = ANY
    elif host.startswith("*."):
        kind, host = WILDCARD, host[1:]
        if not _LABELS.fullmatch(host[1:]):
            raise BadRoute(f"invalid wildcard host {text[:slash] if slash >= 0 else text!r}")
    elif _LABELS.fullmatch(host) or _is_ip_literal(host):
        kind = EXACT
    else:
        raise BadRoute(f"invalid host {host!r} (use name, *.suffix, or nothing for any host)")
    try:
        raw = path.encode("ascii")
    except UnicodeEncodeError:
        raise BadRoute("the path must be ASCII (percent-encode the rest)") from None
    if any(c <= 0x20 or c >= 0x7F or c in b"?#;" for c in raw):
        # ';' too: matching ignores segment parameters (paths.py rule 3)
        raise BadRoute("the path may not hold spaces, controls, '?', '#' or ';'")
    try:
        prefix = normalise_path(raw).decode("ascii")
    except BadPath as exc:
        raise BadRoute(str(exc)) from None
    if len(prefix) > 1 and prefix.endswith("/"):
        prefix = prefix[:-1]
    return Match(kind, host, prefix)


def _is_ip_literal(host: str) -> bool:
    """``[::1]``: a route for an IPv6 literal must be one (a request's Host could match
    nothing else).  IPv4 addresses are plain labels."""
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


def check_pool(pool: str) -> None:
    """BadRoute unless ``pool`` can name a pool: one printable Redis key, not redlb's own."""
    if not _POOL.fullmatch(pool) or pool.startswith("redlb:"):
        raise BadRoute(f"invalid pool name {pool[:80]!r}")


def parse_route(match: str, value: str) -> RouteSpec:
    """A route from its hash field and value; BadRoute says what is wrong."""
    return with_value(parse_match(match), value)


def with_value(parsed: Match, value: str) -> RouteSpec:
    """The route of an already parsed match and a hash value."""
    words = value.split()
    if not words:
        raise BadRoute("no pool named")
    pool = words[0]
    check_pool(pool)
    strip = False
    host_header = None
    for word in words[1:]:
        if word == "strip-prefix":
            strip = True
        elif word.startswith("host="):
            host_header = word[5:]
            if not _HOST_HEADER.fullmatch(host_header):
                raise BadRoute(f"invalid host= value {host_header[:80]!r}")
        else:
            raise BadRoute(f"unknown option {word[:40]!r} (strip-prefix, host=NAME)")
    return RouteSpec(parsed, pool, strip, host_header)
