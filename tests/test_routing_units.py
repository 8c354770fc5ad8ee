"""The routing table, match syntax, path normalisation and pool settings, without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redlb.config import Config
from redlb.routing import BadPath, BadRoute, RoutingTable, normalise_host, normalise_path
from redlb.routing.hipache import frontend_route
from redlb.routing.match import ANY, EXACT, WILDCARD, Match, RouteSpec, parse_match, parse_route
from redlb.routing.settings import parse_settings, resolve

# Reference matcher: every route checked, the most specific wins.


def _host_matches(m: Match, host: str) -> bool:
    if m.kind == ANY:
        return True
    if m.kind == EXACT:
        return host == m.host
    return host.endswith(m.host) and len(host) > len(m.host)


def _path_matches(m: Match, path: str) -> bool:
    return m.prefix == "/" or path == m.prefix or path.startswith(m.prefix + "/")


def reference(specs: list[RouteSpec], host: str, path: str) -> RouteSpec | None:
    candidates = [s for s in specs if _host_matches(s.match, host) and _path_matches(s.match, path)]
    if not candidates:
        return None
    return max(candidates, key=lambda s: s.match.priority)


labels = st.sampled_from(["a", "b", "api", "x-1", "www"])
hosts = st.lists(labels, min_size=1, max_size=4).map(".".join)
segments = st.sampled_from(["api", "v1", "x", "apix", "a", "static"])
prefixes = st.lists(segments, max_size=3).map(lambda s: "/" + "/".join(s))
matches = st.one_of(
    st.builds(lambda h, p: Match(EXACT, h, p), hosts, prefixes),
    st.builds(lambda h, p: Match(WILDCARD, "." + h, p), hosts, prefixes),
    st.builds(lambda p: Match(ANY, "", p), prefixes),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(matches, max_size=25, unique=True),
    hosts,
    st.lists(segments, max_size=5).map(lambda s: "/" + "/".join(s)),
    st.booleans(),
)
def test_table_agrees_with_the_reference_matcher(ms, host, path, slash):
    if slash and path != "/":
        path += "/"
    specs = [RouteSpec(m, f"pool{i}") for i, m in enumerate(ms)]
    table = RoutingTable.build(specs, {s.pool: s.pool for s in specs})
    expected = reference(specs, host, path.rstrip("/") or "/")
    found = table.find(host.encode(), path.encode())
    assert (found.spec if found else None) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(matches, min_size=1, max_size=10, unique=True), hosts)
def test_parse_match_round_trips(ms, host):
    for m in ms:
        assert parse_match(str(m)) == m


def test_precedence_examples():
    routes = {
        "api.example.com/api": "exact-api",
        "api.example.com/": "exact-root",
        "*.example.com/": "wild",
        "*.b.example.com/": "wild-longer",
        "/api": "any-api",
        "/": "any",
    }
    specs = [parse_route(k, v) for k, v in routes.items()]
    table = RoutingTable.build(specs, {v: v for v in routes.values()})

    def pool(host: str, target: str) -> str | None:
        route, _ = table.resolve(host.encode(), target.encode())
        return route.target if route else None

    assert pool("api.example.com", "/api/x") == "exact-api"
    assert pool("API.Example.com.:8080", "/api") == "exact-api"
    assert pool("api.example.com", "/apix") == "exact-root"
    assert pool("z.example.com", "/api") == "wild"
    assert pool("a.b.example.com", "/") == "wild-longer"
    assert pool("deep.a.b.example.com", "/") == "wild-longer"
    assert pool("example.com", "/api/") == "any-api"
    assert pool("other", "/apix") == "any"
    assert pool("", "/api") == "any-api"


def test_no_match_and_single():
    table = RoutingTable.build([parse_route("a.com/x", "p")], {"p": "p"})
    assert table.resolve(b"a.com", b"/y")[0] is None
    assert table.resolve(b"b.com", b"/x")[0] is None
    default = RoutingTable.default("servers", "servers")
    assert default.single is not None and default.single.target == "servers"


def test_strip_prefix_and_host_header():
    spec = parse_route("/api", "p strip-prefix host=internal:8080")
    table = RoutingTable.build([spec], {"p": "p"})
    route, target = table.resolve(b"x", b"/api/v1/users?q=/api")
    assert route is not None and target == b"/v1/users?q=/api"
    assert route.host_header == b"internal:8080"
    assert table.resolve(b"x", b"/api")[1] == b"/"
    assert table.resolve(b"x", b"/api/")[1] == b"/"
    assert table.resolve(b"x", b"/apix")[0] is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/", b"/"),
        (b"/a/b", b"/a/b"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/public/%2E./admin", b"/admin"),
        (b"/a//b///c", b"/a/b/c"),
        (b"/a/b/", b"/a/b/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/%2F../b", b"/a/%2F../b"),  # one segment: %2F is not a separator
        (b"/a%2Fb/c", b"/a%2Fb/c"),
        (b"/a%2fb", b"/a%2fb"),
        (b"/..a/b.", b"/..a/b."),
        (b"/a/..", b"/"),
        (b"/public/..;/admin", b"/admin"),
        (b"/public/.;x/a", b"/public/a"),
        (b"/a;v=1/b", b"/a;v=1/b"),
    ],
)
def test_normalise_path(raw, expected):
    assert normalise_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [b"/..", b"/../x", b"/a/../../b", b"/%2e%2e/etc/passwd", b"/./..", b"/..;/x", b"/a\\..\\b"],
)
def test_dot_dot_above_root_is_refused(raw):
    with pytest.raises(BadPath):
        normalise_path(raw)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", ".", "..", "", "%2e", "%2F", "b%2E"]), max_size=8))
def test_normalised_paths_are_fixed_points_without_dot_segments(parts):
    raw = ("/" + "/".join(parts)).encode()
    try:
        out = normalise_path(raw)
    except BadPath:
        return
    assert normalise_path(out) == out
    segs = out.split(b"/")[1:]
    assert not any(s.lower() in (b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e.") for s in segs)
    assert b"//" not in out


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b"Example.COM", b"example.com"), (b"example.com.", b"example.com"),
     (b"example.com:8080", b"example.com"), (b"[::1]:80", b"[::1]"), (b"10.0.0.1", b"10.0.0.1")],
)  # fmt: skip
def test_normalise_host(raw, expected):
    assert normalise_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [b"*", b"*.example.com", b".example.com", b"a..b", b"frontend%3Ax", b"a$b", b"x" * 5 + b"!"],
)
def test_hostile_hosts_are_refused(raw):
    with pytest.raises(BadPath):
        normalise_host(raw)


@pytest.mark.parametrize(
    ("field", "value"),
    [("", "p"), ("a b/", "p"), ("*/x", "p"), ("a.*.com/", "p"), ("/x", ""), ("/x", "redlb:x"),
     ("/x", "p bogus"), ("/x", "p host=a\r\nb"), ("/../x", "p"), ("/x?y", "p"), ("é.com/", "p"),
     ("/x", "p host=")],
)  # fmt: skip
def test_malformed_routes_are_refused(field, value):
    with pytest.raises(BadRoute):
        parse_route(field, value)


def test_route_value_round_trips():
    spec = parse_route("Api.Example.com./v1/", "api strip-prefix host=svc")
    assert str(spec.match) == "api.example.com/v1"
    assert parse_route(str(spec.match), spec.value()) == spec


def test_pool_settings_skip_bad_values_naming_the_key():
    overrides, problems = parse_settings(
        {"connect_timeout": "0.5", "max_conns": "-1", "rotation": "random", "bogus": "1",
         "health_path": "/healthz", "retry_budget": "nan", "max_body": "100"}
    )  # fmt: skip
    assert overrides == {"connect_timeout": 0.5, "health_path": "/healthz", "max_body": 100}
    assert len(problems) == 4
    assert any("max_conns" in p for p in problems) and any("bogus" in p for p in problems)
    base = Config()
    config = resolve(base, overrides)
    assert config.connect_timeout == 0.5 and base.connect_timeout == 3.0
    assert config.max_conns_per_backend == base.max_conns_per_backend


def test_hipache_frontends():
    assert str(frontend_route("frontend:www.dotcloud.com").match) == "www.dotcloud.com/"
    assert frontend_route("frontend:*.dotcloud.com").match.kind == WILDCARD
    assert frontend_route("frontend:*").match.kind == ANY
    assert frontend_route("frontend:www.dotcloud.com").list_start == 1
    for bad in ("frontend:", "frontend:a/b", "frontend:a b"):
        with pytest.raises(BadRoute):
            frontend_route(bad)
