"""Request host and path in the one form routing compares and the backend receives.

Rules:
1. Host: lower case, port and one trailing dot removed; anything that is not a plain DNS name
   or IP literal (``*``, empty labels, a leading dot) is refused, so no client-chosen string
   can pose as a wildcard.
2. Path: dot-segments removed and empty segments merged (RFC 3986 §5.2.4), the escapes of
   unreserved characters decoded (§6.2.2.2: ``%2E`` is a dot, ``%61dmin`` is ``admin`` to
   every backend) while ``%2F`` and other reserved escapes stay encoded; ``..`` above the
   root is refused.  The normalised path is what the backend receives, so a path that the backend
   would resolve elsewhere (``/public/../admin``) is routed where it really goes.  A segment
   that is a dot-segment before a ``;`` parameter (``..;``, which Tomcat resolves as ``..``)
   counts as one, and a raw backslash (not a URI character; some servers read it as ``/``)
   is refused.
3. Matching compares each segment without its ``;parameters`` (``match_path``): servlet
   containers map ``/admin;x/users`` as ``/admin/users``, so it must take the ``/admin``
   route; the parameters are still forwarded.
"""

from __future__ import annotations

import re

# After lower-casing: DNS-ish labels, or an IP literal in brackets.
_HOST_NAME = re.compile(rb"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
# What may need normalising: one C call decides for the common path that needs nothing.
_DOT_OR_EMPTY_SEGMENT = re.compile(rb"/\.|//|%|\\").search
# The escape of an unreserved character (ALPHA DIGIT - . _ ~), RFC 3986 §2.3.
_UNRESERVED_ESCAPE = re.compile(
    rb"%(2[DdEe]|3[0-9]|4[1-9A-Fa-f]|5[0-9Aa]|5[Ff]|6[1-9A-Fa-f]|7[0-9Aa]|7[Ee])"
)
_PARAMS = re.compile(rb";[^/]*")
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
    if b"%" in path:
        path = _UNRESERVED_ESCAPE.sub(_unescape, path)
    segments = path.split(b"/")
    out: list[bytes] = []
    last = b""
    for segment in segments[1:]:
        last = segment
        if not segment:
            continue
        plain = segment
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


def _unescape(escape: re.Match[bytes]) -> bytes:
    return bytes((int(escape.group(1), 16),))


def match_path(path: bytes) -> bytes:
    """A normalised path holding ``;`` as routing compares it: no segment parameters."""
    segments = [s for s in _PARAMS.sub(b"", path).split(b"/") if s]
    trailing = b"/" if segments and path.endswith(b"/") else b""
    return b"/" + b"/".join(segments) + trailing


def drop_segments(path: bytes, count: int) -> bytes:
    """A normalised path without its first ``count`` segments as ``match_path`` counts them."""
    segments = path.split(b"/")
    i = 1
    while count and i < len(segments):
        if _PARAMS.sub(b"", segments[i]):
            count -= 1
        i += 1
    return b"/" + b"/".join(segments[i:])
