"""Periodic work in small slices (issue 14's p99): every slice's work still done, exactly.

The sweeper, the metrics snapshot and the heartbeat walk the pools a slice at a time without
copying them whole first (redlb/slices.py), and split their system calls and encodings over
turns of the loop (bench/loop_turns.py measured each turn).  Behaviour only: every pool is
reached, the documents are the ones a walk in one go makes, the loop runs in between.
"""

from __future__ import annotations

import asyncio
import json
import os
from types import SimpleNamespace

from redlb import server
from redlb.fleet.publisher import Publisher, add_in_flight
from redlb.metrics import snapshot
from redlb.slices import slices


def test_slices_give_every_item_once_in_order():
    mapping = {f"k{n}": n for n in range(103)}
    chunks = list(slices(mapping, 25))
    assert [len(c) for c in chunks] == [25, 25, 25, 25, 3]
    assert [kv for c in chunks for kv in c] == list(mapping.items())
    assert list(slices({}, 25)) == []


def test_slices_of_a_mapping_that_grows_meanwhile_still_walk_it_whole():
    """The recorder gains a series while its series are being walked (a request of a new
    label set between two slices): nothing is skipped or given twice."""
    mapping = {n: n for n in range(60)}
    seen = []
    for chunk in slices(mapping, 25):
        seen += [k for k, _ in chunk]
        if len(seen) == 25:
            mapping[1000] = 1000  # changes the size: iterating on would raise
            mapping[1001] = 1001
    assert seen == [*range(60), 1000, 1001]


class _Conns:
    def __init__(self, key: str, busy: int, waiters: int = 0) -> None:
        self.backend = SimpleNamespace(key=key)
        self.busy = busy
        self.waiters = [None] * waiters


class _State:
    def __init__(self, n: int) -> None:
        self.conns = {"a": _Conns("b:1", n % 3, n % 2), "b": _Conns("b:2", 0)}
        self.expired: list[float] = []

    def expire(self, now: float) -> None:
        self.expired.append(now)


def _pools(count: int) -> dict[str, _State]:
    return {f"pool{n}": _State(n) for n in range(count)}


async def _count_turns(body) -> tuple[object, int]:
    """Run ``body`` (a coroutine) and count the loop's turns meanwhile."""
    turns = 0

    async def counter() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    task = asyncio.get_running_loop().create_task(counter())
    try:
        return await body, turns
    finally:
        task.cancel()


def test_the_heartbeat_counts_in_flight_a_slice_of_pools_a_turn():
    pools = _pools(230)
    ctx = SimpleNamespace(pools=pools)
    pub = Publisher(ctx, SimpleNamespace(up=False), SimpleNamespace(id="i"), 0)  # type: ignore[arg-type]
    in_flight, turns = asyncio.run(_count_turns(pub._in_flight_in_steps()))
    at_once: dict = {}
    add_in_flight(pools.items(), at_once)
    assert in_flight == at_once
    assert in_flight[("pool4", "b:1")] == 4 % 3 + 4 % 2  # busy and waiting, summed
    assert ("pool6", "b:1") not in in_flight and ("pool4", "b:2") not in in_flight  # idle
    assert turns >= 230 // 50


def test_the_heartbeat_encodes_the_table_once_and_the_same_json():
    """The heartbeat splices the table's part (1,000 pool names) encoded once per table: the
    text parses to the very document an encoding in one go makes, table changes included."""
    routes = [SimpleNamespace(label=f"host{n}.example.com/".encode()) for n in range(150)]
    table = SimpleNamespace(single=None, routes=routes)
    ctx = SimpleNamespace(pools=_pools(40), table=table, active_exchanges=3, clients={1, 2},
                          draining=False, config=SimpleNamespace(redis_timeout=1.0))  # fmt: skip
    instance = SimpleNamespace(id="i", host="h", pid=1, version="v", started=0.0, listen="l",
                               admin_listen=None)  # fmt: skip
    pub = Publisher(ctx, SimpleNamespace(up=False), instance, 0)  # type: ignore[arg-type]
    document = pub.document({})
    assert json.loads(pub.encode(document)) == json.loads(json.dumps(document))
    assert document["route_count"] == 150 and len(document["routes"]) == 100
    ctx.table = SimpleNamespace(single=None, routes=routes[:7])  # a new table
    ctx.pools = _pools(5)
    document = pub.document({})
    parsed = json.loads(pub.encode(document))
    assert parsed == json.loads(json.dumps(document))
    assert parsed["route_count"] == 7 and parsed["pools"] == sorted(_pools(5))
    document["pools"] = ["edited"]  # not the table's own list: encoded as it is
    assert json.loads(pub.encode(document))["pools"] == ["edited"]


def test_the_sweeper_expires_every_pool_a_slice_a_turn(monkeypatch):
    monkeypatch.setattr(server, "SWEEP_INTERVAL", 0.01)
    pools = _pools(2 * server.SWEEP_POOLS_SLICE + 7)
    ctx = SimpleNamespace(pools=pools, clients=set())

    async def until_swept() -> None:
        sweeper = asyncio.get_running_loop().create_task(server._sweep(ctx))  # type: ignore[arg-type]
        try:
            while not all(state.expired for state in pools.values()):
                await asyncio.sleep(0.005)
        finally:
            sweeper.cancel()

    _, turns = asyncio.run(asyncio.wait_for(_count_turns(until_swept()), 10))
    assert all(state.expired for state in pools.values())
    first = [state.expired[0] for state in pools.values()]
    assert len(set(first)) == 1  # one sweep, one clock reading, across its slices
    assert turns >= 3


def test_open_descriptors_are_counted_again_once_the_count_is_old(monkeypatch):
    """The gauge is a real count, at most FDS_MAX_AGE old (listing /proc/self/fd every
    second held a busy worker's loop for milliseconds)."""
    monkeypatch.setattr(snapshot, "_fds", [0, float("-inf"), 0])
    first = snapshot._open_fds(100.0)
    assert first == len(os.listdir("/proc/self/fd"))
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
    try:
        assert snapshot._open_fds(100.0 + snapshot.FDS_MAX_AGE / 2) == first  # still fresh
        assert snapshot._open_fds(100.0 + snapshot.FDS_MAX_AGE) == first + 5
    finally:
        for fd in opened:
            os.close(fd)


def test_the_snapshot_file_is_replaced_whole(tmp_path):
    """Written in two steps (the file, then the rename): a reader sees the old document or
    the new one, never a part."""
    snapshot.write(tmp_path, '{"a": 1}')
    steps = snapshot.write_in_steps(tmp_path, '{"a": 2}')
    next(steps)  # the loop runs here
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text()) == {"a": 1}
    for _ in steps:
        pass
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.json"]


def test_the_access_log_keeps_one_flush_timer_whatever_the_batches(tmp_path):
    """A batch handed over for its size leaves the pending timer as it is: a new timer after
    each such flush made a second, small batch for every full one under load (each batch
    wakes the writer thread on the loop's core).  Every line is still written."""
    from redlb.accesslog import FLUSH_DELAY, FLUSH_LINES, AccessLog

    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    timers: list[float] = []
    sent = FLUSH_LINES + FLUSH_LINES // 2

    async def burst() -> None:
        loop = asyncio.get_running_loop()
        real = loop.call_later

        def counted(delay, callback, *args):  # type: ignore[no-untyped-def]
            timers.append(delay)
            return real(delay, callback, *args)

        loop.call_later = counted  # type: ignore[method-assign]
        log = AccessLog(True, fd=fd)
        for n in range(sent):  # one turn of the loop: no timer can fire meanwhile
            log.request(b"GET", b"/%d" % n, 200, b"OK", None, 0.001, 2)
        assert len(timers) == 1, timers
        await asyncio.sleep(FLUSH_DELAY * 4)  # the one timer hands over the rest
        assert not log.lines
        log.close()

    try:
        asyncio.run(burst())
    finally:
        os.close(fd)
    lines = path.read_bytes().splitlines()
    assert len(lines) == sent and lines[-1].startswith(b"GET /%d => 200" % (sent - 1))


def test_the_resync_slices_wrap_around_every_pool():
    """The backstop's and the no-script resync's slices of pools, taken without copying the
    whole list: the same slices as the rotated copy gave, every pool within a lap."""
    from redlb.store.routes import _wrapping

    names = [f"pool{n}" for n in range(23)]
    for start in range(len(names)):
        for count in (1, 5, 22):
            assert _wrapping(names, start, count) == (names[start:] + names[:start])[:count]
    seen: set[str] = set()
    cursor = 0
    for _ in range(-(-len(names) // 5)):
        seen.update(_wrapping(names, cursor % len(names), 5))
        cursor += 5
    assert seen == set(names)


def test_the_snapshot_encodes_only_the_series_that_moved_and_stays_exact():
    """A request series is encoded again only when its count moved (its other fields move
    with it); between two snapshots some series move, some do not: the second document holds
    every series as it is now, and encoding gives the loop a turn every ENCODE_SLICE."""
    from redlb.metrics.recorder import Recorder
    from redlb.proxy.context import Stats

    recorder = Recorder()

    def serve(n: int, seconds: float) -> None:
        recorder.count((b"/r%d" % n, "p", "b:1", b"GET", 2), 5, 10 + n, seconds, seconds / 2)

    for n in range(37):
        serve(n, 0.002)
    ctx = SimpleNamespace(recorder=recorder, stats=Stats(), pools={}, clients=set(),
                          access_log=SimpleNamespace(dropped=0), active_exchanges=0,
                          open_tunnels=0)  # fmt: skip
    link = SimpleNamespace(reconnects=0, up=True)

    def rows(steps: list) -> dict:
        parsed = json.loads(steps[-1])
        return {row[0]: row[5] for row in parsed["requests"]}

    first = list(snapshot.take_in_steps(ctx, link, 0, 0.0))  # type: ignore[arg-type]
    assert len(first) - 1 >= 37 // snapshot.ENCODE_SLICE
    assert rows(first) == {f"/r{n}": recorder.requests[(b"/r%d" % n, "p", "b:1", b"GET", 2)]
                           for n in range(37)}  # fmt: skip
    serve(3, 0.3)  # moved: count, bytes, seconds and buckets
    serve(3, 0.004)
    serve(36, 7.0)
    serve(99, 0.001)  # a new series
    second = rows(list(snapshot.take_in_steps(ctx, link, 0, 0.0)))  # type: ignore[arg-type]
    now = {k[0].decode(): v for k, v in recorder.requests.items()}
    assert second == now
    assert second["/r3"][0] == 3 and second["/r36"][0] == 2 and second["/r99"][0] == 1
