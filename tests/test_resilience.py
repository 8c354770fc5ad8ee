"""Faults under steady load (200 req/s over keep-alive connections), counting failed requests.

The bar is zero failed client requests unless a test says otherwise.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import (
    HttpBackend,
    Load,
    RedisProcess,
    free_port,
    metric,
    request,
    wait_for,
    wait_resyncs,
)

pytestmark = pytest.mark.slow


def _seed(redis_server: RedisProcess, backends) -> None:
    redis_server.cli("RPUSH", "servers", *[b.address for b in backends])


def _report(name: str, result) -> None:
    print(f"\n{name}: sent {result.sent}, failed {result.failed}, statuses {result.statuses}")


def test_backend_killed_mid_traffic(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        time.sleep(1.5)
        backends[2].stop()  # connections reset, port refuses from now on
        time.sleep(2.5)
    result = load.stop()
    _report("backend killed", result)
    assert result.sent > 500 and result.failed == 0, result.errors
    assert "ejecting 127.0.0.1" in proxy.log()


def test_backend_answering_503_is_ejected_and_shared(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    first = start_proxy(redis_server.url)
    second = start_proxy(redis_server.url)
    bad = backends[2]
    bad.behaviour.status = 503
    with Load(first.port) as load:
        assert wait_for(
            lambda: redis_server.client().exists(f"redlb:servers:ejected:{bad.address}"), 5
        )
        time.sleep(0.5)
    result = load.stop()
    _report("503 backend", result)
    assert result.failed == 0, result.errors  # GETs that met the 503 went elsewhere
    ttl = redis_server.client().pttl(f"redlb:servers:ejected:{bad.address}")
    assert 20_000 < ttl <= 30_000  # the base ejection time, with a TTL
    # The second instance never sent the bad backend anything, yet routes around it.
    before = bad.count()
    assert wait_for(lambda: metric(second, "redlb_pool_healthy") == 2, 2)
    for _ in range(30):
        assert second.get("/")[0] == 200
    assert bad.count() == before


def test_5xx_can_be_left_out_of_ejection(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--no-eject-on-5xx")
    backends[2].behaviour.status = 503
    codes = [proxy.get("/")[0] for _ in range(40)]
    assert codes == [200] * 40  # each GET that met the 503 was retried elsewhere
    assert backends[2].count() >= 10  # ... and the backend kept its share: not ejected
    assert not redis_server.client().exists(f"redlb:servers:ejected:{backends[2].address}")


def test_backend_that_hangs(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--upstream-timeout", "1")
    backends[2].behaviour.hang = True
    # Three connections: each may wait on the hung backend at the same moment, and the
    # retry budget admits at least 3 concurrent retries (Envoy's min_retry_concurrency).
    with Load(proxy.port, rate=100, connections=3) as load:
        time.sleep(4)
    result = load.stop()
    _report("hanging backend", result)
    # Each request that met the hung backend held its connection for the 1 s timeout.
    assert result.sent > 50 and result.failed == 0, result.errors
    assert "ejecting" in proxy.log()


def test_redis_killed_for_ten_seconds_then_back(redis_server, backends, start_proxy):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        time.sleep(1)
        redis_server.kill()
        time.sleep(10)
        redis_server.start()  # same data (AOF)
        assert wait_for(lambda: "reachable again" in proxy.log(), 12), proxy.log()
        redis_server.cli("RPUSH", "servers", backends[2].address)
        t_edit = time.monotonic()
        assert wait_for(lambda: backends[2].count() > 0, 2)
        applied = time.monotonic() - t_edit
        time.sleep(0.5)
    result = load.stop()
    _report(f"Redis down 10 s (edit applied after {applied:.2f} s)", result)
    assert result.sent > 2000 and result.failed == 0, result.errors
    log = proxy.log()
    assert log.count("is unreachable") == 1  # the outage is logged once, not per request
    assert proxy.status("/-/ready")[0] == 200


def test_redis_restarted_empty_keeps_the_pool(redis_server, backends, start_proxy):
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        time.sleep(1)
        redis_server.kill()
        redis_server.wipe()
        redis_server.start()
        assert wait_for(lambda: "Redis lost its data" in proxy.log(), 8)
        wait_resyncs(redis_server, 2)
    result = load.stop()
    _report("Redis restarted empty", result)
    assert result.failed == 0, result.errors
    assert proxy.log().count("Redis lost its data") == 1
    # Writing the pool again is followed, and from then on an empty pool is a real 503.
    redis_server.cli("RPUSH", "servers", backends[2].address)
    assert wait_for(lambda: proxy.get("/")[1] == b"ok b2\n", 3)
    redis_server.cli("DEL", "servers")
    assert wait_for(lambda: proxy.get("/")[0] == 503, 3)


def test_redis_slow_replies_do_not_touch_requests(redis_server, backends, start_proxy):
    """RDS-04: Redis stalls for 2 s (DEBUG SLEEP); every Redis call has a 250 ms timeout
    and none is on the request path, so requests go on from the cached pool."""
    _seed(redis_server, backends[:2])
    proxy = start_proxy(redis_server.url)
    with Load(proxy.port) as load:
        time.sleep(0.5)
        for _ in range(2):
            redis_server.client().execute_command("DEBUG", "SLEEP", "2")
        time.sleep(1)
    result = load.stop()
    _report("Redis stalled 2 x 2 s", result)
    assert result.sent > 600 and result.failed == 0, result.errors


def test_wrong_redis_password_is_a_clear_error_with_backoff(tmp_path, start_proxy):
    """RDS-12: refused credentials at start are one clear line and exit 1 (defect 22); a Redis
    that starts refusing them later is logged clearly, retried with backoff, never ready."""
    redis = RedisProcess(tmp_path / "auth", extra=["--requirepass", "s3cret"]).start_unchecked()
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "redlb", "serve", "--status-listen", "off",
             "--listen", f"127.0.0.1:{free_port()}",
             "--redis", f"redis://:wrong@127.0.0.1:{redis.port}/0"],
            capture_output=True, text=True, timeout=20, cwd=tmp_path,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert "refused the password" in refused.stderr and "***" in refused.stderr
        assert ":wrong@" not in refused.stderr  # the password is never shown

        proxy = start_proxy(f"redis://:s3cret@127.0.0.1:{redis.port}/0", ready=False)
        admin = redis.client_with_password("s3cret")
        admin.config_set("requirepass", "changed")
        admin = redis.client_with_password("changed")
        admin.client_kill_filter(_type="normal", skipme=True)
        before = admin.info("stats")["total_connections_received"]
        time.sleep(4)
        log = proxy.log()
        assert log.count("refused redlb's password") == 1, log  # once, not per retry
        assert "s3cret" not in log and "HELLO" not in log  # no password, no raw redis-py text
        assert "***" in log
        assert proxy.status("/-/ready")[0] == 503 or proxy.get("/")[0] in (200, 503)
        assert proxy.alive()
        # Backoff, not a tight loop: a handful of attempts in 4 s.
        stats = admin.info("stats")
        assert stats["total_connections_received"] - before < 30, stats
    finally:
        redis.kill()


def test_redis_down_at_startup(tmp_path, backends, start_proxy):
    redis = RedisProcess(tmp_path / "late")
    proxy = start_proxy(redis.url, ready=False)
    assert proxy.status("/-/live")[0] == 200
    assert proxy.status("/-/ready")[0] == 503
    status, body, _ = request(proxy.port, "GET", "/", timeout=1)  # fast, not a hang
    assert status == 503
    time.sleep(2)
    redis.start()
    redis.cli("RPUSH", "servers", backends[0].address)
    assert wait_for(proxy.ready, 3)  # one retry interval (at most 1.5 s) and a read
    assert proxy.get("/")[0] == 200
    assert proxy.alive()
    redis.kill()


def test_sigterm_completes_every_accepted_request(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    for b in backends:
        b.behaviour.delay = 1.0
    proxy = start_proxy(redis_server.url)
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(proxy.get, "/") for _ in range(20)]
        time.sleep(0.4)  # all 20 are in flight at the backends
        proxy.process.send_signal(signal.SIGTERM)
        codes = [f.result()[0] for f in futures]
    assert codes == [200] * 20
    assert proxy.process.wait(10) == 0
    assert not proxy.listening()


def test_drain_a_backend(redis_server, backends, start_proxy):
    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url)
    target = backends[0]
    target.behaviour.delay = 1.0
    in_flight = []
    t = threading.Thread(target=lambda: in_flight.append(proxy.get("/")))
    t.start()  # the first request goes to b0 and takes a second
    time.sleep(0.3)
    out = subprocess.run(
        [sys.executable, "-m", "redlb", "backend", "drain", target.address, "--redis", redis_server.url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: metric(proxy, "redlb_pool_healthy") == 2, 2)
    before = target.count()
    for _ in range(12):
        assert proxy.get("/")[0] == 200
    assert target.count() == before
    t.join()
    assert in_flight[0][0] == 200 and in_flight[0][1] == b"ok b0\n"


def test_active_health_one_prober_per_backend(redis_server, loop_thread, start_proxy):
    healthy = [HttpBackend(loop_thread, f"h{i}").start() for i in range(3)]
    try:
        _seed(redis_server, healthy)
        args = ("--health-path", "/healthz", "--health-interval", "0.5", "--health-fall", "2",
                "--health-rise", "2")  # fmt: skip
        a = start_proxy(redis_server.url, *args)
        b = start_proxy(redis_server.url, *args)
        time.sleep(2.5)
        client = redis_server.client()
        owners = [client.get(f"redlb:servers:probe:{h.address}") for h in healthy]
        ids = {p: re.search(r"as prober (\S+)", p.log()).group(1).encode() for p in (a, b)}
        assert set(owners) <= set(ids.values()), (owners, ids)  # leases held by live instances
        # One prober per backend: about one probe per interval, not one per instance.
        probes = [sum(1 for r in h.received if r.url == b"/healthz") for h in healthy]
        assert all(2 <= p <= 7 for p in probes), probes

        healthy[1].behaviour.status = 503  # the health path fails too
        assert wait_for(
            lambda: client.get(f"redlb:servers:health:{healthy[1].address}") == b"down", 4
        )
        for proxy in (a, b):
            assert wait_for(lambda p=proxy: metric(p, "redlb_pool_healthy") == 2, 2)
            names = {proxy.get("/")[1] for _ in range(9)}
            assert names == {b"ok h0\n", b"ok h2\n"}

        # The prober holding the lease of h0 dies; the other instance takes over.
        owner_before = client.get(f"redlb:servers:probe:{healthy[0].address}")
        dead, survivor = (a, b) if ids[a] == owner_before else (b, a)
        dead.process.kill()
        dead.process.wait()
        assert wait_for(
            lambda: client.get(f"redlb:servers:probe:{healthy[0].address}") == ids[survivor], 5
        )
        healthy[1].behaviour.status = 200
        assert wait_for(
            lambda: client.get(f"redlb:servers:health:{healthy[1].address}") == b"up", 6
        )
    finally:
        for h in healthy:
            h.stop()


@pytest.fixture
def sentinel_setup(tmp_path):
    """One master, one replica, three sentinels: all real processes started here."""
    from redlb.store.embedded import free_port, redis_server_binary

    master = RedisProcess(tmp_path / "master").start()
    replica = RedisProcess(
        tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(master.port)]
    ).start()
    assert wait_for(
        lambda: replica.client().info("replication").get("master_link_status") == "up", 10
    )
    sentinels = []
    for i in range(3):
        port = free_port()
        conf = tmp_path / f"sentinel{i}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master.port} 2\n"
            "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
        )
        proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        sentinels.append((port, proc))
    yield master, replica, sentinels
    for _, proc in sentinels:
        proc.kill()
        proc.wait()
    master.kill()
    replica.kill()


def test_sentinel_failover_during_traffic(sentinel_setup, backends, start_proxy):
    import redis as redis_py

    master, replica, sentinels = sentinel_setup
    _seed(master, backends)
    hosts = ",".join(f"127.0.0.1:{port}" for port, _ in sentinels)
    s0 = redis_py.Redis(port=sentinels[0][0], socket_timeout=2)
    assert wait_for(lambda: int(s0.sentinel_master("mymaster")["num-other-sentinels"]) >= 2, 15)
    proxy = start_proxy(f"redis+sentinel://{hosts}/mymaster")
    with Load(proxy.port) as load:
        time.sleep(1)
        s0.execute_command("SENTINEL", "FAILOVER", "mymaster")
        assert wait_for(
            lambda: s0.sentinel_get_master_addr_by_name("mymaster")[1] == replica.port, 15
        )
        # Writes follow the new master: a drain mark written there reaches routing.
        replica.cli("SADD", "redlb:servers:draining", backends[0].address)
        replica.cli("PUBLISH", "redlb:servers:events", "drain")
        assert wait_for(lambda: all(proxy.get("/")[1] != b"ok b0\n" for _ in range(6)), 10)
    result = load.stop()
    _report("Sentinel failover", result)
    assert result.failed == 0, result.errors
    s0.close()


def test_workers_share_a_listener_and_are_supervised(redis_server, backends, start_proxy):
    import psutil

    _seed(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    parent = psutil.Process(proxy.pid)
    assert wait_for(lambda: len(parent.children()) == 2, 5)
    victim = parent.children()[0]
    victim.kill()
    assert wait_for(
        lambda: (
            "restarting it" in proxy.log()
            and len(parent.children()) == 2
            and victim.pid not in [c.pid for c in parent.children()]
        ),
        10,
    )
    seen = set()
    for _ in range(30):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        seen.add(resp.read())
        conn.close()
    assert len(seen) == 3
    assert proxy.stop() == 0
