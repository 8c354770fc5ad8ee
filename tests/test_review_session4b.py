"""Review of the shared in-flight publisher (store/inflight.py, one loop a worker).

The publisher in this process on a real Redis (fake peers written by the test), as in
tests/test_inflight_scale.py, and real `redlb serve` processes for shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

from redlb.address import Backend
from redlb.balancer.load import LoadView
from redlb.store.client import make_client
from redlb.store.inflight import InflightPublisher
from redlb.store.keys import Keys
from redlb.store.link import RedisLink
from support import CountingBackend, ScriptedBackend, request, wait_for, wait_for_async


def _peer(sync, pool: str, count: str = "2.00") -> None:  # type: ignore[no-untyped-def]
    sync.zadd(f"redlb:{pool}:inflight", {"peer": int(time.time() * 1000)})
    sync.set(f"redlb:{pool}:inflight:peer", f"127.0.0.1:1={count}", px=60_000)


async def test_a_pool_whose_peers_vanish_while_it_published_still_goes_dormant(redis_server):
    """Its last SET had counts, then its peers left the index (pruned after a scale-down, or
    FLUSHALL): with no peer, nothing is written, and ``published`` stayed True for good, so
    the pool never fell dormant (every such pool of an instance left alone kept its rounds
    and index reads for ever)."""
    sync = redis_server.client()
    _peer(sync, "p")
    link = RedisLink(make_client(redis_server.url, 0.5), "test")
    publisher = InflightPublisher(link, "me", 0.5, dormant_after=1.0)
    view = LoadView()
    part = publisher.join(Keys("p"), view)
    backend = Backend("127.0.0.1", 2)
    try:
        view.started(backend)
        assert await wait_for_async(
            lambda: b"127.0.0.1:2=" in (sync.get("redlb:p:inflight:me") or b""), 3
        )
        sync.zrem("redlb:p:inflight", "peer")  # the peer is gone from the index
        sync.delete("redlb:p:inflight:peer")
        assert await wait_for_async(lambda: part.others == [], 3)
        view.finished(backend, 0.1)
        assert await wait_for_async(lambda: part in publisher.dormant, 5), (
            part.published,
            part.others,
        )
    finally:
        task = publisher.task
        part.leave()
        if task is not None:
            await asyncio.wait([task], timeout=5)
        await link.close()


async def test_a_pool_that_leaves_mid_round_keeps_no_view(redis_server):
    """A pool leaves (strategy changed, route removed) while a round with it is in flight:
    the round's answer must not set the peers' counts on the view it left (``leave`` dropped
    them; a view set after it stays until the pool joins again)."""
    sync = redis_server.client()
    for pool in ("a", "b"):
        _peer(sync, pool)
    link = RedisLink(make_client(redis_server.url, 2.0), "test")
    publisher = InflightPublisher(link, "me", 2.0)
    views = {pool: LoadView() for pool in ("a", "b")}
    parts = {pool: publisher.join(Keys(pool), view) for pool, view in views.items()}
    try:
        assert await wait_for_async(lambda: all(v.others for v in views.values()), 3)
        views["a"].started(Backend("127.0.0.1", 2))  # busy: rounds every 25 ms
        views["b"].started(Backend("127.0.0.1", 2))
        sleeper = redis_server.client()
        blocked = asyncio.get_running_loop().run_in_executor(
            None, lambda: sleeper.execute_command("DEBUG", "SLEEP", "1.0")
        )
        await asyncio.sleep(0.6)  # a round is waiting on Redis now (the loop looks 4 times a s)
        parts["a"].leave()
        assert views["a"].others == {}
        await blocked
        await asyncio.sleep(0.3)  # the round's answer, and more rounds for "b"
        assert views["b"].others == {"127.0.0.1:1": 2.0}
        assert views["a"].others == {}, views["a"].others
        assert views["a"].peers == 0
    finally:
        task = publisher.task
        for part in parts.values():
            part.leave()
        if task is not None:
            await asyncio.wait([task], timeout=5)
        await link.close()


def test_sigterm_with_counting_pools_exits_cleanly(redis_server, backends, start_proxy):
    """SIGTERM with the shared publisher running for several pools: prompt exit, and no
    task destroyed pending."""
    client = redis_server.client()
    for p in range(5):
        client.rpush(f"pool{p}", *[b.address for b in backends])
    client.hset("redlb:routes", mapping={f"h{p}/": f"pool{p}" for p in range(5)})
    proxy = start_proxy(redis_server.url, "--strategy", "least_outstanding", "--no-access-log")

    def routed() -> bool:
        return all(
            request(proxy.port, "GET", "/", headers={"Host": f"h{p}"})[0] == 200 for p in range(5)
        )

    assert wait_for(routed, 20)
    process = proxy.process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError("redlb did not exit within 15 s of SIGTERM") from None
    said = proxy.log()
    assert "Task was destroyed" not in said, said[-2000:]
    assert "Traceback" not in said, said[-2000:]


async def test_a_round_timed_out_mid_reply_leaves_no_shifted_view(redis_server):
    """Redis slower than the timeout (DEBUG SLEEP) while rounds are in flight: the round is
    abandoned, the views dropped, and once Redis answers again every pool reads its own
    peer's count (a connection left mid-reply would hand one pool another's answers)."""
    sync = redis_server.client()
    pools = [f"q{p}" for p in range(6)]
    for p, pool in enumerate(pools):
        _peer(sync, pool, f"{p + 1}.00")
    link = RedisLink(make_client(redis_server.url, 0.3), "test")
    publisher = InflightPublisher(link, "me", 0.3)
    views = [LoadView() for _ in pools]
    parts = [publisher.join(Keys(pool), view) for pool, view in zip(pools, views, strict=True)]

    def right() -> bool:
        return all(v.others == {"127.0.0.1:1": p + 1.0} for p, v in enumerate(views))

    try:
        assert await wait_for_async(right, 3)
        for view in views:
            view.started(Backend("127.0.0.1", 2))
        sleeper = redis_server.client()
        for _ in range(2):
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: sleeper.execute_command("DEBUG", "SLEEP", "1.0")
            )
            assert all(v.others == {} for v in views)  # dropped, not kept stale
        assert await wait_for_async(right, 5), [v.others for v in views]
        # and it stays right over many rounds
        for _ in range(20):
            await asyncio.sleep(0.05)
            assert right(), [v.others for v in views]
    finally:
        task = publisher.task
        for part in parts:
            part.leave()
        if task is not None:
            await asyncio.wait([task], timeout=5)
        await link.close()


async def test_after_flushall_two_instances_find_each_other_soon(redis_server):
    """FLUSHALL (the index gone) while two instances are busy on a pool: each reads an index
    without itself in it; they must announce again then, not at their next 10 s announce
    (until then each counts the other as idle: the herd the fleet view is there to stop)."""
    links = [RedisLink(make_client(redis_server.url, 0.5), f"l{i}") for i in range(2)]
    publishers = [
        InflightPublisher(link, name, 0.5) for link, name in zip(links, "AB", strict=True)
    ]
    views = [LoadView(), LoadView()]
    parts = [pub.join(Keys("f"), v) for pub, v in zip(publishers, views, strict=True)]
    try:
        views[0].started(Backend("127.0.0.1", 1))
        views[1].started(Backend("127.0.0.1", 2))
        assert await wait_for_async(lambda: views[0].others == {"127.0.0.1:2": 1.0}, 5)
        assert await wait_for_async(lambda: views[1].others == {"127.0.0.1:1": 1.0}, 5)
        await asyncio.sleep(1.5)  # past the announce at the start
        redis_server.client().flushall()
        await asyncio.sleep(1.5)  # each has read the empty index (once a second when busy)
        assert await wait_for_async(
            lambda: (
                views[0].others == {"127.0.0.1:2": 1.0} and views[1].others == {"127.0.0.1:1": 1.0}
            ),
            4,
        ), [v.others for v in views]
    finally:
        tasks = [pub.task for pub in publishers]
        for part in parts:
            part.leave()
        await asyncio.wait([t for t in tasks if t is not None], timeout=5)
        for link in links:
            await link.close()


# Real `redlb serve` pairs: one holds a request on the slow backend, the other must avoid it.


def _fleet_avoids_the_held_backend(redis_server, holder, quiet, slow) -> bool:  # type: ignore[no-untyped-def]
    """The holder puts one request on the slow backend; the quiet instance's picks avoid it
    within a deadline (the fleet view works)."""
    deadline = time.monotonic() + 5
    while slow.inflight == 0 and time.monotonic() < deadline:
        threading.Thread(
            target=request, args=(holder.port, "GET", "/"), kwargs={"timeout": 10}, daemon=True
        ).start()
        wait_for(lambda: slow.inflight > 0, 0.3)
    if slow.inflight == 0:
        return False

    def picks() -> Counter[str]:
        return Counter(request(quiet.port, "GET", "/")[1].split()[1].decode() for _ in range(5))

    return wait_for(lambda: picks() == {"fast": 5}, 10)


def test_the_fleet_view_works_again_after_redis_paused(redis_server, loop_thread, start_proxy):
    """Redis stopped (SIGSTOP) longer than the timeout, then resumed: the loop survived,
    the view came back, the busy slow backend avoided again."""
    slow = CountingBackend(loop_thread, "slow", 3.0).start()
    fast = CountingBackend(loop_thread, "fast", 0.0).start()
    try:
        redis_server.cli("RPUSH", "servers", slow.address, fast.address)
        args = ("--strategy", "least_outstanding", "--no-access-log", "--redis-timeout", "0.5")
        holder, quiet = (start_proxy(redis_server.url, *args) for _ in range(2))
        assert _fleet_avoids_the_held_backend(redis_server, holder, quiet, slow)
        assert wait_for(lambda: slow.inflight == 0, 10)
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        redis_server.process.send_signal(signal.SIGCONT)
        assert wait_for(lambda: slow.inflight == 0, 10)
        assert _fleet_avoids_the_held_backend(redis_server, holder, quiet, slow)
        for proxy in (holder, quiet):
            said = proxy.log()
            assert said.count("cannot share in-flight counts") <= 1, said[-2000:]
            assert "Traceback" not in said, said[-2000:]
    finally:
        slow.stop()
        fast.stop()


def test_a_pool_switched_off_and_on_counting_stops_and_resumes_publishing(
    redis_server, loop_thread, start_proxy
):
    """Strategy set to round_robin in the pool's settings while a peer and a load are there:
    this instance's counts key expires and is not written again; back to least_outstanding,
    it is published again (the pool rejoined the shared loop)."""
    slow = CountingBackend(loop_thread, "slow", 2.0).start()
    try:
        redis_server.cli("RPUSH", "servers", slow.address)
        args = ("--strategy", "least_outstanding", "--no-access-log")
        proxies = [start_proxy(redis_server.url, *args) for _ in range(2)]
        client = redis_server.client()
        assert wait_for(lambda: client.zcard("redlb:servers:inflight") == 2, 10)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                request(proxies[0].port, "GET", "/", timeout=10)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()

        def keys() -> list[bytes]:
            return sorted(k for k in client.keys("redlb:servers:inflight:*") if client.get(k))

        try:
            assert wait_for(lambda: len(keys()) == 1, 5), keys()
            client.hset("redlb:servers:settings", "strategy", "round_robin")
            assert wait_for(lambda: keys() == [], 15), keys()
            time.sleep(3.0)
            assert keys() == [], keys()  # not written again while it does not count
            client.hset("redlb:servers:settings", "strategy", "least_outstanding")
            assert wait_for(lambda: len(keys()) == 1, 15), keys()
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
    finally:
        slow.stop()


def test_fleet_counts_return_to_zero_after_errors_retries_timeouts_and_disconnects(
    redis_server, loop_thread, backends, start_proxy
):
    """Two instances, a pool with a backend that closes at once (error, retried), one that
    never answers (upstream timeout) and one slow (clients hang up first), and healthy ones:
    once the clients are done, the counts published in Redis go back to nothing."""

    async def closes(reader, writer, n) -> None:  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")

    async def silent(reader, writer, n) -> None:  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    closer = ScriptedBackend(loop_thread, closes).start()
    hanger = ScriptedBackend(loop_thread, silent).start()
    slow = CountingBackend(loop_thread, "slow", 3.0).start()
    try:
        addresses = [closer.address, hanger.address, slow.address, *(b.address for b in backends)]
        redis_server.cli("RPUSH", "servers", *addresses)
        args = ("--strategy", "least_outstanding", "--no-access-log", "--upstream-timeout", "0.5")
        proxies = [start_proxy(redis_server.url, *args) for _ in range(2)]
        client = redis_server.client()
        assert wait_for(lambda: client.zcard("redlb:servers:inflight") == 2, 10)

        def clients(port: int) -> None:
            for i in range(30):
                if i % 3 == 0:  # hang up before the answer
                    with socket.create_connection(("127.0.0.1", port), 5) as sock:
                        sock.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
                        time.sleep(0.05)
                else:
                    with contextlib.suppress(OSError):
                        request(port, "GET", "/", timeout=5)

        threads = [
            threading.Thread(target=clients, args=(p.port,), daemon=True)
            for p in proxies
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()

        def published() -> dict[bytes, bytes]:
            return {k: v for k in client.keys("redlb:servers:inflight:*") if (v := client.get(k))}

        assert wait_for(lambda: published() != {}, 5)  # counts were shared meanwhile
        for thread in threads:
            thread.join(60)
        assert wait_for(lambda: slow.inflight == 0, 10)
        assert wait_for(lambda: published() == {}, 5), published()
        time.sleep(2.0)
        assert published() == {}, published()
    finally:
        closer.stop()
        hanger.stop()
        slow.stop()


async def test_a_dormant_pool_is_woken_at_the_next_idle_look(redis_server):
    """The loop sleeps IDLE_LOOK between idle looks, but by time.monotonic the sleep can be a
    few ms shorter (uvloop times it from the loop's time, cached at the start of an iteration
    that then spent ms publishing): the dormant pools were then skipped for a whole look, and
    a request waited up to 0.5 s, not IDLE_LOOK, for its pool to read its peers (measured:
    wake latency max 0.499 s over 20 wakes)."""
    from redlb.store.inflight import IDLE_LOOK

    link = RedisLink(make_client(redis_server.url, 0.5), "test")
    publisher = InflightPublisher(link, "me", 0.5)
    view = LoadView()
    part = publisher.join(Keys("w"), view)
    task = publisher.task
    assert task is not None
    task.cancel()  # the rule itself, with the clock readings the loop would have
    await asyncio.wait([task])
    try:
        publisher.fall_dormant(part)
        t0 = 1000.0
        publisher.look(t0)
        view.started(Backend("127.0.0.1", 2))
        publisher.look(t0 + IDLE_LOOK - 0.004)  # slept IDLE_LOOK by the loop's clock
        assert part in publisher.awake
    finally:
        part.leave()
        await link.close()


async def test_the_last_leave_and_a_join_in_the_same_turn_keep_publishing(redis_server):
    """A worker's only counting pool switches strategy (least_outstanding to peak_ewma):
    ``leave`` ends the loop and a ``join`` follows in the same turn: the pool is published
    by a running loop, and only one loop runs."""
    from redlb.store.inflight import publisher_for

    sync = redis_server.client()
    _peer(sync, "s")
    link = RedisLink(make_client(redis_server.url, 0.5), "test")
    view = LoadView()
    first = publisher_for(link, "me", 0.5)
    part = first.join(Keys("s"), view)
    old_task = first.task
    try:
        assert await wait_for_async(lambda: view.others == {"127.0.0.1:1": 2.0}, 3)
        part.leave()
        second = publisher_for(link, "me", 0.5)
        part = second.join(Keys("s"), view)
        assert old_task is not None
        await asyncio.wait([old_task], timeout=2)
        assert old_task.done()
        assert second.task is not None and not second.task.done()
        assert publisher_for(link, "me", 0.5) is second
        view.started(Backend("127.0.0.1", 2))
        assert await wait_for_async(
            lambda: b"127.0.0.1:2=" in (sync.get("redlb:s:inflight:me") or b""), 3
        )
        assert view.others == {"127.0.0.1:1": 2.0}
    finally:
        task = part.publisher.task
        part.leave()
        if task is not None:
            await asyncio.wait([task], timeout=5)
        await link.close()
