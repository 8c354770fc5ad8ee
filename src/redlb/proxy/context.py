"""What every connection of one worker shares: config, routing table, pools, counters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redlb.accesslog import AccessLog
from redlb.config import Config
from redlb.metrics.recorder import Recorder
from redlb.proxy.poolstate import PoolState
from redlb.routing import RoutingTable

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
    upstream_tls_failures: int = 0  # handshakes with https:// backends that failed
    client_connections: int = 0
    tls_handshake_failures: int = 0
    tunnels: int = 0  # WebSocket tunnels opened
    tunnel_bytes_to_client: int = 0  # added by each tunnel as the sweeper visits it
    tunnel_bytes_from_client: int = 0


@dataclass(slots=True)
class ProxyContext:
    config: Config
    # Which pool for a request: replaced whole by store/routes.py, never edited in place.
    table: RoutingTable[PoolState]
    pools: dict[str, PoolState]  # the pools the table routes to, by name
    access_log: AccessLog
    loop: asyncio.AbstractEventLoop
    stats: Stats = field(default_factory=Stats)
    recorder: Recorder = field(default_factory=Recorder)  # per-request metrics
    clients: set[ClientConnection] = field(default_factory=set)
    active_exchanges: int = 0
    open_tunnels: int = 0  # their clients are in `clients` too, until the tunnel ends
    known: bool = False  # routes and pools read from Redis at least once
    listening: bool = False
    draining: bool = False
