"""One pool and everything that serves it: members, rotation, health, ejection, connections.

The routing table points each route at one of these; an exchange takes its pool, strategy,
ejector, settings and connection pools from here.  Settings changes are applied in one step
of the event loop (no await inside), so no request sees part of an old and part of a new set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from redlb.address import Backend
from redlb.backend_tls import client_context, server_name
from redlb.balancer.base import Strategy
from redlb.balancer.ewma import PeakEwma
from redlb.balancer.first import FirstAvailable
from redlb.balancer.leased import LeasedRoundRobin
from redlb.balancer.least import LeastOutstanding
from redlb.balancer.leastconn import LeastConnections
from redlb.balancer.load import LoadView
from redlb.balancer.random_choice import RandomChoice
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.requestkey import KeySpec, cookie, parse_key_spec, request_key
from redlb.balancer.sticky import StickyCookie
from redlb.balancer.strict import StrictRoundRobin
from redlb.config import Config
from redlb.health.active import HealthProber
from redlb.health.passive import Ejector
from redlb.pool import Pool
from redlb.proxy.retry import RetryBudget
from redlb.proxy.upstream import BackendConnections
from redlb.store.inflight import CountedPool, publisher_for
from redlb.store.keys import Keys
from redlb.store.link import RedisLink
from redlb.store.rotation import CounterLease, Cursor, StrictCounter
from redlb.store.sticky import load_secret
from redlb.store.sync import PoolSync

# Settings that make a new strategy object when they change.
_STRATEGY_FIELDS = ("strategy", "rotation", "hash_key", "hash_balance", "max_conns_per_backend")


class PoolState:
    __slots__ = (
        "budget",
        "config",
        "conns",
        "cookie_name",
        "cursor",
        "ejector",
        "instance_id",
        "key_spec",
        "keys",
        "lease",
        "link",
        "load",
        "name",
        "pool",
        "prober",
        "publisher",
        "reads_request",
        "requests",
        "sticky",
        "sticky_secret",
        "sticky_task",
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
        # Keyed by Backend.key: a str hashes in C, and pool refreshes make new Backend objects
        # (an https:// one reached with a route's Host override: the key and that Host).
        self.conns: dict[str, BackendConnections] = {}
        self.prober: asyncio.Task[None] | None = None
        self.requests = 0
        self.config = config
        self.lease: CounterLease | None = None
        # In flight per backend: kept here, so that a strategy change keeps the counts.
        self.load = LoadView()
        self.key_spec: KeySpec | None = None
        self.strategy: Strategy = self._strategy(config)
        self.pool.slow_start = config.slow_start
        self.publisher: CountedPool | None = None  # its part in the worker's publisher
        # Sticky sessions: None until the fleet's secret is read from Redis.
        self.sticky: StickyCookie | None = None
        self.sticky_secret: bytes | None = None  # the last one read: kept if Redis loses it
        self.sticky_task: asyncio.Task[None] | None = None
        # Not self.key_spec here: mypyc 2.4 keeps the None assigned above as its type, past
        # the call that set it.  A hashing strategy has a key spec.
        self.reads_request = config.strategy == "hash" or config.sticky is not None
        self.cookie_name = config.sticky.encode() if config.sticky is not None else None
        self.ejector = Ejector(self.pool, link, self.keys, config)
        self.budget = RetryBudget(config.retry_budget_percent, config.retry_min_concurrency)

    def _strategy(self, config: Config) -> Strategy:
        name = config.strategy
        # One assignment (mypyc 2.4 mistypes a None then a KeySpec assigned in one method).
        self.key_spec = parse_key_spec(config.hash_key) if name == "hash" else None
        if name != "round_robin":
            self.lease = None
        if name == "least_outstanding":
            return LeastOutstanding(self.load)
        if name == "least_conn":
            return LeastConnections(self.load)
        if name == "peak_ewma":
            return PeakEwma(self.load)
        if name == "hash":
            return RendezvousHash(self.load, config.hash_balance)
        if name == "random":
            return RandomChoice()
        if name == "first":
            return FirstAvailable(self.load, config.max_conns_per_backend)
        if config.rotation == "strict":
            self.lease = None
            counter = StrictCounter(self.link, self.keys.counter, config.redis_timeout)
            return StrictRoundRobin(counter)
        self.lease = CounterLease(self.link, self.keys.counter, config.redis_timeout, self.cursor)
        return LeasedRoundRobin(self.lease)

    def request_keys(
        self, peer: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        """(hash key, sticky cookie value) of a request to this pool."""
        spec = self.key_spec
        key = request_key(spec, peer, target, headers) if spec is not None else b""
        name = self.cookie_name
        return key, cookie(headers, name) if name is not None else b""

    def connections_to(
        self, backend: Backend, host_override: bytes | None = None
    ) -> BackendConnections:
        """The backend's connections; for https://, those for the route's Host override."""
        key = backend.key
        if host_override is not None and backend.tls:
            key = f"{key} {host_override.decode('ascii')}"  # the pool apart for its SNI
        conns = self.conns.get(key)
        if conns is None:
            config = self.config
            conns = self.conns[key] = BackendConnections(
                backend, config.max_idle_per_backend, config.max_conns_per_backend
            )
            if backend.tls:
                conns.tls = client_context(config.upstream_ca, config.upstream_insecure)
                conns.server_name = server_name(backend, host_override)
        return conns

    def reconfigure(self, config: Config) -> None:
        """Apply a new resolved settings set, all of it at once."""
        old = self.config
        if config == old:
            return
        self.config = config
        if any(getattr(config, f) != getattr(old, f) for f in _STRATEGY_FIELDS):
            self.stop_publisher()
            self.strategy = self._strategy(config)
        self.pool.slow_start = config.slow_start
        if config.sticky != old.sticky:
            self.stop_sticky()
        self.reads_request = config.strategy == "hash" or config.sticky is not None
        self.cookie_name = config.sticky.encode() if config.sticky is not None else None
        self.ejector = Ejector(self.pool, self.link, self.keys, config)
        self.pool.max_eject_percent = config.eject_max_percent
        self.budget.percent = config.retry_budget_percent
        for conns in self.conns.values():
            conns.max_conns = config.max_conns_per_backend
        if (config.health_path, config.health_interval) != (old.health_path, old.health_interval):
            self.stop_prober()
            self.start_prober()
        self.start_shared()

    def start_prober(self) -> None:
        if self.config.health_path and self.prober is None:
            prober = HealthProber(self.link, self.keys, self.pool, self.config, self.instance_id)
            self.prober = asyncio.get_running_loop().create_task(prober.run())
        self.start_shared()

    def start_shared(self) -> None:
        """The strategy's fleet-wide parts: in-flight publishing, the sticky secret."""
        loop = asyncio.get_running_loop()
        if self.strategy.fleet and self.publisher is None:
            publisher = publisher_for(self.link, self.instance_id, self.config.redis_timeout)
            self.publisher = publisher.join(self.keys, self.load)
        name = self.config.sticky
        if name is not None and self.sticky_task is None:
            self.sticky_task = loop.create_task(self._keep_sticky(name))

    async def _keep_sticky(self, name: str) -> None:
        async for secret in load_secret(self.link, self.config.redis_timeout, self.sticky_secret):
            self.sticky_secret = secret
            if self.sticky is None or self.sticky.secret != secret:
                self.sticky = StickyCookie(name, secret, self.name)

    def stop_publisher(self) -> None:
        if self.publisher is not None:
            self.publisher.leave()  # and the view is dropped
            self.publisher = None

    def stop_sticky(self) -> None:
        self.sticky = None
        if self.sticky_task is not None:
            self.sticky_task.cancel()
            self.sticky_task = None

    def stop_prober(self) -> None:
        if self.prober is not None:
            self.prober.cancel()
            self.prober = None

    def retire(self) -> None:
        """No route points here any more: requests in flight finish, nothing is kept idle."""
        self.stop_prober()
        self.stop_publisher()
        self.stop_sticky()
        for conns in self.conns.values():
            conns.max_idle = 0
            conns.close_all()

    def expire(self, now: float) -> None:
        for conns in self.conns.values():
            conns.expire(now)
        if len(self.conns) > len(self.pool.members):  # cheap test first: most ticks, no churn
            self._forget_removed()
        if self.pool.ejected or self.pool.ramping:
            self.pool.rebuild()  # ejections end and slow starts ramp on time, between resyncs

    def _forget_removed(self) -> None:
        """Backends no longer in the pool: their idle connections are closed now (not at
        expiry), and their pools dropped once nothing uses them, or churn (autoscaling,
        deploys) would leave one behind for every backend the pool ever had."""
        members = {backend.key for backend in self.pool.members}
        for key, conns in list(self.conns.items()):
            if conns.backend.key in members:
                continue
            conns.close_all()
            if not conns.busy and not conns.waiters:  # tunnels and exchanges hold a slot
                del self.conns[key]

    def close(self) -> None:
        self.stop_prober()
        self.stop_publisher()
        self.stop_sticky()
        for conns in self.conns.values():
            conns.close_all()
        if self.lease is not None and self.lease.refill_task is not None:
            with contextlib.suppress(Exception):
                self.lease.refill_task.cancel()
