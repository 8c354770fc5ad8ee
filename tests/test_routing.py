"""Host/path routing end to end: real redis-server, real backends, real `redlb serve`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from support import HttpBackend, Load, raw_exchange, request, rss_bytes, wait_for


def get(proxy, path: str = "/", host: str = "example.com", **kw):
    headers = {"Host": host, **kw.pop("headers", {})}
    return request(proxy.port, "GET", path, headers=headers, **kw)


def served_by(proxy, path: str = "/", host: str = "example.com") -> str:
    status, body, _ = get(proxy, path, host)
    return body.split()[1].decode() if status == 200 and body.startswith(b"ok ") else str(status)


def redlb(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args, "--redis", redis_url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


@pytest.fixture
def pools(redis_server, backends):
    """Three pools of one backend each: api (b0), web (b1), admin (b2)."""
    a, b, c = backends
    redis_server.cli("RPUSH", "api", a.address)
    redis_server.cli("RPUSH", "web", b.address)
    redis_server.cli("RPUSH", "admin", c.address)
    return backends


def test_routes_by_host_and_path_with_precedence(redis_server, pools, start_proxy):
    for field, value in [("api.example.com/", "api"), ("*.example.com/", "web"),
                         ("/admin", "admin"), ("www.example.com/api", "api")]:  # fmt: skip
        redis_server.cli("HSET", "redlb:routes", field, value)
    proxy = start_proxy(redis_server.url)
    assert served_by(proxy, "/x", "api.example.com") == "b0"
    assert served_by(proxy, "/x", "API.Example.COM.:8000") == "b0"
    assert served_by(proxy, "/", "deep.sub.example.com") == "b1"
    assert served_by(proxy, "/api/v1", "www.example.com") == "b0"
    assert served_by(proxy, "/apix", "www.example.com") == "b1"  # segment boundary
    assert served_by(proxy, "/admin/x", "other.org") == "b2"
    assert served_by(proxy, "/admin", "api.example.com") == "b0"  # exact host beats any host
    # Absolute-form routes by its authority, not by the Host header.
    response, _ = raw_exchange(
        proxy.port,
        b"GET http://api.example.com/x HTTP/1.1\r\nHost: other.org\r\nConnection: close\r\n\r\n",
    )
    assert b"ok b0" in response

    status, body, _ = get(proxy, "/", "other.org")
    assert status == 404 and len(body) < 100 and b"no route" in body
    assert wait_for(lambda: "no route" in proxy.access_log(), 2)
    assert "route=api.example.com/" in proxy.access_log()
    # The connection stays usable after a 404 (it is an answer, not a refusal).
    response, _ = raw_exchange(
        proxy.port,
        b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\nGET / HTTP/1.1\r\nHost: api.example.com\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert b"404 Not Found" in response and b"ok b0" in response


def test_no_routes_means_the_seed_pool_and_removing_routes_goes_back(
    redis_server, pools, start_proxy
):
    redis_server.cli("RPUSH", "servers", pools[2].address)
    proxy = start_proxy(redis_server.url)
    assert served_by(proxy, "/a/../b", "anything") == "b2"
    assert pools[2].received[-1].url == b"/a/../b"  # the seed forwards the target untouched
    assert "route=" not in proxy.access_log()
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    assert wait_for(lambda: served_by(proxy) == "b0", 1.0)
    redis_server.cli("DEL", "redlb:routes")
    assert wait_for(lambda: served_by(proxy) == "b2", 1.0)


def test_path_normalisation_decides_the_route_and_is_forwarded(redis_server, pools, start_proxy):
    redis_server.cli("HSET", "redlb:routes", "/public", "web")
    redis_server.cli("HSET", "redlb:routes", "/", "admin")
    proxy = start_proxy(redis_server.url)
    web, admin = pools[1], pools[2]
    cases = [
        (b"/public/../admin", admin, b"/admin"),
        (b"/public/%2e%2e/admin", admin, b"/admin"),
        (b"/public/./x//y?q=/../", web, b"/public/x/y?q=/../"),
        (b"/public%2F..%2Fadmin", admin, b"/public%2F..%2Fadmin"),  # %2F is not a separator
        (b"/public/a%2Fb", web, b"/public/a%2Fb"),
        (b"//public", web, b"/public"),
        (b"/public/..;/admin", admin, b"/admin"),  # Tomcat reads "..;" as ".."
    ]
    for target, backend, forwarded in cases:
        response, _ = raw_exchange(
            proxy.port, b"GET %b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % target
        )
        assert b" 200 " in response.split(b"\r\n")[0], target
        assert backend.received[-1].url == forwarded, target
    for target in (b"/..", b"/../etc/passwd", b"/public/../../admin", b"/%2e%2e/x",
                   b"/public\\..\\admin"):  # fmt: skip
        before = web.count() + admin.count()
        response, _ = raw_exchange(
            proxy.port, b"GET %b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % target
        )
        assert response.startswith(b"HTTP/1.1 400 "), target
        assert web.count() + admin.count() == before


def test_strip_prefix_and_host_header_seen_by_the_backend(redis_server, pools, start_proxy):
    redis_server.cli(
        "HSET", "redlb:routes", "example.com/api", "api strip-prefix host=internal.svc"
    )
    proxy = start_proxy(redis_server.url)
    status, _, _ = get(proxy, "/api/v1/users?id=7", "example.com")
    assert status == 200
    seen = pools[0].received[-1]
    assert seen.url == b"/v1/users?id=7"
    assert seen.header(b"host") == [b"internal.svc"]
    assert seen.header(b"x-forwarded-host") == [b"example.com"]
    get(proxy, "/api", "example.com")
    assert pools[0].received[-1].url == b"/"


def test_route_to_an_empty_or_missing_pool_is_503_naming_nothing(redis_server, pools, start_proxy):
    redis_server.cli("HSET", "redlb:routes", "/gone", "no-such-list")
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    proxy = start_proxy(redis_server.url)
    status, body, _ = get(proxy, "/gone/x")
    assert status == 503
    assert b"no-such-list" not in body and b"redlb" not in body and len(body) < 100
    assert served_by(proxy, "/x") == "b0"
    redis_server.cli("RPUSH", "no-such-list", pools[1].address)
    assert wait_for(lambda: served_by(proxy, "/gone") == "b1", 1.0)


def test_live_edits_reach_three_instances_within_a_second(redis_server, pools, start_proxy):
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    proxies = [start_proxy(redis_server.url) for _ in range(3)]
    for proxy in proxies:
        assert served_by(proxy, "/x") == "b0"

    def names(proxy, n: int = 4) -> set[str]:
        return {served_by(proxy, "/x") for _ in range(n)}

    edits = [
        (("HSET", "redlb:routes", "/x", "web"), {"b1"}),  # a route added
        (("HSET", "redlb:routes", "/x", "admin"), {"b2"}),  # a route changed
        (("RPUSH", "admin", pools[1].address), {"b1", "b2"}),  # a routed pool edited
        (("HDEL", "redlb:routes", "/x"), {"b0"}),  # a route removed
    ]
    for command, expected in edits:
        redis_server.cli(*command)
        deadline = time.monotonic() + 1.0
        for proxy in proxies:
            assert wait_for(
                lambda p=proxy: names(p) == expected, max(0.0, deadline - time.monotonic())
            ), (command, names(proxy), proxy.log()[-2000:])


def test_atomic_swap_under_load(redis_server, pools, start_proxy):
    """A route present in both tables never fails while the table is replaced many times."""
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port, rate=300, connections=4, path="/stable/x") as load:
        for i in range(60):
            # Each round: a fresh pool (never seen before) and a changed route set.
            pool = f"p{i}"
            redis_server.cli("RPUSH", pool, pools[i % 3].address)
            redis_server.cli("HSET", "redlb:routes", f"/r{i}", pool, "/stable", pool)
            time.sleep(0.03)
            redis_server.cli("HDEL", "redlb:routes", f"/r{i - 1}")
        result = load.stop()
    assert result.sent > 200
    assert result.failed == 0, (result.statuses, result.errors[:5])


def test_malformed_routes_and_settings_skipped_with_one_warning(redis_server, pools, start_proxy):
    garbage = {"a b/": "api", "*/x": "api", "/x": "", "/y": "api bogus-option",
               "/z": "api host=a\tb", "/../w": "api", "é.com/": "api"}  # fmt: skip
    for field, value in garbage.items():
        redis_server.cli("HSET", "redlb:routes", field, value)
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    redis_server.cli("HSET", "redlb:api:settings", "max_conns", "lots", "connect_timeout", "-1",
                     "max_body", "10", "frobnicate", "1")  # fmt: skip
    proxy = start_proxy(redis_server.url)
    assert served_by(proxy, "/y") == "b0"  # /y is skipped: the / route takes it
    status, _, _ = request(proxy.port, "POST", "/", body=b"x" * 100, headers={"Host": "h"})
    assert status == 413  # the valid setting applies
    time.sleep(2.2)  # two resyncs more: still one warning each
    log = proxy.log()
    assert log.count("skipping route") == len(garbage), log
    assert log.count("'/y': unknown option") == 1
    assert log.count("max_conns='lots'") == 1 and log.count("frobnicate") == 1
    assert log.count("connect_timeout='-1'") == 1
    assert "Traceback" not in log


def test_pool_settings_apply_per_pool_and_live(redis_server, pools, start_proxy):
    redis_server.cli("HSET", "redlb:routes", "/small", "api", "/", "web")
    proxy = start_proxy(redis_server.url)
    assert request(proxy.port, "POST", "/small", body=b"x" * 100, headers={"Host": "h"})[0] == 200
    redis_server.cli("HSET", "redlb:api:settings", "max_body", "10")
    assert wait_for(
        lambda: (
            request(proxy.port, "POST", "/small", body=b"x" * 100, headers={"Host": "h"})[0] == 413
        ),
        1.0,
    )
    assert request(proxy.port, "POST", "/", body=b"x" * 100, headers={"Host": "h"})[0] == 200


@pytest.mark.parametrize(
    "host",
    [b"*", b"frontend:x", b"[a-z]*", b"*.example.com", b"a" * 65536, b"a\r\nFLUSHALL",
     b"..", b"x..y", b"%00"],
)  # fmt: skip
def test_hostile_hosts_are_refused_before_redis(redis_server, pools, start_proxy, host):
    redis_server.cli("HSET", "redlb:routes", "/", "api", "*.example.com/", "web")
    proxy = start_proxy(redis_server.url)
    keys_before = redis_server.cli("DBSIZE")
    response, closed = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % host)
    assert response[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431"), response[:80]
    assert closed
    assert pools[0].count() == 0 and pools[1].count() == 0
    assert redis_server.cli("DBSIZE") == keys_before
    assert proxy.alive()


def test_hipache_schema_with_the_readme_commands(redis_server, loop_thread, start_proxy):
    www = HttpBackend(loop_thread, "www").start()
    wild = HttpBackend(loop_thread, "wild").start()
    try:
        # Hipache's README, with loopback backends.
        redis_server.cli("rpush", "frontend:www.dotcloud.com", "mywebsite")
        redis_server.cli("rpush", "frontend:www.dotcloud.com", f"http://{www.address}")
        redis_server.cli("rpush", "frontend:*.dotcloud.com", "mywildcard")
        redis_server.cli("rpush", "frontend:*.dotcloud.com", f"http://{wild.address}")
        redis_server.cli("sadd", "dead:www.dotcloud.com", "0")  # Hipache's own marks: ignored
        proxy = start_proxy(redis_server.url, "--hipache")
        assert served_by(proxy, "/", "www.dotcloud.com") == "www"
        assert served_by(proxy, "/", "WWW.dotcloud.com:80") == "www"
        assert served_by(proxy, "/x", "a.b.dotcloud.com") == "wild"
        assert served_by(proxy, "/", "dotcloud.com") == "404"
        assert "skipping pool entry 'mywebsite'" not in proxy.log()
        # A new frontend written live is served within a second.
        redis_server.cli("rpush", "frontend:api.dotcloud.com", "api")
        redis_server.cli("rpush", "frontend:api.dotcloud.com", f"http://{www.address}")
        assert wait_for(lambda: served_by(proxy, "/", "api.dotcloud.com") == "www", 1.0)
        redis_server.cli("del", "frontend:*.dotcloud.com")
        assert wait_for(lambda: served_by(proxy, "/", "a.dotcloud.com") == "404", 1.0)
    finally:
        www.stop()
        wild.stop()


def test_cli_route_and_pool_commands(redis_server, pools, start_proxy):
    url = redis_server.url
    out = redlb(url, "route", "add", "API.example.com/v1/", "api", "--strip-prefix",
                "--host-header", "svc")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert redis_server.cli("HGET", "redlb:routes", "api.example.com/v1").strip() == (
        "api strip-prefix host=svc"
    )
    assert redlb(url, "route", "add", "/", "web").returncode == 0
    bad = redlb(url, "route", "add", "a b/", "web")
    assert bad.returncode != 0 and "bad route" in bad.stderr
    proxy = start_proxy(url)
    assert served_by(proxy, "/v1/x", "api.example.com") == "b0"
    assert pools[0].received[-1].url == b"/x"
    listing = redlb(url, "route", "ls").stdout
    assert listing.index("api.example.com/v1") < listing.index("web")
    assert "1 backends, 1 usable" in listing

    out = redlb(url, "pool", "set", "api", "max_body=10", "connect_timeout=0.5")
    assert out.returncode == 0, out.stderr
    for bad_args in (["max_body=-5"], ["rotation=random"], ["nonsense=1"], ["max_body"]):
        out = redlb(url, "pool", "set", "api", "connect_timeout=1", *bad_args)
        assert out.returncode != 0 and out.stderr, bad_args
    assert redis_server.cli("HGET", "redlb:api:settings", "connect_timeout").strip() == "0.5"
    shown = redlb(url, "pool", "show", "api").stdout
    assert "max_body           10" in shown and "(serve flag)" in shown
    redis_server.cli("HSET", "redlb:api:settings", "max_conns", "many")
    assert "INVALID" in redlb(url, "pool", "show", "api").stdout
    assert wait_for(
        lambda: request(proxy.port, "POST", "/v1", body=b"x" * 50,
                        headers={"Host": "api.example.com"})[0] == 413, 1.0
    )  # fmt: skip

    assert redlb(url, "route", "rm", "api.example.com/v1/").returncode == 0
    assert redlb(url, "route", "rm", "api.example.com/v1").returncode != 0
    assert wait_for(lambda: served_by(proxy, "/v1/x", "api.example.com") == "b1", 1.0)


def test_metrics_name_route_and_pool(redis_server, pools, start_proxy):
    redis_server.cli("HSET", "redlb:routes", "api.example.com/", "api")
    proxy = start_proxy(redis_server.url)
    get(proxy, "/", "api.example.com")
    metrics = proxy.status("/metrics")[1].decode()
    assert 'redlb_route_healthy{pool="api",route="api.example.com/"} 1.0' in metrics
    assert 'redlb_pool_requests_total{pool="api"} 1.0' in metrics


def test_ten_thousand_routes(redis_server, backends, start_proxy):
    """5,000 exact hosts, 1,000 wildcards, 4,000 path prefixes over 1,000 pools."""
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for p in range(1000):
        pipe.rpush(f"pool{p}", backends[p % 3].address)
    routes = {}
    for i in range(5000):
        routes[f"host{i}.example.com/"] = f"pool{i % 1000}"
    for i in range(1000):
        routes[f"*.wild{i}.example.org/"] = f"pool{(i * 7) % 1000}"
    for i in range(4000):
        routes[f"/svc{i}/v{i % 3}"] = f"pool{(i * 13) % 1000}"
    pipe.hset("redlb:routes", mapping=routes)
    pipe.execute()
    proxy = start_proxy(redis_server.url)
    assert wait_for(lambda: b"10000 routes" in proxy.log().encode(), 10), proxy.log()[-2000:]

    def backend_of(host: str, path: str) -> str:
        status, body, _ = get(proxy, path, host)
        return body.split()[1].decode() if status == 200 else str(status)

    for i in (0, 1234, 4999):
        assert backend_of(f"host{i}.example.com", "/") == f"b{(i % 1000) % 3}"
    for i in (0, 999):
        assert backend_of(f"a.b.wild{i}.example.org", "/x") == f"b{((i * 7) % 1000) % 3}"
    for i in (5, 3999):
        assert backend_of("other", f"/svc{i}/v{i % 3}/deep") == f"b{((i * 13) % 1000) % 3}"
    assert backend_of("other", "/svc5/v9") == "404"
    # Memory: the worker with the table loaded, against a worker with one pool.
    loaded = rss_bytes(proxy.pid)
    client.delete("redlb:routes")
    client.rpush("servers", backends[0].address)
    small = start_proxy(redis_server.url)
    baseline = rss_bytes(small.pid)
    print(f"\nRSS with 10,000 routes / 1,000 pools: {loaded / 2**20:.1f} MiB; "
          f"one pool: {baseline / 2**20:.1f} MiB; delta {(loaded - baseline) / 2**20:.1f} MiB")  # fmt: skip
    assert loaded - baseline < 64 * 2**20


def test_each_pool_has_its_own_health_checks(redis_server, pools, start_proxy):
    """health_path set on one pool: its prober takes a failing backend out of that pool only."""
    a, b, _ = pools
    redis_server.cli("RPUSH", "api", b.address)  # api: b0 healthy, b1 failing its checks
    redis_server.cli("RPUSH", "web", a.address)  # web: b1 and b0, no health checks
    redis_server.cli("HSET", "redlb:routes", "/api", "api", "/", "web")
    redis_server.cli("HSET", "redlb:api:settings", "health_path", "/healthz",
                     "health_interval", "0.1")  # fmt: skip
    b.behaviour.status = 500
    proxy = start_proxy(redis_server.url, "--eject-consecutive", "0")  # only the prober decides
    assert wait_for(lambda: {served_by(proxy, "/api") for _ in range(4)} == {"b0"}, 5)
    assert redis_server.cli("GET", f"redlb:api:health:{b.address}").strip() == "down", (
        proxy.log(),
        redis_server.cli("KEYS", "*"),
    )
    statuses = {get(proxy, "/")[0] for _ in range(4)}
    assert statuses == {200, 500}  # the web pool has no health checks: b1 still serves there


def test_redis_losing_its_data_keeps_the_last_known_routes(redis_server, pools, start_proxy):
    """FLUSHALL (or a restart without persistence) is not "all routes deleted"."""
    redis_server.cli("HSET", "redlb:routes", "api.example.com/", "api", "/", "web")
    proxy = start_proxy(redis_server.url)
    assert served_by(proxy, "/", "api.example.com") == "b0"
    redis_server.cli("FLUSHALL")
    assert wait_for(lambda: "redlb:routes and its epoch are both gone" in proxy.log(), 3)
    assert served_by(proxy, "/", "api.example.com") == "b0"
    assert served_by(proxy, "/", "other") == "b1"
    # Deleting the routes on purpose (the epoch is there again once routes are read) works.
    redis_server.cli("HSET", "redlb:routes", "/", "admin")
    redis_server.cli("RPUSH", "admin", pools[2].address)
    assert wait_for(lambda: served_by(proxy, "/", "api.example.com") == "b2", 1.0)
    redis_server.cli("RPUSH", "servers", pools[0].address)
    redis_server.cli("DEL", "redlb:routes")
    assert wait_for(lambda: served_by(proxy, "/", "x") == "b0", 1.0)


def test_routes_without_scripting_rights(redis_server, pools, start_proxy):
    """An ACL user that may not EVAL still gets routes (read whole on each resync)."""
    redis_server.cli("ACL", "SETUSER", "lb", "on", ">secret", "~*", "&*", "+@all",
                     "-eval", "-evalsha")  # fmt: skip
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    proxy = start_proxy(f"redis://lb:secret@127.0.0.1:{redis_server.port}/0")
    assert served_by(proxy) == "b0"
    redis_server.cli("HSET", "redlb:routes", "/", "web")
    assert wait_for(lambda: served_by(proxy) == "b1", 1.0)
    assert proxy.log().count("cannot run a script") == 1


def test_each_pool_keeps_drain_and_its_own_rotation(redis_server, pools, start_proxy):
    a, b, c = pools
    redis_server.cli("RPUSH", "api", b.address, c.address)  # api: b0 b1 b2
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    redis_server.cli("HSET", "redlb:api:settings", "rotation", "strict")
    proxy = start_proxy(redis_server.url)
    order = [served_by(proxy) for _ in range(6)]
    assert sorted(order[:3]) == ["b0", "b1", "b2"] and order[:3] == order[3:]
    assert redis_server.cli("GET", "redlb:api:rr").strip() not in ("", "0")
    out = redlb(redis_server.url, "backend", "drain", b.address, "--pool", "api")
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: {served_by(proxy) for _ in range(6)} == {"b0", "b2"}, 1.0)


def test_routes_and_settings_of_the_wrong_type_keep_what_was_known(
    redis_server, pools, start_proxy
):
    redis_server.cli("HSET", "redlb:routes", "/", "api")
    redis_server.cli("HSET", "redlb:api:settings", "max_body", "10")
    proxy = start_proxy(redis_server.url)
    assert served_by(proxy) == "b0"
    with redis_server.client() as client:  # one transaction: never "no routes" in between
        client.pipeline(transaction=True).set("redlb:routes", "oops").set(
            "redlb:api:settings", "oops"
        ).execute()
    time.sleep(2.2)  # two resyncs: still served, each problem said once
    assert served_by(proxy) == "b0"
    assert request(proxy.port, "POST", "/", body=b"x" * 50, headers={"Host": "h"})[0] == 413
    log = proxy.log()
    assert log.count("redlb:routes holds a string") == 1, log
    assert log.count("cannot read redlb:api:settings") == 1, log
    assert "unreachable" not in log
    redis_server.cli("DEL", "redlb:routes")
    redis_server.cli("HSET", "redlb:routes", "/", "web")
    assert wait_for(lambda: served_by(proxy) == "b1", 1.0)
