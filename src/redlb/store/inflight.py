"""Publishing this instance's in-flight counts, reading the fleet's (least outstanding).

One publisher a worker (per Redis link) serves every pool whose strategy counts (``join``
when the pool starts, ``leave`` when it stops): one loop, and each of its rounds one
pipelined round trip for every pool due.  A pool's part of a round:
- ``SET redlb:{P}:inflight:{instance} "backend=n,..." PX TTL``: this instance's mean count
  per backend over the pool's round (LoadView.take_means), replaced whole; the TTL makes a
  crashed instance's counts vanish on their own.  A mean, not an instant's sample: a
  backend answering in 20 ms is mostly at 0 at any instant, and the fleet herded onto a
  slow backend whose requests (always visible) then looked no worse than the fast ones';
- ``MGET`` of the other instances' keys, summed into ``LoadView.others``.
The instances are found in ``redlb:{P}:inflight`` (ZSET instance -> last announce, ms):
read once a second (every 5 s when idle), this instance announced every 10 s (and at the
next round when a read of the index lacks it: FLUSHALL, an empty replica), instances silent
for a minute pruned.

What it costs, per pool and worker:
- busy with peers: a round every 25 ms per request in flight here, 25 to 100 ms, of 2
  commands: 20 to 80 a second whatever the rate (at 10,000 requests/s, some 40 in flight,
  0.002 commands per request).  Fresh where one request is a large part of the picture,
  cheap where many are in flight (tests/test_review_strategies.py: at 4 clients per
  instance the slow backend's share is near that of exact counts);
- alone (no other instance in the index): nobody reads this instance's counts, so none are
  written; a peer that appears is seen within a second, and it counts this instance as
  idle until then.  About one command a second (the index);
- idle (nothing in flight, nothing happened): nothing written (the key expires, so peers
  stop counting this instance), the peers read once a second;
- dormant (idle here for DORMANT_AFTER, 10 s): nothing at all, so that a worker routing to
  1,000 pools pays for the pools that serve requests, not for the pools it has (it paid
  some 1.4 commands a second per pool and worker: 2,900 a second for two idle instances).
  Its view of the peers is dropped: nobody here picks in it.  Its first request wakes it
  within IDLE_LOOK, and the round that follows announces it, reads the index and the peers:
  the picks before that round use this instance's own counts only, as when alone.  Peers
  that pruned it (a minute without announce) find it again at their next read of the index.
The loop looks every 25 ms whether a round is due while a pool is busy, four times a second
otherwise, without Redis: its wakeups follow the busiest pool, not the number of pools.
Redis down: every pool's last view is dropped (local counts only), said once, and
publishing resumes when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redlb.balancer.load import MEAN_LATENCY_MEMORY, LoadView
from redlb.store.keys import Keys
from redlb.store.link import RedisLink

log = logging.getLogger("redlb.inflight")

# Busy: a round every INTERVAL_PER_REQUEST x this instance's mean in flight, within
# [MIN_INTERVAL, MAX_INTERVAL].  What a stale view misses is the peers' starts and finishes,
# each a change of one; with k requests in flight per instance one change matters 1/k as
# much, so the view can be k times older (measured: 1 client per instance needs 25 ms,
# 4 balance near exact counts at 0.1 s).
INTERVAL_PER_REQUEST = 0.025
MIN_INTERVAL = 0.025  # also how often a busy loop looks whether a round is due (no Redis)
MAX_INTERVAL = 0.1
IDLE_INTERVAL = 1.0  # nothing in flight here and nothing happened: read the peers this often
IDLE_LOOK = 0.25  # idle: how often the loop looks whether a pool is busy again (no Redis)
DORMANT_AFTER = 10.0  # idle this long: the pool's peers are no longer read (see above)
TTL_MS = 2000
INDEX_EVERY = 1.0  # look for new instances this often
IDLE_INDEX_EVERY = 5.0
ANNOUNCE_EVERY = 10.0  # ZADD of this instance (and the pruning), well within FORGET_AFTER_MS
FORGET_AFTER_MS = 60_000
# Pools in one pipeline at most: building and reading a round holds the event loop, about
# 20 us a pool; 1,000 pools due at once (the start) go in several round trips.
POOLS_PER_ROUND = 250
RETRY_AFTER = 1.0  # Redis failed: the next round after this long


def encode(means: dict[str, float]) -> bytes:
    return ",".join(f"{key}={n:.2f}" for key, n in means.items() if n >= 0.005).encode()


def decode_into(raw: bytes, into: dict[str, float]) -> None:
    """Add a published ``backend=n,...`` to ``into``; malformed parts are skipped."""
    for part in raw.split(b","):
        key, sep, count = part.rpartition(b"=")
        if not sep:
            continue
        try:
            value = float(count)
        except ValueError:
            continue
        if 0 <= value < 1e9:
            name = key.decode("ascii", "replace")
            into[name] = into.get(name, 0.0) + value


class CountedPool:
    """One pool's part in the publisher: its view, and when it last did what."""

    __slots__ = (
        "active_at",
        "announced_at",
        "indexed_at",
        "interval",
        "keys",
        "latency_kept_since",
        "load",
        "others",
        "published",
        "publisher",
        "round_at",
    )

    def __init__(self, publisher: InflightPublisher, keys: Keys, load: LoadView) -> None:
        self.publisher = publisher
        self.keys = keys
        self.load = load
        self.others: list[str] = []  # the other instances' names, from the index
        self.indexed_at = -INDEX_EVERY
        self.announced_at = -ANNOUNCE_EVERY
        self.round_at = -IDLE_INTERVAL
        self.interval = MIN_INTERVAL  # between busy rounds, from the last round's mean
        self.published = False  # the last SET had counts in it (an empty one clears them)
        now = time.monotonic()
        self.latency_kept_since = now
        self.active_at = now  # last seen busy (a new pool counts as just used)

    def leave(self) -> None:
        """The pool stops counting (strategy change, retired, closed): its view is dropped."""
        self.publisher.leave(self)

    def busy(self) -> bool:
        load = self.load
        return bool(load.local_total or load.times)

    def after_failure(self) -> None:
        """Redis failed: drop the view, and look for the instances and announce again (Redis
        may have lost the index)."""
        self.load.set_others({})  # stale counts would steer picks for too long
        self.indexed_at = -INDEX_EVERY
        self.announced_at = -ANNOUNCE_EVERY


class InflightPublisher:
    """Every counting pool of one worker: one loop, one pipeline a round."""

    def __init__(
        self,
        link: RedisLink,
        instance: str,
        timeout: float,
        dormant_after: float = DORMANT_AFTER,
    ) -> None:
        self.link = link
        self.instance = instance
        self.timeout = timeout
        self.dormant_after = dormant_after
        # Insertion-ordered sets: awake pools are looked at every wakeup, dormant ones
        # IDLE_LOOK apart, for a request that woke them.
        self.awake: dict[CountedPool, None] = {}
        self.dormant: dict[CountedPool, None] = {}
        self.dormant_looked_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self.failing = False
        self.wakeups = 0  # loop iterations, for tests and bench/inflight_cost.py

    # Membership

    def join(self, keys: Keys, load: LoadView) -> CountedPool:
        pool = CountedPool(self, keys, load)
        load.windowed = True
        load.take_means()  # the first window starts now
        self.awake[pool] = None
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run())
        return pool

    def leave(self, pool: CountedPool) -> None:
        self.awake.pop(pool, None)
        self.dormant.pop(pool, None)
        pool.load.windowed = False
        pool.load.set_others({})
        if not self.awake and not self.dormant and self.task is not None:
            self.task.cancel()  # and it ends on its own, should the cancel be lost
            self.task = None
            _PUBLISHERS.pop((id(self.link), self.instance), None)

    # The loop

    async def run(self) -> None:
        while self.awake or self.dormant:
            self.wakeups += 1
            now = time.monotonic()
            due, busy = self.look(now)
            for start in range(0, len(due), POOLS_PER_ROUND):
                try:
                    await self.publish(due[start : start + POOLS_PER_ROUND], now)
                    if self.failing:
                        log.info("publishing in-flight counts again")
                        self.failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not self.failing:
                        log.warning("cannot share in-flight counts: %r", exc)
                        self.failing = True
                    for pool in (*self.awake, *self.dormant):
                        pool.after_failure()
                    await asyncio.sleep(RETRY_AFTER)
                    break
            await asyncio.sleep(MIN_INTERVAL if busy else IDLE_LOOK)

    def look(self, now: float) -> tuple[list[CountedPool], bool]:
        """(the pools due for a round, whether any is busy); pools fall dormant or wake."""
        due: list[CountedPool] = []
        any_busy = False
        # Less than IDLE_LOOK: a sleep of IDLE_LOOK can read a few ms shorter here (uvloop
        # times it from its cached time), and the dormant pools waited a whole look more.
        if now - self.dormant_looked_at >= IDLE_LOOK - MIN_INTERVAL and self.dormant:
            self.dormant_looked_at = now
            for pool in list(self.dormant):
                if pool.busy():
                    self.wake(pool, now)
                else:
                    # Nothing in flight, no event: the window can start now (its mean is
                    # then over the time since, not diluted over the whole dormancy).
                    pool.load.window_start = now
        for pool in list(self.awake):
            load = pool.load
            busy = bool(load.local_total or load.times)
            if busy:
                pool.active_at = now
                any_busy = True
            elif now - pool.active_at >= self.dormant_after and not pool.published:
                self.fall_dormant(pool)
                continue
            if now - pool.latency_kept_since >= MEAN_LATENCY_MEMORY:
                pool.latency_kept_since = now
                load.forget_mean_latency()  # this loop is the view's only timer
            if now - pool.round_at >= (pool.interval if busy else IDLE_INTERVAL):
                due.append(pool)
        return due, any_busy

    def fall_dormant(self, pool: CountedPool) -> None:
        del self.awake[pool]
        self.dormant[pool] = None
        load = pool.load
        load.set_others({})  # not read while dormant: no view rather than an old one
        load.take_means()  # an empty window (nothing in flight): restarted while dormant
        load.forget_mean_latency()  # as the loop would have by the time it wakes

    def wake(self, pool: CountedPool, now: float) -> None:
        del self.dormant[pool]
        self.awake[pool] = None
        pool.active_at = pool.latency_kept_since = now
        pool.round_at = -IDLE_INTERVAL  # a round now
        pool.indexed_at = -INDEX_EVERY  # with the index: peers came and went meanwhile

    async def publish(self, pools: list[CountedPool], now: float) -> None:
        """One round trip: each pool's counts, its peers' counts, the index when due."""
        pipe = self.link.client.pipeline(transaction=False)
        instance = self.instance
        plans: list[tuple[CountedPool, dict[str, float], bytes | None, bool, bool, bool]] = []
        for pool in pools:
            keys = pool.keys
            busy = pool.busy()
            pool.round_at = now
            means = pool.load.take_means()
            pool.interval = min(
                MAX_INTERVAL, max(MIN_INTERVAL, INTERVAL_PER_REQUEST * sum(means.values()))
            )
            counts = encode(means)
            peers = bool(pool.others)
            written = counts if peers and (counts or pool.published) else None
            if not peers:
                # Nobody reads it, and it expires within TTL_MS: else a pool whose peers
                # left the index after a SET with counts would never fall dormant.
                pool.published = False
            if written is not None:
                pipe.set(keys.inflight(instance), written, px=TTL_MS)
            if peers:
                pipe.mget([keys.inflight(other) for other in pool.others])
            announce = now - pool.announced_at >= ANNOUNCE_EVERY
            if announce:
                wall_ms = int(time.time() * 1000)
                pipe.zadd(keys.inflight_index, {instance: wall_ms})
                pipe.zremrangebyscore(keys.inflight_index, "-inf", wall_ms - FORGET_AFTER_MS)
            reindex = now - pool.indexed_at >= (INDEX_EVERY if busy else IDLE_INDEX_EVERY)
            if reindex:
                pipe.zrange(keys.inflight_index, 0, -1)
            plans.append((pool, means, written, peers, announce, reindex))
        if not len(pipe):
            return
        timeout = self.timeout + 0.001 * len(pools)
        replies = iter(await asyncio.wait_for(pipe.execute(), timeout))
        for pool, means, written, peers, announce, reindex in plans:
            if written is not None:
                next(replies)
                pool.published = bool(written)
            others: dict[str, float] = {}
            live = 0
            if peers:
                for raw in next(replies):
                    if raw is not None:  # a live instance (its key has not expired)
                        live += 1
                        decode_into(raw, others)
            # The baseline of "peers moved like me" is this instance's mean over the round,
            # as the peers' counts are theirs: an instant's sample made the estimate of a
            # fast backend jump by peers x 1 at random, and the slow one (steady) won ties.
            if pool in self.awake or pool in self.dormant:  # not left during the round trip
                pool.load.set_others(others, live, means)
            if announce:
                next(replies)
                next(replies)
                pool.announced_at = now
            if reindex:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in next(replies)]
                pool.others = [n for n in names if n != instance]
                pool.indexed_at = now
                if len(pool.others) == len(names):
                    # The index lost this instance (FLUSHALL, a failover to an empty
                    # replica): announced again at the next round, not in up to 10 s.
                    pool.announced_at = -ANNOUNCE_EVERY


# One publisher per Redis link and instance (a worker has one of each).
_PUBLISHERS: dict[tuple[int, str], InflightPublisher] = {}


def publisher_for(link: RedisLink, instance: str, timeout: float) -> InflightPublisher:
    """The worker's publisher; made by the first counting pool, ended by the last's leave."""
    key = (id(link), instance)
    publisher = _PUBLISHERS.get(key)
    if publisher is None or publisher.link is not link:
        publisher = _PUBLISHERS[key] = InflightPublisher(link, instance, timeout)
    return publisher
