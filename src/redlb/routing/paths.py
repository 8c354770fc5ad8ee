"""Request host and path in the one form routing compares and the backend receives.

Rules:
1. Host: lower case, port and one trailing dot removed; anything that is not a plain DNS name
   or IP literal (``*``, empty labels, a leading dot) is refused, so no client-chosen string
   can pose as a wildcard.
2. Path: dot-segments removed and empty segments merged (RFC 3986 §5.2.4), ``%2E`` counted as
   the dot it encodes (§6.2.2.2) while ``%2F`` stays encoded; ``..`` above the root is
   refused.  The normalised path is what the backend receives, so a path that the backend
   would resolve elsewhere (``/public/../admin``) is routed where it really goes.  A segment
   that is a dot-segment before a ``;`` parameter (``..;``, which Tomcat resolves as ``..``)
   counts as one, and a raw backslash (not a URI character; some servers read it as ``/``)
   is refused.
"""

from __future__ import annotations

import re

# After lower-casing: DNS-ish labels, or an IP literal in brackets.
_HOST_NAME = re.compile(rb"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
# What may need normalising: one C call decides for the common path that needs nothing.
_DOT_OR_EMPTY_SEGMENT = re.compile(rb"/\.|//|%2|\\").search
# Clients repeat their Host: the normalised form of the recent ones, bounded.
_HOSTS: dict[bytes, bytes] = {}
_HOSTS_MAX = 4096


class BadPath(ValueError):
    """A host or path that cannot be routed (the client gets a 400)."""


def normalise_host(host: bytes) -> bytes:
    """``Api.Example.COM.:8080`` -> ``api.example.com``; b"" stays b"" (no Host at all)."""
    name = _HOSTS.get(host)
    if name is not None:
        return name
    if not host:
        return host
    name = host.lower()
    if name[0] == 0x5B:  # "[" : IPv6 literal, the port follows "]"
        name = name[: name.find(b"]") + 1]
    else:
        colon = name.find(b":")
        if colon >= 0:
            name = name[:colon]
        if name.endswith(b"."):
            name = name[:-1]
    if _HOST_NAME.fullmatch(name) is None:
        raise BadPath("invalid Host for routing")
    if len(_HOSTS) >= _HOSTS_MAX:
        _HOSTS.clear()  # many distinct hosts (or a client making them up): start again
    _HOSTS[host] = name
    return name


def normalise_path(path: bytes) -> bytes:
    """The path (no query) with dot-segments removed and ``//`` merged."""
    if _DOT_OR_EMPTY_SEGMENT(path) is None:
        return path  # the common case: nothing to do, and no copy made
    if b"\\" in path:
        raise BadPath("a backslash in the path (percent-encode it)")
    segments = path.split(b"/")
    out: list[bytes] = []
    last = b""
    for segment in segments[1:]:
        last = segment
        if not segment:
            continue
        plain = segment.replace(b"%2e", b".").replace(b"%2E", b".") if b"%" in segment else segment
        if b";" in plain:
            plain = plain[: plain.index(b";")]  # "..;x" is ".." to servlet containers
        if plain == b".":
            last = b""
            continue
        if plain == b"..":
            if not out:
                raise BadPath("the path climbs above the root")
            out.pop()
            last = b""
            continue
        out.append(segment)  # the original spelling: %2F and other escapes stay as sent
    if not out:
        return b"/"
    trailing = b"/" if not last else b""
    return b"/" + b"/".join(out) + trailing
