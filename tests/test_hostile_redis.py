"""Redis from the attacker's side: lost data, stalls, rotated passwords, forbidden commands.

Every test runs real redis-server and redlb processes. Under load the bar is zero failed
requests to healthy backends, a status listener that keeps answering, and a bounded number of
Redis connections and reconnect attempts per instance.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from support import HttpBackend, Load, Proxy, RedisProcess, metric, wait_for, wait_resyncs

pytestmark = pytest.mark.slow


def _seed(redis_server: RedisProcess, backends: list[HttpBackend]) -> None:
    redis_server.cli("RPUSH", "servers", *[b.address for b in backends])


def _connections_received(client) -> int:  # type: ignore[no-untyped-def]
    return int(client.info("stats")["total_connections_received"])


@contextmanager
def _live_probe(proxy: Proxy, interval: float = 0.2) -> Iterator[list[int]]:
    """Poll /-/live (2 s client timeout) while the block runs; yields the statuses seen."""
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.append(proxy.status("/-/live")[0])
            stop.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)


# 13: lost data is not undone by an instance that knows no pool


def test_new_instance_does_not_turn_lost_data_into_an_empty_pool(
    redis_server, backends, start_proxy
):
    _seed(redis_server, backends[:2])
    old = start_proxy(redis_server.url)
    assert old.get("/")[0] == 200
    redis_server.client().flushall()
    assert wait_for(lambda: "Redis lost its data" in old.log(), 3), old.log()
    with Load(old.port) as load:
        new = start_proxy(redis_server.url)  # knows no pool; sees an empty Redis
        assert new.get("/")[0] == 503  # it has nothing to serve, and says so
        wait_resyncs(redis_server, 6)  # both instances read the empty Redis again
    result = load.stop()
    assert result.sent > 100 and result.failed == 0, (result.statuses, result.errors)
    assert not redis_server.client().exists("redlb:servers:epoch")
    # The pool written again is followed by both, and from then on empty is empty.
    redis_server.cli("RPUSH", "servers", backends[2].address)
    for proxy in (old, new):
        assert wait_for(lambda p=proxy: p.get("/")[1] == b"ok b2\n", 3)
    redis_server.cli("DEL", "servers")
    assert wait_for(lambda: old.get("/")[0] == 503, 3)


# 14: a log reader that stops reading never stalls the proxy


def test_stdout_nobody_reads_never_blocks_the_worker(redis_server, backends, start_proxy, tmp_path):
    _seed(redis_server, backends)
    proxy = Proxy(redis_server.url, workdir=tmp_path / "piped")
    os.mkfifo(proxy.out_path)  # redlb's stdout becomes a pipe that is never read
    reader = os.open(proxy.out_path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)  # full after ~80 lines
    try:
        proxy.start()
        long_path = "/" + "a" * 4000  # ~250-byte lines (the log shortens targets)
        with _live_probe(proxy) as live, Load(proxy.port, rate=200, path=long_path) as load:
            time.sleep(7)  # 1,400 lines: more than redlb's own 256 KiB buffer holds
        result = load.stop()
        assert result.sent > 500 and result.failed == 0, (result.statuses, result.errors)
        assert live and set(live) == {200}, live
        dropped = metric(proxy, "redlb_access_log_dropped")
        assert dropped is not None and dropped > 0
        # What fitted in the pipe is whole lines, and the log goes on once it is read again.
        first = os.read(reader, 1 << 20)
        assert first.startswith(b"GET /aaaa") and b" => 200 OK" in first
        proxy.get("/short")
        seen = bytearray()
        assert wait_for(lambda: b"GET /short => 200" in _read_available(reader, seen), 5)
    finally:
        proxy.stop(timeout=10)
        os.close(reader)


def _read_available(fd: int, into: bytearray) -> bytearray:
    """Everything read from ``fd`` so far (it is non-blocking)."""
    try:
        into += os.read(fd, 1 << 20)
    except BlockingIOError:
        pass
    return into


# 15: a worker killed mid-refill does not stop the shared rotation for good


def test_worker_killed_mid_refill_does_not_freeze_the_shared_counter(
    redis_server, backends, start_proxy
):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--workers", "2", "--redis-timeout", "30")
    parent = psutil.Process(proxy.pid)
    assert wait_for(lambda: len(parent.children()) == 2, 5)
    client = redis_server.client()
    with Load(proxy.port, rate=200) as load:
        time.sleep(1)
        redis_server.process.send_signal(signal.SIGSTOP)  # the next lease hangs in flight
        try:
            time.sleep(3)  # the leased blocks run out: a refill is pending
            workers = parent.children()
            for worker in workers:
                worker.kill()
            assert wait_for(
                lambda: (
                    len(parent.children()) == 2
                    and not {c.pid for c in parent.children()} & {w.pid for w in workers}
                ),
                10,
            )
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert wait_for(proxy.ready, 10)
        counter = int(client.get("redlb:servers:rr") or 0)
        # Under load the restarted workers lease new blocks from the shared counter again.
        assert wait_for(lambda: int(client.get("redlb:servers:rr") or 0) > counter, 8), counter
    result = load.stop()
    assert result.sent > 500


# 16: a prober taking over a failing backend starts from the shared verdict


def test_prober_taking_over_keeps_a_failing_backend_down(redis_server, loop_thread, start_proxy):
    checked = [HttpBackend(loop_thread, f"h{i}").start() for i in range(2)]
    try:
        _seed(redis_server, checked)
        args = ("--health-path", "/healthz", "--health-interval", "0.5", "--health-fall", "3",
                "--health-rise", "2", "--eject-consecutive", "0")  # fmt: skip
        client = redis_server.client()
        bad = checked[1]
        health_key = f"redlb:servers:health:{bad.address}"
        lease_key = f"redlb:servers:probe:{bad.address}"
        first = start_proxy(redis_server.url, *args)
        assert wait_for(lambda: client.get(lease_key) is not None, 3)
        second = start_proxy(redis_server.url, *args)
        bad.behaviour.status = 503
        assert wait_for(lambda: client.get(health_key) == b"down", 5)
        owner = client.get(lease_key)
        # The prober of a backend is the instance that logged its verdict.
        prober, other = (first, second) if "is DOWN" in first.log() else (second, first)
        assert "is DOWN" in prober.log() and "is DOWN" not in other.log()
        prober.process.kill()
        prober.process.wait()
        samples = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            samples.append(client.get(health_key))
            if client.get(lease_key) not in (None, owner) and len(samples) > 50:
                break
            time.sleep(0.02)
        assert client.get(lease_key) not in (None, owner)  # the other instance took over
        assert set(samples) == {b"down"}, {s: samples.count(s) for s in set(samples)}
        names = {other.get("/")[1] for _ in range(6)}
        assert names == {b"ok h0\n"}
    finally:
        for b in checked:
            b.stop()


# 17: Redis back after an outage is noticed within a second or two, with cheap retries


def test_edit_after_redis_returns_is_applied_promptly(redis_server, backends, start_proxy):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        for round_ in range(2):
            redis_server.kill()
            time.sleep(7)  # long enough for any backoff to reach its cap
            redis_server.start()
            time.sleep(1)
            redis_server.cli("RPUSH" if round_ == 0 else "LREM", "servers", *(
                [backends[2].address] if round_ == 0 else ["0", backends[2].address]))  # fmt: skip
            if round_ == 0:
                assert wait_for(lambda: backends[2].count() > 0, 2), proxy.log()
            else:
                assert wait_for(lambda: metric(proxy, "redlb_pool_members") == 2, 2), proxy.log()
    result = load.stop()
    assert result.failed == 0, result.errors


def test_reconnect_attempts_are_about_one_a_second(tmp_path, start_proxy):
    redis = RedisProcess(tmp_path / "auth", extra=["--requirepass", "s3cret"]).start_unchecked()
    try:
        # A password refused at start ends `serve` (defect 22): it is refused later instead.
        start_proxy(f"redis://:s3cret@127.0.0.1:{redis.port}/0", ready=False)
        admin = redis.client_with_password("s3cret")
        admin.config_set("requirepass", "changed")
        admin = redis.client_with_password("changed")
        for kind in ("normal", "pubsub"):  # every session redlb had must start again
            admin.client_kill_filter(_type=kind, skipme=True)
        time.sleep(4)  # past the first quick retries
        before = _connections_received(admin)
        time.sleep(6)
        attempts = _connections_received(admin) - before
        assert 3 <= attempts <= 7, attempts
    finally:
        redis.kill()


# 18: changing the user's Redis configuration is said once; forbidden CONFIG still works


def test_enabling_keyspace_notifications_is_logged_with_old_and_new(
    redis_server, backends, start_proxy
):
    redis_server.cli("CONFIG", "SET", "notify-keyspace-events", "Ex")
    _seed(redis_server, backends[:1])
    proxy = start_proxy(redis_server.url)
    second = start_proxy(redis_server.url)  # finds them on: nothing to say
    wanted = redis_server.cli("CONFIG", "GET", "notify-keyspace-events").split()[1]
    assert set(wanted) >= set("ExKlg")
    wait_resyncs(redis_server, 4)
    said = re.findall(r"notify-keyspace-events from '(\w*)' to '(\w*)'", proxy.log())
    assert len(said) == 1, proxy.log()
    assert set(said[0][0]) == set("Ex") and set(said[0][1]) == set(wanted)
    assert "notify-keyspace-events" not in second.log()


@pytest.mark.parametrize("forbid", ["rename", "acl", "acl-no-channels"])
def test_works_where_config_is_forbidden(tmp_path, backends, start_proxy, forbid):
    extra = ["--rename-command", "CONFIG", ""] if forbid == "rename" else []
    redis = RedisProcess(tmp_path / "r", extra=extra).start()
    try:
        url = redis.url
        if forbid.startswith("acl"):
            channels = "resetchannels" if forbid == "acl-no-channels" else "&*"
            redis.cli("ACL", "SETUSER", "redlb", "on", ">pw", "~*", channels, "+@all", "-config")
            url = f"redis://redlb:pw@127.0.0.1:{redis.port}/0"
        redis.cli("RPUSH", "servers", backends[0].address)
        proxy = start_proxy(url)
        redis.cli("RPUSH", "servers", backends[1].address)
        assert wait_for(lambda: proxy.get("/")[1] == b"ok b1\n", 3)
        assert {proxy.get("/")[1] for _ in range(4)} == {b"ok b0\n", b"ok b1\n"}
        wait_resyncs(redis, 3)
        log = proxy.log()
        assert log.count("cannot enable keyspace notifications") == 1, log
        assert log.count("cannot subscribe") == (forbid == "acl-no-channels"), log
        assert "refused a command" not in log and log.count("Redis at") == 1, log
    finally:
        redis.kill()


# 22: the Redis password rotated while running


def _rotate_password(redis_server: RedisProcess, password: str) -> None:
    admin = redis_server.client()
    admin.config_set("requirepass", password)
    # Connections already open stay authenticated; drop redlb's so it must log in again.
    for kind in ("normal", "pubsub"):
        admin.client_kill_filter(_type=kind, skipme=True)


def test_password_rotated_under_load_keeps_serving_and_logs_once(
    redis_server, backends, start_proxy
):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url, "--health-path", "/", "--health-interval", "0.5")
    with _live_probe(proxy) as live, Load(proxy.port) as load:
        time.sleep(1)
        _rotate_password(redis_server, "n3wpass")
        assert wait_for(lambda: "ERROR redlb.redis" in proxy.log(), 5)
        time.sleep(4)  # a few retries and health rounds
    result = load.stop()
    assert result.sent > 300 and result.failed == 0, result.errors  # a slow machine sends fewer
    assert set(live) == {200}
    log = proxy.log()
    assert "n3wpass" not in log and "HELLO must be called" not in log
    assert log.count("refused redlb's password") == 1, log
    assert proxy.status("/-/ready")[0] == 200  # the last-known pool is still served


# 24: every pool change is logged once, on every instance


def test_pool_changes_are_logged_once_per_instance(redis_server, backends, start_proxy):
    a, b, c = backends
    _seed(redis_server, [a, b])
    proxies = [start_proxy(redis_server.url) for _ in range(2)]
    client = redis_server.client()

    steps = [
        (("RPUSH", "servers", c.address), f"backend {c.address} added"),
        (("LREM", "servers", "0", a.address), f"backend {a.address} removed"),
        (("SADD", "redlb:servers:draining", b.address), f"backend {b.address} drained"),
        (("SREM", "redlb:servers:draining", b.address), f"backend {b.address} undrained"),
        (("SET", f"redlb:servers:ejected:{c.address}", "1", "PX", "1500"),
         f"backend {c.address} ejected"),
        (None, f"backend {c.address} ejection ended"),  # on time, with no command
        (("SET", f"redlb:servers:health:{b.address}", "down", "PX", "60000"),
         f"backend {b.address} health down"),
        (("DEL", f"redlb:servers:health:{b.address}"), f"backend {b.address} health up"),
    ]  # fmt: skip
    for command, line in steps:
        if command is not None:
            client.execute_command(*command)
            client.publish("redlb:servers:events", "test")
        for proxy in proxies:
            assert wait_for(lambda p=proxy, s=line: s in p.log(), 3), (line, proxy.log())
    wait_resyncs(redis_server, 4)  # and nothing is said twice
    for proxy in proxies:
        log = proxy.log()
        for _, line in steps:
            assert log.count(line) == 1, (line, log)


def test_password_rotated_during_an_ejection_then_restored(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url)
    bad = backends[2]
    bad.behaviour.status = 503
    ejected_key = f"redlb:servers:ejected:{bad.address}"
    with Load(proxy.port) as load:
        assert wait_for(lambda: redis_server.client().exists(ejected_key), 5)
        _rotate_password(redis_server, "n3wpass")
        assert wait_for(lambda: "refused redlb's password" in proxy.log(), 5)
        seen_by_bad = bad.count()
        time.sleep(2)  # retries while the backend stays ejected
        assert bad.count() == seen_by_bad
        admin = redis_server.client_with_password("n3wpass")
        admin.config_set("requirepass", "")
        assert wait_for(lambda: "reachable again" in proxy.log(), 3), proxy.log()
    result = load.stop()
    assert result.sent > 600 and result.failed == 0, result.errors
    log = proxy.log()
    assert log.count("refused redlb's password") == 1 and "n3wpass" not in log
    assert redis_server.client().pttl(ejected_key) > 0  # the shared mark kept its TTL


# Wrong types, garbage and size


@pytest.mark.parametrize("kind", ["hash", "zset", "set"])
def test_pool_key_of_another_type_keeps_the_last_known_pool(
    redis_server, backends, start_proxy, kind
):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    replace = {
        "hash": ("HSET", "servers", "a", backends[2].address),
        "zset": ("ZADD", "servers", "1", backends[2].address),
        "set": ("SADD", "servers", backends[2].address),
    }[kind]
    with redis_server.client().pipeline(transaction=True) as tx:
        tx.delete("servers").execute_command(*replace).execute()
    with Load(proxy.port) as load:
        assert wait_for(lambda: f"holds a {kind}, not a list" in proxy.log(), 3)
        wait_resyncs(redis_server, 2)
    result = load.stop()
    assert result.failed == 0, result.errors
    assert backends[2].count() == 0
    assert proxy.log().count("not a list") == 1


def test_draining_key_of_another_type_is_said_once(redis_server, backends, start_proxy):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    redis_server.cli("SET", "redlb:servers:draining", "oops")
    assert wait_for(lambda: "cannot read redlb:servers:draining" in proxy.log(), 3)
    wait_resyncs(redis_server, 3)
    assert proxy.log().count("cannot read redlb:servers:draining") == 1, proxy.log()
    assert {proxy.get("/")[1] for _ in range(4)} == {b"ok b0\n", b"ok b1\n"}


def test_huge_pool_is_read_bounded_and_stays_responsive(redis_server, backends, start_proxy):
    """RDS-10: 100,000 entries and one of 1 MB; redlb reads 10,000 and keeps answering."""
    client = redis_server.client()
    client.rpush("servers", "x" * (1 << 20))
    addresses = [b.address for b in backends]
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, 100_000, 1000):
            pipe.rpush("servers", *(addresses[i % 3] for i in range(start, start + 1000)))
        pipe.execute()
    proxy = start_proxy(redis_server.url)
    with _live_probe(proxy) as live, Load(proxy.port) as load:
        wait_resyncs(redis_server, 3)
    result = load.stop()
    assert result.sent > 200 and result.failed == 0, result.errors
    assert set(live) == {200}
    assert all(b.count() > 0 for b in backends)
    log = proxy.log()
    assert log.count("reading only those") == 1 and log.count("skipping pool entry") == 1
    assert len(log) < 20_000  # no entry is logged whole


def test_removed_backend_gets_nothing_after_the_refresh_bound(redis_server, backends, start_proxy):
    """RDS-11: LREM under load; after the bound (1 s) the removed backend sees no request."""
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        time.sleep(0.5)
        redis_server.cli("LREM", "servers", "0", backends[0].address)
        time.sleep(1.0)  # the bound itself: whatever the path, the edit is applied by now
        seen = backends[0].count()
        time.sleep(1.5)
        assert backends[0].count() == seen
    result = load.stop()
    assert result.failed == 0, result.errors


# Everything at once, under load


def test_redis_misbehaving_every_way_under_load(redis_server, backends, start_proxy):
    """Paused, stalled, flushed, wrong type, restarted with and without data: no request to a
    healthy backend fails, /-/live answers, connections stay few and retries slow."""
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url, "--health-path", "/", "--health-interval", "0.5")
    admin = redis_server.client()
    peak_clients = 0

    def settle(phase: str) -> None:
        nonlocal peak_clients
        assert wait_for(lambda: metric(proxy, "redlb_redis_up") == 1, 5), (phase, proxy.log())
        wait_resyncs(redis_server, 2)
        peak_clients = max(peak_clients, len(admin.client_list()) - 1)

    with _live_probe(proxy) as live, Load(proxy.port) as load:
        settle("start")
        before = _connections_received(admin)
        redis_server.process.send_signal(signal.SIGSTOP)
        time.sleep(4)
        redis_server.process.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # Redis accepts the connections queued while it was stopped
        attempts_while_paused = _connections_received(admin) - before
        settle("paused")

        admin.execute_command("DEBUG", "SLEEP", "1.5")
        settle("stalled")

        admin.flushall()
        assert wait_for(lambda: proxy.log().count("Redis lost its data") == 1, 3)
        _seed(redis_server, backends[:2])
        settle("flushed")

        with admin.pipeline(transaction=True) as tx:
            tx.delete("servers").set("servers", "oops").execute()
        assert wait_for(lambda: "holds a string" in proxy.log(), 3)
        with admin.pipeline(transaction=True) as tx:
            tx.delete("servers").rpush("servers", *[b.address for b in backends[:2]]).execute()
        settle("wrong type")

        redis_server.kill()
        time.sleep(2)
        redis_server.start()
        admin = redis_server.client()
        settle("restarted with data")

        redis_server.kill()
        redis_server.wipe()
        redis_server.start()
        admin = redis_server.client()
        assert wait_for(lambda: proxy.log().count("Redis lost its data") == 2, 5)
        _seed(redis_server, backends[:2])
        settle("restarted empty")
    result = load.stop()
    print(
        f"\nmisbehaving Redis: {result.sent} requests, {result.failed} failed, "
        f"peak {peak_clients} Redis connections, {attempts_while_paused} connects in 4.5 s"
    )
    assert result.sent > 3000 and result.failed == 0, (result.statuses, result.errors)
    assert live and set(live) == {200}, live
    assert peak_clients <= 6, peak_clients
    assert attempts_while_paused <= 16, attempts_while_paused  # ~1/s per caller, not a loop
    assert proxy.status("/-/ready")[0] == 200


def test_ejection_mark_of_a_killed_instance_expires(redis_server, backends, start_proxy):
    """RDS-15: the instance that ejected a backend dies; the shared mark ends by its TTL."""
    _seed(redis_server, backends)
    args = ("--eject-base-time", "1", "--eject-consecutive", "2")
    ejecting = start_proxy(redis_server.url, *args)
    other = start_proxy(redis_server.url, *args)
    backends[2].behaviour.status = 503
    client = redis_server.client()
    mark = f"redlb:servers:ejected:{backends[2].address}"
    assert wait_for(lambda: ejecting.get("/")[0] == 200 and client.exists(mark), 5)
    ejecting.process.kill()
    ejecting.process.wait()
    backends[2].behaviour.status = 200
    assert wait_for(lambda: not client.exists(mark), 3)
    assert wait_for(lambda: metric(other, "redlb_pool_healthy") == 3, 3)
    before = backends[2].count()
    for _ in range(6):
        assert other.get("/")[0] == 200
    assert backends[2].count() > before
