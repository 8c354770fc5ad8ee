"""Pool edits with plain redis-cli, garbage entries, wrong types, the empty pool."""

from __future__ import annotations

from support import wait_for, wait_resyncs


def _names(proxy, n: int = 9) -> set[str]:
    """Which backends answer ``n`` requests; every request must succeed."""
    names = set()
    for _ in range(n):
        status, body, _ = proxy.get("/")
        assert status == 200, (status, body)
        names.add(body.split()[1].decode())
    return names


def test_redis_cli_edits_reach_redlb_within_one_second(redis_server, backends, start_proxy):
    a, b, c = backends
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    proxies = [start_proxy(redis_server.url) for _ in range(2)]

    redis_server.cli("RPUSH", "servers", c.address)
    for proxy in proxies:
        assert wait_for(lambda p=proxy: "b2" in _names(p, 3), 1.0)

    redis_server.cli("LREM", "servers", "0", a.address)
    for proxy in proxies:
        assert wait_for(lambda p=proxy: _names(p, 3) == {"b1", "b2"}, 1.0)
        assert _names(proxy, 12) == {"b1", "b2"}

    redis_server.cli("DEL", "servers")
    assert wait_for(lambda: proxies[0].get("/")[0] == 503, 1.0)
    status, body, _ = proxies[0].get("/")
    assert status == 503 and b"no backend" in body
    assert len(body) < 200


def test_edits_seen_by_resync_without_notifications(redis_server, backends, start_proxy):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    redis_server.cli("CONFIG", "SET", "notify-keyspace-events", "")
    proxy = start_proxy(redis_server.url)
    # redlb turned notifications on; turn them off again behind its back.
    redis_server.cli("CONFIG", "SET", "notify-keyspace-events", "")
    redis_server.cli("RPUSH", "servers", backends[1].address)
    assert wait_for(lambda: "b1" in _names(proxy, 4), 2.5)


def test_malformed_entries_are_skipped_with_one_warning(redis_server, backends, start_proxy):
    garbage = ["not a server", "127.0.0.1:99999", "ftp://x:1", "http://", "http://a b:80",
               "http://10.0.0.1:80\r\nX-Injected: 1", "\xff\xfe:80", "x" * 5000]  # fmt: skip
    redis_server.cli("RPUSH", "servers", *garbage, backends[0].address)
    proxy = start_proxy(redis_server.url)
    for _ in range(6):
        status, body, _ = proxy.get("/")
        assert status == 200 and body == b"ok b0\n"
    wait_resyncs(redis_server, 2)  # two more reads: still one warning per entry
    log = proxy.log()
    assert log.count("skipping pool entry 'not a server'") == 1
    assert log.count("127.0.0.1:99999") == 1 and "out of range" in log
    assert "unsupported scheme 'ftp'" in log
    assert proxy.alive()


def test_only_garbage_is_a_503(redis_server, start_proxy):
    redis_server.cli("RPUSH", "servers", "nonsense", "ftp://x:1")
    proxy = start_proxy(redis_server.url)
    assert proxy.get("/")[0] == 503


def test_wrong_key_type_keeps_last_known_pool(redis_server, backends, start_proxy):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    assert proxy.get("/")[0] == 200
    with redis_server.client().pipeline(transaction=True) as tx:  # one atomic change
        tx.delete("servers").set("servers", "oops").execute()
    assert wait_for(lambda: "holds a string, not a list" in proxy.log(), 3)
    for _ in range(5):
        assert proxy.get("/")[0] == 200  # still serving what it last knew
    assert proxy.log().count("not a list") == 1  # logged once, not per resync


def test_empty_pool_is_503_with_short_clear_body(redis_server, start_proxy):
    proxy = start_proxy(redis_server.url)
    status, body, resp = proxy.get("/")
    assert status == 503
    assert body == b"503 Service Unavailable: no backend is available\n"
    assert resp.getheader("Content-Type").startswith("text/plain")


def test_pool_changes_are_described_one_line_each():
    from redlb.address import parse_backend
    from redlb.pool import Pool, describe_changes

    now = [100.0]
    pool = Pool(clock=lambda: now[0])
    a, b, c = (parse_backend(f"127.0.0.1:{p}") for p in (1, 2, 3))
    pool.update(members=[a, b])
    start = pool.view()
    pool.update(members=[b, c, c], down=[b], draining=[c], ejected={b: 5.0})
    middle = pool.view()
    assert describe_changes(start, middle) == [
        "backend 127.0.0.1:3 added",
        "backend 127.0.0.1:1 removed",
        "backend 127.0.0.1:3 drained",
        "backend 127.0.0.1:2 ejected",
        "backend 127.0.0.1:2 health down",
    ]
    now[0] += 6  # the ejection ends on time
    pool.update(members=[b], down=[], draining=[c])
    assert describe_changes(middle, pool.view()) == [
        "backend 127.0.0.1:3 removed",  # removed: its drain mark is not news of its own
        "backend 127.0.0.1:2 ejection ended",
        "backend 127.0.0.1:2 health up",
    ]
    assert describe_changes(pool.view(), pool.view()) == []
