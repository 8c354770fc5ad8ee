"""Host/path routing, free of I/O: match syntax, normalisation, the immutable routing table.

The store builds a new ``RoutingTable`` from Redis data off the hot path and swaps it in with
one assignment; the data path asks it "which pool for this request?" once per request.
"""

from redlb.routing.match import BadRoute, Match, RouteSpec, parse_match, parse_route
from redlb.routing.paths import BadPath, normalise_host, normalise_path
from redlb.routing.table import Route, RoutingTable

__all__ = [
    "BadPath",
    "BadRoute",
    "Match",
    "Route",
    "RouteSpec",
    "RoutingTable",
    "normalise_host",
    "normalise_path",
    "parse_match",
    "parse_route",
]
