"""Hipache's schema as routes: ``frontend:HOST`` lists of an identifier then backend URLs.

``frontend:www.example.com`` serves that host, ``frontend:*.example.com`` its subdomains at any
depth (longest suffix first, as Hipache looks them up), ``frontend:*`` any other host.  Each
list is its own pool, read from its second element on.  Hipache's ``dead:HOST`` keys are not
read: redlb keeps health and ejection under its own keys.
"""

from __future__ import annotations

from redlb.routing.match import BadRoute, RouteSpec, parse_match

PREFIX = "frontend:"
SCAN_PATTERN = "frontend:*"


def frontend_route(key: str) -> RouteSpec:
    """The route a ``frontend:HOST`` key stands for; BadRoute if HOST is not a host name."""
    host = key[len(PREFIX) :]
    if "/" in host or not host:
        raise BadRoute(f"{key[:80]!r} does not name a host")
    match = parse_match("/" if host == "*" else host + "/")
    return RouteSpec(match, key, list_start=1)
