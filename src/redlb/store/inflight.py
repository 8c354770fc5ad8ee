"""Publishing this instance's in-flight counts, reading the fleet's (least outstanding).

A round is one pipelined round trip:
- ``SET redlb:{P}:inflight:{instance} "backend=n,..." PX TTL``: this instance's mean count
  per backend over the round (LoadView.take_means), replaced whole; the TTL makes a
  crashed instance's counts vanish on their own.  A mean, not an instant's sample: a
  backend answering in 20 ms is mostly at 0 at any instant, and the fleet herded onto a
  slow backend whose requests (always visible) then looked no worse than the fast ones';
- ``MGET`` of the other instances' keys, summed into ``LoadView.others``.
The instances are found in ``redlb:{P}:inflight`` (ZSET instance -> last announce, ms):
read once a second (every 5 s when idle), this instance announced every 10 s, instances
silent for a minute pruned.

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
  stop counting this instance), the peers read once a second; the loop looks four times a
  second whether it is busy again, without Redis.
Redis down: the last view is dropped (local counts only) and publishing resumes when it is
back.
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
IDLE_LOOK = 0.25  # idle: how often the loop looks whether it is busy again (no Redis)
TTL_MS = 2000
INDEX_EVERY = 1.0  # look for new instances this often
IDLE_INDEX_EVERY = 5.0
ANNOUNCE_EVERY = 10.0  # ZADD of this instance (and the pruning), well within FORGET_AFTER_MS
FORGET_AFTER_MS = 60_000


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


class InflightPublisher:
    def __init__(
        self, link: RedisLink, keys: Keys, load: LoadView, instance: str, timeout: float
    ) -> None:
        self.link = link
        self.keys = keys
        self.load = load
        self.instance = instance
        self.timeout = timeout
        self.others: list[str] = []  # the other instances' keys, from the index
        self.indexed_at = -INDEX_EVERY
        self.announced_at = -ANNOUNCE_EVERY
        self.round_at = -IDLE_INTERVAL
        self.interval = MIN_INTERVAL  # between busy rounds, from the last round's mean
        self.published = False  # the last SET had counts in it (an empty one clears them)
        self.failing = False
        self.latency_kept_since = time.monotonic()

    async def run(self) -> None:
        self.load.windowed = True
        self.load.take_means()  # the first window starts now
        try:
            await self._loop()
        finally:
            self.load.windowed = False

    async def _loop(self) -> None:
        while True:
            load = self.load
            busy = bool(load.local_total or load.times)
            if time.monotonic() - self.latency_kept_since >= MEAN_LATENCY_MEMORY:
                self.latency_kept_since = time.monotonic()
                load.forget_mean_latency()  # this loop is the view's only timer
            if time.monotonic() - self.round_at >= (self.interval if busy else IDLE_INTERVAL):
                try:
                    await self.publish_once(busy)
                    if self.failing:
                        log.info("publishing in-flight counts for %r again", self.keys.pool)
                        self.failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not self.failing:
                        log.warning("cannot share in-flight counts for %r: %r", self.keys.pool, exc)
                        self.failing = True
                    self.load.set_others({})  # stale counts would steer picks for too long
                    self.indexed_at = -INDEX_EVERY  # Redis may have lost the index: look again
                    self.announced_at = -ANNOUNCE_EVERY
                    await asyncio.sleep(1.0)
            await asyncio.sleep(MIN_INTERVAL if busy else IDLE_LOOK)

    async def publish_once(self, busy: bool = True) -> None:
        keys = self.keys
        now = time.monotonic()
        self.round_at = now
        means = self.load.take_means()
        self.interval = min(
            MAX_INTERVAL, max(MIN_INTERVAL, INTERVAL_PER_REQUEST * sum(means.values()))
        )
        counts = encode(means)
        pipe = self.link.client.pipeline(transaction=False)
        publish = bool(self.others) and (bool(counts) or self.published)
        if publish:
            pipe.set(keys.inflight(self.instance), counts, px=TTL_MS)
        if self.others:
            pipe.mget([keys.inflight(other) for other in self.others])
        announce = now - self.announced_at >= ANNOUNCE_EVERY
        if announce:
            wall_ms = int(time.time() * 1000)
            pipe.zadd(keys.inflight_index, {self.instance: wall_ms})
            pipe.zremrangebyscore(keys.inflight_index, "-inf", wall_ms - FORGET_AFTER_MS)
        reindex = now - self.indexed_at >= (INDEX_EVERY if busy else IDLE_INDEX_EVERY)
        if reindex:
            pipe.zrange(keys.inflight_index, 0, -1)
        replies = await asyncio.wait_for(pipe.execute(), self.timeout) if len(pipe) else []
        if publish:
            self.published = bool(counts)
        if announce:
            self.announced_at = now
        others: dict[str, float] = {}
        peers = 0
        if self.others:
            for raw in replies[1 if publish else 0]:
                if raw is not None:  # a live instance (its key has not expired)
                    peers += 1
                    decode_into(raw, others)
        # The baseline of "peers moved like me" is this instance's mean over the round, as
        # the peers' counts are theirs: an instant's sample made the estimate of a fast
        # backend jump by peers x 1 at random, and the slow one (steady) won the ties.
        self.load.set_others(others, peers, means)
        if reindex:
            self.indexed_at = now
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in replies[-1]]
            self.others = [n for n in names if n != self.instance]
