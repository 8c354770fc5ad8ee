"""Passive ejection: consecutive failures take a backend out for a while, fleet-wide.

The mark is keyed by backend identity (never list position) and always carries a TTL, so a
dead instance cannot leave a backend ejected forever (Hipache #110).  The ejection time
doubles with each recent ejection, up to a cap.  The local pool is updated at once; the
shared mark follows in the background and reaches every instance through the events channel.
"""

from __future__ import annotations

import asyncio
import logging

from redlb.address import Backend
from redlb.config import Config
from redlb.pool import Pool
from redlb.store.keys import Keys
from redlb.store.link import RedisLink, describe_failure

log = logging.getLogger("redlb.eject")

# KEYS: ejected mark, ejection count, events channel.
# ARGV: base ms, max ms, memory of past ejections ms.  Returns the ejection time in ms.
_EJECT = """
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local ms = math.min(tonumber(ARGV[1]) * 2 ^ (n - 1), tonumber(ARGV[2]))
redis.call('SET', KEYS[1], n, 'PX', math.floor(ms))
redis.call('PUBLISH', KEYS[3], 'eject')
return math.floor(ms)
"""


class Ejector:
    def __init__(self, pool: Pool, link: RedisLink, keys: Keys, config: Config) -> None:
        self.pool = pool
        self.link = link
        self.keys = keys
        self.threshold = config.eject_consecutive
        self.count_5xx = config.eject_on_5xx
        self.base = config.eject_base_time
        self.max_time = config.eject_max_time
        self.timeout = config.redis_timeout
        self.failures: dict[Backend, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def answered(self, backend: Backend, status: int) -> None:
        """A response came back: a 5xx counts as a failure (unless configured not to)."""
        if status >= 500 and self.count_5xx:
            self.failure(backend)
            return
        failures = self.failures
        if failures:
            failures.pop(backend, None)

    def failure(self, backend: Backend) -> None:
        if self.threshold <= 0:
            return
        count = self.failures.get(backend, 0) + 1
        if count < self.threshold:
            self.failures[backend] = count
            return
        self.failures.pop(backend, None)
        self._eject(backend, f"after {count} consecutive failures")

    def failed_for_good(self, backend: Backend) -> None:
        """A fault no retry heals (a refused TLS certificate): eject now, not after N.

        Once: while the ejection lasts (even where the ejection cap keeps the backend in
        rotation) it is not ejected again, logged again or shared again."""
        if self.threshold <= 0 or self.pool.ejected.get(backend, 0.0) > self.pool.clock():
            return
        self.failures.pop(backend, None)
        self._eject(backend, "at once: its TLS certificate was refused")

    def _eject(self, backend: Backend, why: str) -> None:
        log.warning("ejecting %s %s", backend, why)
        self.pool.eject(backend, self.base)
        self.pool.ejections += 1
        if self.link.up:
            task = asyncio.get_running_loop().create_task(self._share(backend))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _share(self, backend: Backend) -> None:
        keys = self.keys
        try:
            ms = await asyncio.wait_for(
                self.link.client.eval(
                    _EJECT,
                    3,
                    keys.ejected(backend),
                    keys.ejections(backend),
                    keys.events,
                    int(self.base * 1000),
                    int(self.max_time * 1000),
                    int(self.max_time * 4000),
                ),
                self.timeout,
            )
        except Exception as exc:
            log.warning(
                "could not share the ejection of %s: Redis %s", backend, describe_failure(exc)[1]
            )
            return
        self.pool.eject(backend, int(ms) / 1000.0)
