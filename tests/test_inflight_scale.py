"""Fleet-wide least outstanding over many pools: what publishing counts costs, and its view.

One publisher a worker (store/inflight.py): the Redis commands of an instance with 1,000
counting pools follow the pools that serve requests, not the pools it has.  Behaviour bounds
here: commands counted with INFO commandstats over a window, and picks that avoid a backend
a peer holds requests on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from support import CountingBackend, Load, raw_exchange, request, wait_for, wait_for_async

POOLS = 1000
# A pool with nothing here for this long is dormant (store/inflight.py DORMANT_AFTER), and
# a margin for the rounds in progress.
SETTLE = 12.0


def _seed(redis_server, backends) -> None:
    """1,000 pools of the three backends, 10,000 routes (tests/test_idle_cost.py's table)."""
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for p in range(POOLS):
        pipe.rpush(f"pool{p}", *[b.address for b in backends])
    routes = {f"host{i}.example.com/": f"pool{i % POOLS}" for i in range(5000)}
    routes.update({f"/svc{i}/v{i % 3}": f"pool{(i * 13) % POOLS}" for i in range(5000)})
    pipe.hset("redlb:routes", mapping=routes)
    pipe.execute()


def _routed(proxy, host: str = "host7.example.com") -> bool:
    response, _ = raw_exchange(
        proxy.port, b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % host.encode()
    )
    return response.startswith(b"HTTP/1.1 200 ")


def _inflight_commands(redis_server, seconds: float) -> list[bytes]:
    """The commands Redis ran over ``seconds`` that name an in-flight key (MONITOR)."""
    seen: list[bytes] = []
    with socket.create_connection(("127.0.0.1", redis_server.port), 5) as sock:
        sock.sendall(b"MONITOR\r\n")
        buffered = b""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buffered += chunk
            *lines, buffered = buffered.split(b"\r\n")
            seen.extend(line for line in lines if b":inflight" in line)
    return seen


def _rate(redis_server, seconds: float) -> float:
    return len(_inflight_commands(redis_server, seconds)) / seconds


def test_idle_counting_pools_cost_redis_nothing(redis_server, backends, start_proxy):
    """Two instances, 1,000 least_outstanding pools each, every pool with a peer: idle, the
    pools nobody sends requests to cost nothing (it was 2,900 commands/s, some 1.4 a second
    per pool and instance); a load on one pool costs that pool's rounds, not 1,000 pools'."""
    _seed(redis_server, backends)
    args = ("--strategy", "least_outstanding", "--no-access-log")
    proxies = [start_proxy(redis_server.url, *args) for _ in range(2)]
    assert all(wait_for(lambda p=p: _routed(p), 30) for p in proxies)
    time.sleep(SETTLE)
    idle = _rate(redis_server, 5.0)
    print(f"\nidle, 2 instances x {POOLS} pools: {idle:.1f} in-flight commands/s")
    assert idle < 20, idle
    with Load(proxies[0].port, rate=200, connections=4, path="/svc5/v2") as load:
        time.sleep(1.0)  # the pool wakes up
        sent = load.result.sent
        busy = _rate(redis_server, 5.0)
        sent = load.result.sent - sent
    assert load.result.failed == 0, load.result.errors
    print(f"load on one pool, {sent / 5:.0f} requests/s: {busy:.1f} in-flight commands/s")
    # One busy pool: a round every 25-100 ms of two commands (its SET and MGET), plus the
    # index once a second; its peer's pool is idle here (it reads the index when woken).
    assert busy < 150, busy
    assert all(_routed(p) for p in proxies)


def test_a_dormant_pool_reads_its_peers_again_on_its_first_request(
    redis_server, loop_thread, start_proxy
):
    """Dormant (nothing here for 10 s): its peers are not read at all.  The first request
    wakes it; its next picks see what a peer holds again."""
    slow = CountingBackend(loop_thread, "slow", 4.0).start()
    fast = CountingBackend(loop_thread, "fast", 0.0).start()
    try:
        redis_server.cli("RPUSH", "servers", slow.address, fast.address)
        args = ("--strategy", "least_outstanding", "--no-access-log")
        quiet, holder = (start_proxy(redis_server.url, *args) for _ in range(2))
        client = redis_server.client()
        assert wait_for(lambda: client.zcard("redlb:servers:inflight") == 2, 5)
        time.sleep(SETTLE)
        assert _inflight_commands(redis_server, 3.0) == []  # a dormant pool costs nothing

        def hold() -> None:  # the holder's requests until one sits on the slow backend
            deadline = time.monotonic() + 5
            while slow.inflight == 0 and time.monotonic() < deadline:
                request(holder.port, "GET", "/", headers={"Host": "h"}, timeout=10)

        threads = [threading.Thread(target=hold)]
        threads[0].start()
        assert wait_for(lambda: slow.inflight == 1, 5)

        def published() -> list[bytes]:
            names = client.zrange("redlb:servers:inflight", 0, -1)
            return [client.get(f"redlb:servers:inflight:{n.decode()}") or b"" for n in names]

        # The holder's pool woke: it reads the index, finds its peer, publishes its count.
        assert wait_for(lambda: any(v.startswith(slow.address.encode()) for v in published()), 3)

        def picks() -> Counter[str]:
            return Counter(
                request(quiet.port, "GET", "/", headers={"Host": "h"})[1].split()[1].decode()
                for _ in range(5)
            )

        # The quiet instance's first picks may use its own counts only (both idle: one may
        # go to the slow backend and wait for it); once woken, the slow one, busy on the
        # peer, is avoided.
        assert wait_for(lambda: picks() == {"fast": 5}, 10)
        assert slow.inflight <= 2
        for thread in threads:
            thread.join(15)
    finally:
        slow.stop()
        fast.stop()


# The publisher itself, in this process, on a real Redis (short dormancy, fake peers).


async def test_one_loop_for_all_pools_dormancy_and_redis_down(redis_server, caplog):
    import asyncio
    import logging

    from redlb.address import Backend
    from redlb.balancer.load import LoadView
    from redlb.store.client import make_client
    from redlb.store.inflight import IDLE_LOOK, InflightPublisher
    from redlb.store.keys import Keys
    from redlb.store.link import RedisLink

    caplog.set_level(logging.INFO, logger="redlb.inflight")
    pools = 300
    sync = redis_server.client()

    def peer_publishes(count: str) -> None:  # another instance, in every pool
        pipe = sync.pipeline(transaction=False)
        for p in range(pools):
            pipe.zadd(f"redlb:p{p}:inflight", {"peer": int(time.time() * 1000)})
            pipe.set(f"redlb:p{p}:inflight:peer", f"127.0.0.1:1={count}", px=2000)
        pipe.execute()

    peer_publishes("2.00")
    link = RedisLink(make_client(redis_server.url, 0.5), "test")
    publisher = InflightPublisher(link, "me", 0.5, dormant_after=1.5)
    views = [LoadView() for _ in range(pools)]
    parts = [publisher.join(Keys(f"p{p}"), view) for p, view in enumerate(views)]
    try:
        # Every pool reads its peer within its first round or two (index, then counts).
        assert await wait_for_async(lambda: all(v.others == {"127.0.0.1:1": 2.0} for v in views), 3)
        # One loop: over 1 s idle, about 1 / IDLE_LOOK wakeups, whatever the pools.
        woken = publisher.wakeups
        await asyncio.sleep(1.0)
        assert publisher.wakeups - woken <= 2 / IDLE_LOOK
        # Idle 1.5 s: dormant, the view dropped, and nothing sent for them any more.
        assert await wait_for_async(lambda: all(v.others == {} for v in views), 3)
        seen = await asyncio.to_thread(_inflight_commands, redis_server, 1.5)
        assert seen == [], seen[:3]
        # A request on one pool wakes it: its peers are read again, the others stay dormant.
        peer_publishes("3.00")
        views[7].started(Backend("127.0.0.1", 2))
        assert await wait_for_async(lambda: views[7].others == {"127.0.0.1:1": 3.0}, 2)
        assert all(v.others == {} for i, v in enumerate(views) if i != 7)
        assert await wait_for_async(
            lambda: b"127.0.0.1:2=" in (sync.get("redlb:p7:inflight:me") or b""), 2
        )
        # Redis down: the woken pool's view is dropped, said once; back, it is read again.
        redis_server.kill()
        assert await wait_for_async(lambda: views[7].others == {}, 3)
        await asyncio.sleep(1.5)
        warned = [r for r in caplog.records if "cannot share in-flight counts" in r.message]
        assert len(warned) == 1, warned
        redis_server.start()
        peer_publishes("4.00")
        assert await wait_for_async(lambda: views[7].others == {"127.0.0.1:1": 4.0}, 5)
        assert any("publishing in-flight counts again" in r.message for r in caplog.records)
    finally:
        task = publisher.task
        for part in parts:
            part.leave()
        assert task is not None
        await asyncio.wait([task], timeout=5)
        assert task.done()  # the last pool's leave ends the loop
        await link.close()
