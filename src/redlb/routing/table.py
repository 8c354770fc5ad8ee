"""The routing table: an immutable snapshot answering "which route for this host and path?".

Precedence (Envoy picks a virtual host by domain, then a route inside it; Traefik sorts rules
by specificity): among the routes whose host and path prefix both match, the most specific
host wins (exact, then the longest ``*.suffix``, then any host), then the longest prefix.
A host whose routes match no prefix of the path falls through to the less specific hosts.

Lookup is a dict get on the host, one per dot of the host for wildcards, then a walk up the
path's segment boundaries bounded by the longest prefix configured for that host: the cost
does not grow with the number of hosts or routes, and no regular expression is involved.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from redlb.routing.match import ANY, EXACT, Match, RouteSpec
from redlb.routing.paths import (
    drop_segments,
    match_path,
    normalise_host,
    normalise_path,
)

T = TypeVar("T")


class Route(Generic[T]):
    """One route, never changed once made (a new table makes new ones).  A plain class:
    mypyc compiles no generic dataclass (build.py)."""

    __slots__ = ("host_header", "label", "prefix", "spec", "strip", "target")

    def __init__(
        self,
        spec: RouteSpec,
        target: T,  # what serves the pool (the data path's per-pool state)
        label: bytes,  # the match as written, for the access log and metrics
        prefix: bytes,
        strip: bool,  # strip a prefix other than "/"
        host_header: bytes | None,
    ) -> None:
        self.spec = spec
        self.target = target
        self.label = label
        self.prefix = prefix
        self.strip = strip
        self.host_header = host_header

    def __repr__(self) -> str:
        return f"Route({self.label!r} -> {self.spec.pool!r})"


def make_route(spec: RouteSpec, target: T) -> Route[T]:
    match = spec.match
    prefix = match.label[match.label.index(b"/") :]
    host_header = spec.host_header.encode() if spec.host_header else None
    strip = spec.strip_prefix and prefix != b"/"
    return Route(spec, target, match.label, prefix, strip, host_header)


class _HostRoutes(Generic[T]):
    """The routes of one host (or suffix, or any host), keyed by path prefix."""

    __slots__ = ("by_prefix", "longest", "root")

    def __init__(self, routes: dict[bytes, Route[T]]) -> None:
        self.by_prefix = routes
        self.longest = max(len(p) for p in routes)
        self.root = routes.get(b"/")

    def find(self, path: bytes) -> Route[T] | None:
        get = self.by_prefix.get
        if len(path) <= self.longest:
            route = get(path)
            if route is not None:
                return route
            end = len(path)
        else:
            end = self.longest + 1  # a '/' at index `longest` ends the longest candidate
        while True:
            end = path.rfind(b"/", 0, end)
            if end <= 0:
                return self.root
            route = get(path[:end])
            if route is not None:
                return route


class RoutingTable(Generic[T]):
    """Built once from a route list, then only read; replaced whole, never edited."""

    __slots__ = ("any", "exact", "routes", "single", "version", "wildcards")

    def __init__(self, routes: Iterable[Route[T]], version: int = 0) -> None:
        self.routes: tuple[Route[T], ...] = tuple(routes)
        self.version = version
        self.exact: dict[bytes, _HostRoutes[T]] = {}
        self.wildcards: dict[bytes, _HostRoutes[T]] = {}
        self.any: _HostRoutes[T] | None = None
        # No routes configured: one catch-all route, and the data path skips routing entirely.
        self.single: Route[T] | None = None
        for _ in self._index(0):
            pass

    def _index(self, step: int) -> Iterator[None]:
        """Group the routes by host; yield every ``step`` groups when step > 0."""
        grouped: dict[tuple[int, str], dict[bytes, Route[T]]] = {}
        for count, route in enumerate(self.routes, 1):
            m = route.spec.match
            grouped.setdefault((m.kind, m.host), {})[route.prefix] = route
            if step and count % step == 0:
                yield None
        for count, ((kind, host), by_prefix) in enumerate(grouped.items(), 1):
            entry = _HostRoutes(by_prefix)
            if kind == EXACT:
                self.exact[host.encode()] = entry
            elif kind == ANY:
                self.any = entry
            else:
                self.wildcards[host.encode()] = entry
            if step and count % step == 0:
                yield None

    @classmethod
    def default(cls, target: T, pool: str) -> RoutingTable[T]:
        """The seed's behaviour: everything goes to one pool, the request is not rewritten."""
        spec = RouteSpec(Match(ANY, "", "/"), pool)
        route = Route(spec, target, b"", b"/", False, None)
        table = cls([route])
        table.single = route
        return table

    @classmethod
    def build(
        cls, specs: Iterable[RouteSpec], targets: Mapping[str, T], version: int = 0
    ) -> RoutingTable[T]:
        """Routes whose pool has no target are left out (the caller made one for each)."""
        for table in cls.build_in_steps(specs, targets, version):
            if table is not None:
                return table
        raise AssertionError("build_in_steps ends with the table")

    @classmethod
    def build_in_steps(
        cls, specs: Iterable[RouteSpec], targets: Mapping[str, T], version: int = 0, step: int = 500
    ) -> Iterator[RoutingTable[T] | None]:
        """build(), yielding None after every ``step`` routes, then the table: a caller on an
        event loop lets requests run in between, so a big table never stalls them."""
        routes = []
        for count, spec in enumerate(specs, 1):
            target = targets.get(spec.pool)
            if target is not None:
                routes.append(make_route(spec, target))
            if count % step == 0:
                yield None
        table = cls([], version)
        table.routes = tuple(routes)
        yield from table._index(step)  # not visible to anyone before it is complete
        yield table

    def find(self, host: bytes, path: bytes) -> Route[T] | None:
        """The route for a normalised host (b"" for none) and normalised path."""
        entry = self.exact.get(host)
        if entry is not None:
            route = entry.find(path)
            if route is not None:
                return route
        if self.wildcards:
            get = self.wildcards.get
            dot = host.find(b".")
            while dot >= 0:  # ".b.example.com", then ".example.com", ...: longest first
                entry = get(host[dot:])
                if entry is not None:
                    route = entry.find(path)
                    if route is not None:
                        return route
                dot = host.find(b".", dot + 1)
        if self.any is not None:
            return self.any.find(path)
        return None

    def resolve(self, host: bytes | None, target: bytes) -> tuple[Route[T] | None, bytes]:
        """Route an origin-form target; return the route and the target to forward.

        Raises BadPath for a host or path that cannot be routed (answered with 400).
        """
        name = normalise_host(host) if host else b""
        if target[:1] != b"/":
            return self.find(name, b"/"), target  # OPTIONS *
        query = b""
        mark = target.find(b"?")
        path = target
        if mark >= 0:
            path, query = target[:mark], target[mark:]
        path = normalise_path(path)
        if b";" in path:  # segment parameters: matched without them (paths.py rule 3)
            route = self.find(name, match_path(path))
            if route is not None and route.strip:
                path = drop_segments(path, route.prefix.count(b"/"))
            return route, path + query if query else path
        route = self.find(name, path)
        if route is not None and route.strip:
            path = path[len(route.prefix) :] or b"/"
            if path[0] != 0x2F:
                path = b"/" + path
        return route, path + query if query else path
