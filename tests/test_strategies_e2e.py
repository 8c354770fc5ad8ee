"""Strategies through real `redlb serve` processes: settings, weights, hashing, stickiness."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from support import request, wait_for


def redlb(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args, "--redis", redis_url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def served_by(port: int, headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    status, body, resp = request(port, "GET", "/", headers={"Host": "h", **(headers or {})})
    assert status == 200, (status, body)
    return body.split()[1].decode(), resp.getheader("Set-Cookie")


def send(ports: list[int], total: int, clients_per_port: int = 2) -> int:
    """``total`` keep-alive GETs spread over the ports; returns how many got a 200."""
    import http.client

    left = [total]
    ok = [0]
    lock = threading.Lock()

    def client(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                conn.request("GET", "/", headers={"Host": "h"})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    with lock:
                        ok[0] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(p,)) for p in ports
               for _ in range(clients_per_port)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return ok[0]


def test_bad_strategy_settings_are_skipped_with_one_warning_each(
    redis_server, backends, start_proxy
):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "fastest", "hash_key",
                     "header:", "sticky", "a b", "slow_start", "-1", "hash_balance", "x")  # fmt: skip
    redis_server.cli("HSET", "redlb:servers:weights", "10.0.0.1:80", "0", "nonsense", "2")
    proxy = start_proxy(redis_server.url, "--strategy", "round_robin")
    seen = Counter(served_by(proxy.port)[0] for _ in range(30))
    # Defaults kept: plain round robin (within one or two: a late lease refill repeats a few).
    assert set(seen) == {"b0", "b1", "b2"} and max(seen.values()) - min(seen.values()) <= 2
    time.sleep(2.2)  # two resyncs more: still one warning each
    log = proxy.log()
    for key in ("strategy='fastest'", "hash_key='header:'", "sticky='a b'", "slow_start='-1'",
                "hash_balance='x'", "weight of '10.0.0.1:80'", "weight of 'nonsense'"):  # fmt: skip
        assert log.count(key) == 1, (key, log)
    assert "Traceback" not in log


def test_strategy_flag_is_validated(redis_server):
    result = subprocess.run(
        [sys.executable, "-m", "redlb", "serve", "--redis", redis_server.url, "--strategy", "x"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2 and "'x' is not one of" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "redlb", "serve", "--redis", redis_server.url,
         "--hash-key", "headers:x"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2 and "header:NAME" in result.stderr


def test_weights_followed_by_the_fleet_within_one_percent(redis_server, backends, start_proxy):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    for b, weight in zip(backends, (1, 2, 3), strict=True):
        result = redlb(redis_server.url, "backend", "weight", b.address, str(weight))
        assert result.returncode == 0, result.stderr
    assert "weight 3" in redlb(redis_server.url, "backend", "ls").stdout
    proxies = [start_proxy(redis_server.url, "--no-access-log") for _ in range(3)]
    assert send([p.port for p in proxies], 10_000) == 10_000
    counts = [b.count() for b in backends]
    shares = [c / sum(counts) for c in counts]
    print(f"\nweights 1:2:3 over 3 instances, 10,000 requests: {counts}")
    for share, weight in zip(shares, (1, 2, 3), strict=True):
        assert abs(share - weight / 6) <= 0.01, (counts, shares)


def test_weight_edit_applies_within_a_second(redis_server, backends, start_proxy):
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    proxy = start_proxy(redis_server.url, "--no-access-log")
    before = Counter(served_by(proxy.port)[0] for _ in range(20))
    assert abs(before["b0"] - before["b1"]) <= 2, before
    redis_server.cli("HSET", "redlb:servers:weights", b.address, "3")  # plain redis-cli
    time.sleep(1.0)
    seen = Counter(served_by(proxy.port)[0] for _ in range(400))
    assert abs(seen["b1"] - 300) <= 8, seen  # 3:1 (a late lease refill repeats a few)
    assert redlb(redis_server.url, "backend", "weight", b.address, "1001").returncode != 0
    assert redlb(redis_server.url, "backend", "rm", b.address).returncode == 0
    assert redis_server.cli("HEXISTS", "redlb:servers:weights", b.address).strip() == "0"


def test_hash_on_a_header_is_the_same_on_every_instance(redis_server, backends, start_proxy):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "hash",
                     "hash_key", "header:X-User")  # fmt: skip
    proxies = [start_proxy(redis_server.url, "--no-access-log") for _ in range(3)]
    users = [f"user-{i}" for i in range(60)]
    homes = {}
    for user in users:
        where = {served_by(p.port, {"X-User": user})[0] for p in proxies for _ in range(2)}
        assert len(where) == 1, (user, where)
        homes[user] = where.pop()
    assert len(set(homes.values())) == 3
    # One backend leaves: only its users move.
    redis_server.cli("LREM", "servers", "0", backends[2].address)
    assert wait_for(lambda: served_by(proxies[0].port, {"X-User": "probe"})[0] != "b2"
                    and all(served_by(p.port, {"X-User": u})[0] != "b2"
                            for p in proxies for u in users), 3)  # fmt: skip
    for user, home in homes.items():
        if home != "b2":
            assert {served_by(p.port, {"X-User": user})[0] for p in proxies} == {home}


def test_sticky_session_holds_across_instances_and_falls_back(redis_server, backends, start_proxy):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    redis_server.cli("HSET", "redlb:servers:settings", "sticky", "lbs")
    proxies = [start_proxy(redis_server.url, "--no-access-log") for _ in range(2)]
    assert wait_for(lambda: served_by(proxies[0].port)[1] is not None, 3)
    home, set_cookie = served_by(proxies[0].port)
    assert set_cookie is not None and set_cookie.startswith("lbs=")
    value = set_cookie.split(";")[0].split("=", 1)[1]
    assert "127.0.0.1" not in value and str(backends[0].port) not in value  # opaque
    assert redis_server.cli("EXISTS", "redlb:sticky-secret").strip() == "1"
    for i in range(10):  # alternating instances: always home, no new cookie
        where, again = served_by(proxies[i % 2].port, {"Cookie": f"a=1; lbs={value}"})
        assert (where, again) == (home, None)
    # A forged value names nothing: the strategy picks and a real cookie is set.
    _, fresh = served_by(proxies[1].port, {"Cookie": "lbs=AAAAAAAAAAAAAAAAAAAAAA"})
    assert fresh is not None
    # Home drained: the next request goes elsewhere and gets a cookie for its new home.
    assert redlb(redis_server.url, "backend", "drain", f"127.0.0.1:{_port_of(backends, home)}"
                 ).returncode == 0  # fmt: skip
    assert wait_for(lambda: served_by(proxies[1].port, {"Cookie": f"lbs={value}"})[0] != home, 3)
    where, moved = served_by(proxies[0].port, {"Cookie": f"lbs={value}"})
    assert where != home and moved is not None
    new_value = moved.split(";")[0].split("=", 1)[1]
    assert {served_by(p.port, {"Cookie": f"lbs={new_value}"})[0] for p in proxies} == {where}


def _port_of(backends, name: str) -> int:
    return next(b.port for b in backends if b.name == name)


def test_crashed_instance_counts_expire(redis_server, loop_thread, start_proxy):
    from support import CountingBackend

    slow = CountingBackend(loop_thread, "slow", 3.0).start()
    try:
        redis_server.cli("RPUSH", "servers", slow.address)
        crashing, survivor = (start_proxy(redis_server.url, "--strategy", "least_outstanding")
                              for _ in range(2))  # fmt: skip
        client = redis_server.client()

        def held_request() -> None:
            try:
                request(crashing.port, "GET", "/", headers={"Host": "h"}, timeout=5)
            except OSError:
                pass  # its instance is killed under it

        threads = [threading.Thread(target=held_request) for _ in range(3)]
        for thread in threads:
            thread.start()
        key = "redlb:servers:inflight:{}"

        def published() -> dict[bytes, bytes]:
            names = client.zrange("redlb:servers:inflight", 0, -1)
            return {n: client.get(key.format(n.decode())) or b"" for n in names}

        assert wait_for(
            lambda: any(
                v.startswith(slow.address.encode() + b"=") and float(v.split(b"=")[1]) > 2.5
                for v in published().values()
            ),
            3,
        )
        crashing.process.kill()  # SIGKILL: no goodbye
        assert wait_for(lambda: not any(v for v in published().values()), 3.5), published()
        commands = int(client.info("stats")["total_commands_processed"])
        time.sleep(2.0)
        rate = (int(client.info("stats")["total_commands_processed"]) - commands - 1) / 2.0
        assert rate < 30, rate  # idle: a resync a second and a refresh every 250 ms
        assert survivor.alive()
        for thread in threads:
            thread.join(10)
    finally:
        slow.stop()


def test_slow_start_ramps_a_joining_backend_on_every_instance(redis_server, backends, start_proxy):
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address)
    redis_server.cli("HSET", "redlb:servers:settings", "slow_start", "6")
    first = start_proxy(redis_server.url, "--no-access-log")
    redis_server.cli("RPUSH", "servers", b.address)  # joins now
    assert wait_for(lambda: redis_server.cli("HEXISTS", "redlb:servers:up-since",
                                             b.address).strip() == "1", 3)  # fmt: skip
    second = start_proxy(redis_server.url, "--no-access-log")  # started after the join
    early = Counter(served_by(p.port)[0] for p in (first, second) for _ in range(100))
    assert 5 <= early["b1"] <= 60, early  # about 10-30% of a's weight while it ramps
    time.sleep(6.5)
    late = Counter(served_by(p.port)[0] for p in (first, second) for _ in range(100))
    assert abs(late["b1"] - 100) <= 4, late  # full weight: half of the requests
    # It leaves (drained): the fleet forgets when it joined, and ramps again on return.
    assert redlb(redis_server.url, "backend", "drain", b.address).returncode == 0
    assert wait_for(lambda: redis_server.cli("HEXISTS", "redlb:servers:up-since",
                                             b.address).strip() == "0", 3)  # fmt: skip


@pytest.mark.parametrize(
    "strategy",
    ["round_robin", "least_outstanding", "least_conn", "peak_ewma", "hash", "random", "first"],
)
def test_every_strategy_sees_only_the_healthy_backends(
    redis_server, backends, start_proxy, strategy
):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    redis_server.cli("SADD", "redlb:servers:draining", backends[0].address)
    redis_server.cli("SET", f"redlb:servers:ejected:{backends[1].address}", "1", "EX", "60")
    proxy = start_proxy(redis_server.url, "--strategy", strategy, "--no-access-log")
    seen = Counter(served_by(proxy.port, {"X-N": str(i)})[0] for i in range(30))
    assert seen == {"b2": 30}, seen


def test_redis_down_keeps_strategy_weights_and_sessions(redis_server, backends, start_proxy):
    """Redis killed: fleet counts drop to local ones, weights and the sticky secret are kept."""
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    redis_server.cli("HSET", "redlb:servers:weights", b.address, "3")
    proxy = start_proxy(redis_server.url, "--strategy", "least_outstanding",
                        "--sticky-cookie", "lbs", "--no-access-log")  # fmt: skip
    assert wait_for(lambda: served_by(proxy.port)[1] is not None, 3)
    home, set_cookie = served_by(proxy.port)
    assert set_cookie is not None
    value = set_cookie.split(";")[0].split("=", 1)[1]
    redis_server.kill()
    time.sleep(1.5)  # the publisher and the resync both notice
    for _ in range(10):
        assert served_by(proxy.port, {"Cookie": f"lbs={value}"}) == (home, None)
    # Sequential requests: nothing in flight, so the weight (3) decides: all to b1.
    assert Counter(served_by(proxy.port)[0] for _ in range(20)) == {"b1": 20}
    redis_server.start()  # AOF: the same secret comes back
    assert wait_for(lambda: "reachable again" in proxy.log(), 10), proxy.log()
    assert served_by(proxy.port, {"Cookie": f"lbs={value}"}) == (home, None)
    assert "Traceback" not in proxy.log()


def test_a_retried_attempt_gives_its_in_flight_count_back(redis_server, backends, start_proxy):
    """A connect refused counts the attempt in flight and retries elsewhere: the refused one
    must leave the count (else the dead backend looks busy for good, and is published so)."""
    import re

    from redlb.store.embedded import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connects are refused
    redis_server.cli("RPUSH", "servers", backends[0].address, dead)
    args = ("--strategy", "least_outstanding", "--no-access-log")
    tested, _peer = (start_proxy(redis_server.url, *args) for _ in range(2))
    client = redis_server.client()
    # Alone, an instance publishes nothing: both in the index, and read there (1 s).
    assert wait_for(lambda: client.zcard("redlb:servers:inflight") == 2, 5)
    time.sleep(1.2)
    codes = [request(tested.port, "GET", "/", headers={"Host": "h"})[0] for _ in range(20)]
    assert codes == [200] * 20
    _, metrics = tested.status("/metrics")
    found = re.search(rb"(?m)^redlb_retries_total (\S+)$", metrics)
    assert found is not None and float(found.group(1)) >= 1  # the dead one was tried
    key = "redlb:servers:inflight:{}"

    def published() -> dict[bytes, bytes]:
        names = client.zrange("redlb:servers:inflight", 0, -1)
        return {n: client.get(key.format(n.decode())) or b"" for n in names}

    # Idle now: nothing in flight, so nothing written, and the last counts expire (2 s).  A
    # count left behind keeps this instance busy: published every round from the next on.
    time.sleep(1.0)
    assert wait_for(lambda: not any(v for v in published().values()), 4), published()
