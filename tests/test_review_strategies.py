"""Review of the Strategies issue: defects reproduced against real processes and pure modules."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from support import closed_loop, readiness_during, request, wait_for


def served_by(port: int, headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    status, body, resp = request(port, "GET", "/", headers={"Host": "h", **(headers or {})})
    assert status == 200, (status, body)
    return body.split()[1].decode(), resp.getheader("Set-Cookie")


def test_flushed_redis_keeps_the_pool_strategy_and_weights(redis_server, backends, start_proxy):
    """Redis lost its data: the pool is kept (sync.py rule 4), so must its settings and weights.

    A hash pool whose settings hash vanished fell back to the flag's round robin (keys moved
    to every backend) and weights 1:3 became 1:1, while the last-known members kept serving.
    """
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "hash",
                     "hash_key", "header:X-User")  # fmt: skip
    proxy = start_proxy(redis_server.url, "--no-access-log")
    users = [f"u{i}" for i in range(20)]
    homes = {u: served_by(proxy.port, {"X-User": u})[0] for u in users}
    assert len(set(homes.values())) == 2
    redis_server.cli("FLUSHALL")
    assert wait_for(lambda: "lost its data" in proxy.log(), 5), proxy.log()
    time.sleep(1.5)  # a resync or two after the loss
    for user in users:
        assert served_by(proxy.port, {"X-User": user})[0] == homes[user], user
    # Weights: round robin 1:3, then the data is lost.
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    redis_server.cli("HSET", "redlb:servers:weights", b.address, "3")
    time.sleep(1.2)
    weighted = Counter(served_by(proxy.port)[0] for _ in range(40))
    assert weighted["b1"] >= 28, weighted
    redis_server.cli("FLUSHALL")
    time.sleep(2.5)
    after = Counter(served_by(proxy.port)[0] for _ in range(40))
    assert after["b1"] >= 28, after  # still 3:1 on the last-known weights
    assert "Traceback" not in proxy.log()


def test_sticky_sessions_survive_a_redis_that_lost_its_data(redis_server, backends, start_proxy):
    """Every instance still holds the secret when Redis comes back empty: none should mint a
    new one (SET NX of a fresh random value), which re-places every session fleet-wide."""
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    redis_server.cli("HSET", "redlb:servers:settings", "sticky", "lbs")
    proxy = start_proxy(redis_server.url, "--no-access-log")
    assert wait_for(lambda: served_by(proxy.port)[1] is not None, 3)
    home, set_cookie = served_by(proxy.port)
    assert set_cookie is not None
    value = set_cookie.split(";")[0].split("=", 1)[1]
    secret = redis_server.cli("GET", "redlb:sticky-secret").strip()
    redis_server.cli("FLUSHALL")
    redis_server.cli("RPUSH", "servers", *[b.address for b in backends])  # the operator's list
    redis_server.cli("HSET", "redlb:servers:settings", "sticky", "lbs")
    # The secret is re-read every 10 s: by then it is back in Redis, and it is the same one.
    assert wait_for(lambda: redis_server.cli("EXISTS", "redlb:sticky-secret").strip() == "1", 15)
    assert redis_server.cli("GET", "redlb:sticky-secret").strip() == secret
    for _ in range(5):
        assert served_by(proxy.port, {"Cookie": f"lbs={value}"}) == (home, None)


def test_hash_table_build_with_skewed_weights_keeps_the_loop_answering(
    redis_server, backends, start_proxy
):
    """1,000 backends, one of weight 1000: the table build ran 33 M Python steps (turns were
    handed out round by round over every backend) and blocked the event loop for seconds.

    The loop must keep answering: every readiness probe gets its answer within 2 s while the
    first hashed request builds the table.
    """

    first = backends[0]
    dead = [f"127.0.0.1:{port}" for port in range(20001, 20001 + 999)]
    redis_server.cli("RPUSH", "servers", first.address, *dead)
    redis_server.cli("HSET", "redlb:servers:weights", first.address, "1000")
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "hash",
                     "hash_key", "header:X-User", "hash_balance", "0")  # fmt: skip
    proxy = start_proxy(redis_server.url, "--no-access-log")

    def hashed_request() -> None:
        try:
            request(proxy.port, "GET", "/", headers={"Host": "h", "X-User": "u"}, timeout=20)
        except OSError:
            pass  # its backend may be a dead port: the build is what is measured

    answered = readiness_during(proxy, hashed_request, join=10)
    assert answered and set(answered) == {200}, Counter(answered)


def _redis_calls(redis_server) -> int:
    stats = redis_server.client().info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


@pytest.mark.parametrize("strategy", ["least_outstanding", "hash"])
def test_fleet_strategies_cost_at_most_one_redis_command_per_100_requests(
    redis_server, backends, start_proxy, strategy
):
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    proxy = start_proxy(redis_server.url, "--strategy", strategy, "--no-access-log")
    closed_loop([proxy.port], 1, 1.0)  # warm: connections, lease, first publishes
    before = _redis_calls(redis_server)
    statuses = closed_loop([proxy.port], 2, 4.0)  # steady load, as fast as the machine goes
    used = _redis_calls(redis_server) - before
    requests = sum(statuses.values())
    assert set(statuses) == {200}, statuses
    print(f"\n{strategy}: {requests} requests, {used} Redis commands")
    assert used / requests <= 0.01, (used, requests)


def test_slow_start_ramps_from_the_first_request_after_a_join(redis_server, backends, start_proxy):
    """A backend that joins starts at 10% of its weight at once, not after the next resync.

    The sync applied the join (ramp recorded locally), then replaced the ramp times with the
    fleet's hash read in the same round trip, before this join was written to it: for up to a
    resync interval the newcomer had its full weight, the moment slow start is there for.
    """
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address)
    redis_server.cli("HSET", "redlb:servers:settings", "slow_start", "30")
    proxy = start_proxy(redis_server.url, "--no-access-log")
    assert Counter(served_by(proxy.port)[0] for _ in range(10)) == {"b0": 10}
    redis_server.cli("RPUSH", "servers", b.address)  # joins now
    assert wait_for(lambda: served_by(proxy.port)[0] == "b1", 3, interval=0.001)
    early = Counter(served_by(proxy.port)[0] for _ in range(60))
    assert early["b1"] <= 15, early  # 1/11 of the requests at 10% (about 6), not half


def test_weights_key_of_another_type_is_said_once(redis_server, backends, start_proxy):
    """A weights key that is not a hash: one error, the last-known weights kept, no log flood
    (it was logged again on every resync, once a second)."""
    a, b = backends[:2]
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    redis_server.cli("HSET", "redlb:servers:weights", b.address, "3")
    proxy = start_proxy(redis_server.url, "--no-access-log")
    assert wait_for(lambda: Counter(served_by(proxy.port)[0] for _ in range(8))["b1"] == 6, 3)
    redis_server.cli("SET", "oops", "oops")
    redis_server.cli("RENAME", "oops", "redlb:servers:weights")  # a string now, in one step
    time.sleep(3.5)  # three resyncs at least
    assert proxy.log().count("cannot read redlb:servers:weights") == 1, proxy.log()
    assert Counter(served_by(proxy.port)[0] for _ in range(8))["b1"] == 6


def test_smooth_weighted_period_honours_weights_in_a_large_pool() -> None:
    from redlb.address import parse_backend
    from redlb.balancer.wrr import smooth_period

    backends = [parse_backend(f"10.0.{i // 250}.{i % 250 + 1}:80") for i in range(1000)]
    weights = [10 if i % 2 == 0 else 1 for i in range(1000)]
    period = smooth_period(backends, weights)
    heavy = {b for b, w in zip(backends, weights, strict=True) if w == 10}
    share = sum(1 for b in period if b in heavy) / len(period)
    assert abs(share - 10 / 11) <= 0.01, share


def test_slow_backend_holds_no_more_than_its_fair_share_at_four_clients_each(
    redis_server, fast_fast_slow, start_proxy
):
    """Counts alone cannot do it: with exact counts (one instance seeing all 12 clients,
    least_conn) the slow one held 3.95 against 3.73, since a fast backend's client is
    between requests far more often than the slow one's, and the fleet measured 1.05-1.20x.
    least_outstanding gives near-ties to the backend seen answering faster (least.NEAR):
    measured 0.80-0.92x its share in 10 runs (2.93 to 3.41 against 3.64 to 3.73)."""
    proxies = [
        start_proxy(redis_server.url, "--strategy", "least_outstanding", "--no-access-log")
        for _ in range(3)
    ]
    ports = [p.port for p in proxies]
    closed_loop(ports, 1, 1.0)  # warm up
    for backend in fast_fast_slow:
        backend.reset()
    statuses = closed_loop(ports, 4, 6.0)
    averages = [b.average() for b in fast_fast_slow]
    assert set(statuses) == {200}, statuses
    slow, fair = averages[-1], sum(averages) / 3
    print(f"\nslow backend {slow:.2f} in flight, fair share {fair:.2f}")
    assert slow <= fair, (slow, fair)


def test_stale_weights_are_not_parsed_again_on_every_resync(redis_server, backends, start_proxy):
    """Weights left behind for backends no longer listed (LREM with redis-cli keeps them):
    the whole hash was parsed again on every resync, once a second, on the event loop.
    200,000 of them blocked the loop for up to 1.5 s at a time; parsed once, it answers."""
    import http.client

    a = backends[0]
    redis_server.cli("RPUSH", "servers", a.address)
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for start in range(0, 200_000, 10_000):
        fields = {f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80": 3
                  for i in range(start, start + 10_000)}  # fmt: skip
        pipe.hset("redlb:servers:weights", mapping=fields)
    pipe.execute()
    proxy = start_proxy(redis_server.url, "--no-access-log")  # ready: parsed them once
    time.sleep(1.0)
    answered: list[int | str] = []
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.status_port, timeout=1.0)
        try:
            conn.request("GET", "/-/ready")
            answered.append(conn.getresponse().status)
        except OSError as exc:
            answered.append(repr(exc))  # no answer within 1 s: the loop is busy parsing
        finally:
            conn.close()
        time.sleep(0.05)
    assert set(answered) == {200}, Counter(answered)
    assert served_by(proxy.port)[0] == "b0"


def test_query_key_names_that_can_never_match_are_refused() -> None:
    """``query:a&b``: '&' separates parameters, so no request ever has that parameter and
    every request silently hashed on the client's address instead.  Refused, like header:."""
    from redlb.balancer.requestkey import parse_key_spec, request_key

    spec = parse_key_spec("query:user")
    assert request_key(spec, b"peer", b"/p?user=7", []) == b"7"
    with pytest.raises(ValueError, match="query"):
        parse_key_spec("query:a&b")


def _slow_ratio(redis_server, backends, start_proxy, strategy: str, instances: int) -> float:
    proxies = [start_proxy(redis_server.url, "--strategy", strategy, "--no-access-log")
               for _ in range(instances)]  # fmt: skip
    ports = [p.port for p in proxies]
    closed_loop(ports, 1, 1.0)  # warm up
    for backend in backends:
        backend.reset()
    statuses = closed_loop(ports, 12 // instances, 6.0)
    averages = [b.average() for b in backends]
    for proxy in proxies:
        proxy.stop(timeout=10)
    assert set(statuses) == {200}, statuses
    return averages[-1] / (sum(averages) / 3)


def test_slow_backend_share_across_the_fleet_is_near_exact_counts(
    redis_server, fast_fast_slow, start_proxy
):
    """Three instances with 4 clients each, against one instance counting all 12 exactly.

    Exact counts (least_conn on one instance) are the best any count can do: 1.05-1.08x.
    The bar guards against a split that locks in: with the "peers moved like me" estimate
    applied to this instance's own finishes, every client went back to the backend it had
    just left and a 5-3-4 split held for good (1.28-1.33x in 3 runs of 4).
    """
    exact = _slow_ratio(redis_server, fast_fast_slow, start_proxy, "least_conn", 1)
    fleet = _slow_ratio(redis_server, fast_fast_slow, start_proxy, "least_outstanding", 3)
    print(f"\nslow backend / fair share: exact counts {exact:.3f}, fleet {fleet:.3f}")
    # measured 1.00-1.13x of exact with counts alone; 0.76x with the latency tie-break
    assert fleet <= exact * 1.15, (fleet, exact)


def test_a_backend_left_idle_for_being_slow_is_tried_again(
    redis_server, fast_fast_slow, start_proxy
):
    """One client: every backend is idle at each pick, so least_outstanding's near-tie goes
    to the fast ones, and the slow one got no request, hence no news that it might be fast
    again, for as long as the load stayed low.  Its mean latency is forgotten every
    MEAN_LATENCY_MEMORY (5 s): within 7 s it is tried again, and left again."""
    proxy = start_proxy(redis_server.url, "--strategy", "least_outstanding", "--no-access-log")
    closed_loop([proxy.port], 1, 1.0)  # warm up: every backend measured
    for backend in fast_fast_slow:
        backend.reset()
    statuses = closed_loop([proxy.port], 1, 7.0)
    assert set(statuses) == {200}, statuses
    counts = [b.count for b in fast_fast_slow]
    print(f"\nrequests per backend (fast, fast, slow): {counts}")
    assert counts[-1] >= 1, counts
    assert counts[-1] * 20 < sum(counts), counts
