"""Publishing this instance's in-flight counts, reading the fleet's (least outstanding).

Every ``INTERVAL`` seconds, one pipelined round trip:
- ``SET redlb:{P}:inflight:{instance} "backend=n,..." PX TTL``: this instance's mean count
  per backend over the interval (LoadView.take_means), replaced whole; the TTL makes a
  crashed instance's counts vanish on their own.  A mean, not an instant's sample: a
  backend answering in 20 ms is mostly at 0 at any instant, and the fleet herded onto a
  slow backend whose requests (always visible) then looked no worse than the fast ones';
- ``MGET`` of the other instances' keys, summed into ``LoadView.others``.
The instances are found in ``redlb:{P}:inflight`` (ZSET instance -> last publish, ms),
refreshed once a second and pruned of instances silent for a minute.  Redis cost: at most
2 commands per interval per pool and worker, whatever the request rate (0.002 commands per
request at 40,000 requests/s over one worker); 8 a second when the worker is idle.
Redis down: the last view is dropped (local counts only) and publishing resumes when it is
back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redlb.balancer.load import LoadView
from redlb.store.keys import Keys
from redlb.store.link import RedisLink

log = logging.getLogger("redlb.inflight")

INTERVAL = 0.025
IDLE_INTERVAL = 0.25  # nothing in flight here and nothing happened: refresh less often
TTL_MS = 2000
INDEX_EVERY = 1.0
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
        self.indexed_at = 0.0
        self.failing = False

    async def run(self) -> None:
        self.load.windowed = True
        self.load.take_means()  # the first window starts now
        try:
            await self._loop()
        finally:
            self.load.windowed = False

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish_once()
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
                await asyncio.sleep(1.0)
            load = self.load
            await asyncio.sleep(INTERVAL if load.local_total or load.times else IDLE_INTERVAL)

    async def publish_once(self) -> None:
        keys = self.keys
        pipe = self.link.client.pipeline(transaction=False)
        pipe.set(keys.inflight(self.instance), encode(self.load.take_means()), px=TTL_MS)
        if self.others:
            pipe.mget([keys.inflight(other) for other in self.others])
        now = time.monotonic()
        reindex = now - self.indexed_at >= INDEX_EVERY
        if reindex:
            wall_ms = int(time.time() * 1000)
            pipe.zadd(keys.inflight_index, {self.instance: wall_ms})
            pipe.zremrangebyscore(keys.inflight_index, "-inf", wall_ms - FORGET_AFTER_MS)
            pipe.zrange(keys.inflight_index, 0, -1)
        replies = await asyncio.wait_for(pipe.execute(), self.timeout)
        others: dict[str, float] = {}
        peers = 0
        if self.others:
            for raw in replies[1]:
                if raw is not None:  # a live instance (its key has not expired)
                    peers += 1
                    decode_into(raw, others)
        self.load.set_others(others, peers)
        if reindex:
            self.indexed_at = now
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in replies[-1]]
            self.others = [n for n in names if n != self.instance]
