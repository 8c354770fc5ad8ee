"""Review of the rendezvous table (branch hrw): defects reproduced against the pure module
and real processes on a real Redis."""

from __future__ import annotations

import random
import time
from collections import Counter

from redlb.address import Backend
from redlb.balancer.load import LoadView
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.snapshot import Snapshot
from support import readiness_during, request

A, B = Backend("10.0.0.1", 80), Backend("10.0.0.2", 80)


def _share_of_a(candidates: Snapshot, balance: float) -> float:
    """A's share of 20,000 distinct keys, about 60 requests in flight throughout."""
    load = LoadView()
    strategy = RendezvousHash(load, balance=balance)
    rng = random.Random(3)
    in_flight: list[Backend] = []
    got: Counter[Backend] = Counter()
    for _ in range(20_000):
        backend = strategy.pick(candidates, b"user-%d" % rng.randrange(10**9))
        load.started(backend)
        in_flight.append(backend)
        got[backend] += 1
        if len(in_flight) > 60:
            load.finished(in_flight.pop(rng.randrange(len(in_flight))), 0.01)
    return got[A] / sum(got.values())


def test_a_duplicated_entry_keeps_its_second_share_under_bounded_load() -> None:
    """`redlb backend add --allow-duplicate` gives a backend a second share: [A, A, B] is
    A:B = 2:1, as the table itself has it.  The bound capped each *entry* at (1 + eps) / 3 of
    the load but counted the *backend's* in-flight requests (both entries' keys), so with
    bounded loads on (the default) A was held near 1/2 and its keys spilled onto B."""
    duplicated = Snapshot.of([A, A, B])
    assert abs(_share_of_a(duplicated, 0) - 2 / 3) < 0.02  # the table: 2:1
    assert abs(_share_of_a(Snapshot.of([A, B], [2, 1]), 0.25) - 2 / 3) < 0.03  # a weight: 2:1
    assert abs(_share_of_a(duplicated, 0.25) - 2 / 3) < 0.03  # the duplicate: the same


def test_hash_table_build_with_many_distinct_weights_keeps_the_loop_answering(
    redis_server, backends, start_proxy
):
    """1,000 backends with weights 999 and 1000 (no common divisor; a slow-start ramp makes
    any weights so, x10 with one at a tenth step): the schedule has one entry per draw of a
    unit of time, sum of the weights = 999,500 tuples sorted and as many slice assignments
    in Python.  The build took 8 s (compiled) and 228 MB; the loop must keep answering
    readiness probes within 2 s while the first hashed request builds the table."""
    first = backends[0]
    dead = [f"127.0.0.1:{port}" for port in range(20001, 20001 + 999)]
    redis_server.cli("RPUSH", "servers", first.address, *dead)
    weights: list[str] = []
    for i, address in enumerate([first.address, *dead]):
        weights += [address, "1000" if i % 2 else "999"]
    redis_server.cli("HSET", "redlb:servers:weights", *weights)
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "hash",
                     "hash_key", "header:X-User", "hash_balance", "0")  # fmt: skip
    proxy = start_proxy(redis_server.url, "--no-access-log")

    def hashed_request() -> None:
        try:
            request(proxy.port, "GET", "/", headers={"Host": "h", "X-User": "u"}, timeout=60)
        except OSError:
            pass  # its backend may be a dead port: the build is what is measured

    answered = readiness_during(proxy, hashed_request, join=70)
    assert answered and set(answered) == {200}, Counter(answered)


def _views(ports: list[int], users: list[str]) -> list[dict[str, str]]:
    """Each instance's backend for each user."""
    views = []
    for port in ports:
        view = {}
        for user in users:
            status, body, _ = request(port, "GET", "/", headers={"Host": "h", "X-User": user})
            assert status == 200, (status, body)
            view[user] = body.split()[1].decode()
        views.append(view)
    return views


def _homes(ports: list[int], users: list[str]) -> dict[str, str]:
    """Each user's backend, the same from every instance (asserted)."""
    first, *others = _views(ports, users)
    for other in others:
        assert other == first, {u: (first[u], other[u]) for u in users if first[u] != other[u]}
    return first


def test_hash_homes_hold_through_order_weights_health_and_a_redis_restart(
    redis_server, backends, start_proxy
):
    """Two real instances on one Redis: the same key reaches the same backend from both,
    whatever the list order, with explicit equal weights as without, and across a Redis
    restart; a backend that fails its health checks moves exactly its own keys, and they
    come back to it when it recovers."""
    from support import wait_for

    addresses = [b.address for b in backends]
    redis_server.cli("RPUSH", "servers", *addresses)
    redis_server.cli("HSET", "redlb:servers:settings", "strategy", "hash",
                     "hash_key", "header:X-User")  # fmt: skip
    health = ("--health-path", "/", "--health-interval", "0.2", "--health-fall", "1",
              "--health-rise", "1", "--eject-base-time", "1", "--no-access-log")  # fmt: skip
    ports = [start_proxy(redis_server.url, *health).port for _ in range(2)]
    users = [f"user-{i}" for i in range(80)]
    homes = _homes(ports, users)
    assert len(set(homes.values())) == len(backends)
    # Explicit equal weights are no weights; another order is the same membership.
    redis_server.cli("HSET", "redlb:servers:weights", *[x for a in addresses for x in (a, "5")])
    redis_server.cli("RPUSH", "reordered", *reversed(addresses))
    redis_server.cli("RENAME", "reordered", "servers")
    time.sleep(1.5)
    assert _homes(ports, users) == homes
    # A backend fails its health checks: only its users move, the same way on both.
    gone = backends[-1]
    gone.stop()
    assert wait_for(lambda: all(gone.name not in v.values() for v in _views(ports, users)), 10)
    moved = _homes(ports, users)
    assert {u for u in users if moved[u] != homes[u]} == {u for u in users if homes[u] == gone.name}
    gone.start()  # recovers (health, then the ejection's 1 s): its users come back
    assert wait_for(lambda: all(v == homes for v in _views(ports, users)), 20)
    # Redis restarts (AOF: the data is kept): nothing moves.
    redis_server.kill()
    redis_server.start()
    time.sleep(2.0)
    assert _homes(ports, users) == homes


def test_windows_of_time_merge_the_draws_as_units_do() -> None:
    """The fix for the stall above merges big weights' draws by windows of time: the same
    table as by units (the same first drawer of every slot), so every instance agrees
    whichever path its build takes."""
    from redlb.balancer.rendezvous import build_table

    rng = random.Random(7)
    for n in (2, 3, 17, 300):  # 300 weighted 1..1000: a unit holds about 150,000 draws
        names = [f"10.2.{i // 256}.{i % 256}:{80 + i}" for i in range(n)]
        spread = [rng.randint(1, 1000) for _ in range(n)]
        for weights in (
            [],
            [rng.randint(1, 9) for _ in range(n)],
            [(5, 10, 15)[i % 3] for i in range(n)],
            spread,
        ):
            assert build_table(names, weights, by_window=False) == build_table(
                names, weights, by_window=True
            ), (n, weights)
