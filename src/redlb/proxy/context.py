"""What every connection of one worker shares: config, pool, strategy, upstreams, counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redlb.accesslog import AccessLog
from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.config import Config
from redlb.health.passive import Ejector
from redlb.pool import Pool
from redlb.proxy.retry import RetryBudget
from redlb.proxy.upstream import BackendConnections

if TYPE_CHECKING:
    from redlb.proxy.downstream import ClientConnection


@dataclass(slots=True)
class Stats:
    """Plain counters, cheap to bump on the hot path; exported by metrics.py at scrape time."""

    requests: int = 0
    proxy_errors: int = 0
    rejected: int = 0
    retries: int = 0
    retries_refused: int = 0
    upstream_connects: int = 0
    upstream_reuses: int = 0
    client_connections: int = 0


@dataclass(slots=True)
class ProxyContext:
    config: Config
    pool: Pool
    strategy: Strategy
    ejector: Ejector
    access_log: AccessLog
    loop: asyncio.AbstractEventLoop
    budget: RetryBudget = field(default_factory=RetryBudget)
    stats: Stats = field(default_factory=Stats)
    # Keyed by Backend.key: a str hashes in C, and pool refreshes make new Backend objects.
    upstreams: dict[str, BackendConnections] = field(default_factory=dict)
    clients: set[ClientConnection] = field(default_factory=set)
    active_exchanges: int = 0
    listening: bool = False
    draining: bool = False

    def connections_to(self, backend: Backend) -> BackendConnections:
        conns = self.upstreams.get(backend.key)
        if conns is None:
            conns = self.upstreams[backend.key] = BackendConnections(
                backend, self.config.max_idle_per_backend, self.config.max_conns_per_backend
            )
        return conns
