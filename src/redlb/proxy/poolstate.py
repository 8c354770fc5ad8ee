"""One pool and everything that serves it: members, rotation, health, ejection, connections.

The routing table points each route at one of these; an exchange takes its pool, strategy,
ejector, settings and connection pools from here.  Settings changes are applied in one step
of the event loop (no await inside), so no request sees part of an old and part of a new set.
"""

from __future__ import annotations

import asyncio
import contextlib

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.balancer.leased import LeasedRoundRobin
from redlb.balancer.strict import StrictRoundRobin
from redlb.config import Config
from redlb.health.active import HealthProber
from redlb.health.passive import Ejector
from redlb.pool import Pool
from redlb.proxy.retry import RetryBudget
from redlb.proxy.upstream import BackendConnections
from redlb.store.keys import Keys
from redlb.store.link import RedisLink
from redlb.store.rotation import CounterLease, Cursor, StrictCounter
from redlb.store.sync import PoolSync


class PoolState:
    __slots__ = (
        "budget",
        "config",
        "conns",
        "cursor",
        "ejector",
        "instance_id",
        "keys",
        "lease",
        "link",
        "name",
        "pool",
        "prober",
        "requests",
        "strategy",
        "sync",
    )

    def __init__(
        self, name: str, config: Config, link: RedisLink, cursor: Cursor, instance_id: str
    ) -> None:
        self.name = name
        self.keys = Keys(name)
        self.link = link
        self.cursor = cursor
        self.instance_id = instance_id
        self.pool = Pool(config.eject_max_percent)
        # Per pool, the warnings already given about its entries (PoolSync keeps them).
        self.sync = PoolSync(link, self.keys, self.pool, config)
        # Keyed by Backend.key: a str hashes in C, and pool refreshes make new Backend objects.
        self.conns: dict[str, BackendConnections] = {}
        self.prober: asyncio.Task[None] | None = None
        self.requests = 0
        self.config = config
        self.lease: CounterLease | None = None
        self.strategy: Strategy = self._strategy(config)
        self.ejector = Ejector(self.pool, link, self.keys, config)
        self.budget = RetryBudget(config.retry_budget_percent, config.retry_min_concurrency)

    def _strategy(self, config: Config) -> Strategy:
        if config.rotation == "strict":
            self.lease = None
            counter = StrictCounter(self.link, self.keys.counter, config.redis_timeout)
            return StrictRoundRobin(counter)
        self.lease = CounterLease(self.link, self.keys.counter, config.redis_timeout, self.cursor)
        return LeasedRoundRobin(self.lease)

    def connections_to(self, backend: Backend) -> BackendConnections:
        conns = self.conns.get(backend.key)
        if conns is None:
            config = self.config
            conns = self.conns[backend.key] = BackendConnections(
                backend, config.max_idle_per_backend, config.max_conns_per_backend
            )
        return conns

    def reconfigure(self, config: Config) -> None:
        """Apply a new resolved settings set, all of it at once."""
        old = self.config
        if config == old:
            return
        self.config = config
        if config.rotation != old.rotation:
            self.strategy = self._strategy(config)
        self.ejector = Ejector(self.pool, self.link, self.keys, config)
        self.pool.max_eject_percent = config.eject_max_percent
        self.budget.percent = config.retry_budget_percent
        for conns in self.conns.values():
            conns.max_conns = config.max_conns_per_backend
        if (config.health_path, config.health_interval) != (old.health_path, old.health_interval):
            self.stop_prober()
            self.start_prober()

    def start_prober(self) -> None:
        if self.config.health_path and self.prober is None:
            prober = HealthProber(self.link, self.keys, self.pool, self.config, self.instance_id)
            self.prober = asyncio.get_running_loop().create_task(prober.run())

    def stop_prober(self) -> None:
        if self.prober is not None:
            self.prober.cancel()
            self.prober = None

    def retire(self) -> None:
        """No route points here any more: requests in flight finish, nothing is kept idle."""
        self.stop_prober()
        for conns in self.conns.values():
            conns.max_idle = 0
            conns.close_all()

    def expire(self, now: float) -> None:
        for conns in self.conns.values():
            conns.expire(now)
        if self.pool.ejected:
            self.pool.rebuild()  # ejections end on time even without a resync

    def close(self) -> None:
        self.stop_prober()
        for conns in self.conns.values():
            conns.close_all()
        if self.lease is not None and self.lease.refill_task is not None:
            with contextlib.suppress(Exception):
                self.lease.refill_task.cancel()
