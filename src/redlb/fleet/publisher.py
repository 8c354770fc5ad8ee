"""Each worker, once a second: its metrics snapshot to disk and its heartbeat to Redis.

Redis cost, at any load: one pipeline a second of two commands (``SET`` the worker's
document with a 5 s TTL, ``ZADD`` it to the index), plus a ``ZREMRANGEBYSCORE`` every 30 s
to prune the index: 2.03 commands a second a worker.  The document's size grows with the
backends this worker served in the last minute (capped at ``MAX_BACKENDS``), never with
the request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redlb.metrics import snapshot
from redlb.metrics.looplag import LoopLag
from redlb.metrics.recorder import COUNT, FIRST_BUCKET, N_BUCKETS, OTHER
from redlb.slices import slices
from redlb.store.keys import FLEET_WORKERS, fleet_worker

if TYPE_CHECKING:
    from redlb.fleet.instance import Instance
    from redlb.proxy.context import ProxyContext
    from redlb.proxy.poolstate import PoolState
    from redlb.store.link import RedisLink

log = logging.getLogger("redlb.fleet")

INTERVAL = 1.0
TTL_MS = 5000
WINDOW = 60  # intervals in "the last minute"
PRUNE_EVERY = 30  # intervals
PRUNE_AFTER = 60.0  # seconds without a heartbeat
MAX_BACKENDS = 500
SERIES_SLICE = 25  # request series summed between two turns (100: 0.24 ms, hot caches)
POOL_SLICE = 50  # pools whose requests in flight are summed between two turns

# Per backend and interval: requests, 4xx, 5xx, bytes in, bytes out, then latency buckets.
REQ, E4, E5, B_IN, B_OUT, LAT = 0, 1, 2, 3, 4, 5
WIDTH = LAT + N_BUCKETS

BackendKey = tuple[str, str]  # pool, backend
_TABLE_PART = ("routes", "route_count", "pools")


class Publisher:
    def __init__(self, ctx: ProxyContext, link: RedisLink, instance: Instance, worker: int):
        self.ctx = ctx
        self.link = link
        self.instance = instance
        self.worker = worker
        self.member = f"{instance.id}/{worker}"
        self.redis_latency = 0.0
        self.lag = LoopLag()  # server.py runs it; every snapshot reports it
        self.written = 0.0  # monotonic time of the last snapshot file
        self.writing: asyncio.Future[None] | None = None  # the snapshot write under way
        self.published = 0  # Redis commands sent, for the cost test and the docs
        self.ticks = 0
        self.previous: dict[BackendKey, list[float]] = {}
        self.window: deque[dict[BackendKey, list[float]]] = deque()
        self.minute: dict[BackendKey, list[float]] = {}
        # The table's part of the document, made again only when the table changes (10,000
        # route labels decoded each second held the loop for milliseconds), and its JSON
        # (a thousand pool names encoded each second held it for 0.2 ms).
        self.described: tuple[object, list[str], int, list[str]] = (None, [], 0, [])
        self.described_json = ""

    def write_snapshot(self, max_age: float = 0.0) -> None:
        """This worker's metrics file, at most ``max_age`` seconds old (0: now)."""
        now = time.monotonic()
        if max_age and now - self.written < max_age:
            return  # back-to-back scrapes: the file is fresh enough
        self.written = now
        document = snapshot.take(self.ctx, self.link, self.worker, self.redis_latency, self.lag)
        snapshot.write(self.instance.metrics_dir, document)

    async def write_snapshot_in_steps(self, max_age: float = 0.0) -> None:
        """write_snapshot() a slice at a time, the event loop free in between."""
        # One writer at a time: writers share the temporary file, so two at once (scrapes
        # at once, or a scrape and the periodic write) renamed each other's away.
        while self.writing is not None:
            await asyncio.shield(self.writing)
        if max_age and time.monotonic() - self.written < max_age:
            return
        self.writing = asyncio.get_running_loop().create_future()
        try:
            steps = snapshot.take_in_steps(
                self.ctx, self.link, self.worker, self.redis_latency, self.lag
            )
            for document in steps:
                if document is None:
                    await asyncio.sleep(0)
                    continue
                taken = time.monotonic()
                await asyncio.sleep(0)  # the document's last part and its writing: two turns
                for _ in snapshot.write_in_steps(self.instance.metrics_dir, document):
                    await asyncio.sleep(0)
                self.written = taken  # once renamed: a scrape that skips its write reads it
        finally:
            self.writing.set_result(None)
            self.writing = None

    async def run(self) -> None:
        # Each part of a round in its own turn of the loop: together they held it for
        # milliseconds (10,000 routes, 1,000 pools), each one well under one.
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                await self.write_snapshot_in_steps()
            except OSError as exc:
                log.warning("cannot write the metrics snapshot: %s", exc)
            await asyncio.sleep(0)
            last = self.tick(await self._by_backend_in_steps())
            await asyncio.sleep(0)
            document = self.document(last, await self._in_flight_in_steps())
            await asyncio.sleep(0)
            await self.publish(document)

    # Counting (pure: the recorder's cumulative counters -> per-interval deltas)

    async def _by_backend_in_steps(self) -> dict[BackendKey, list[float]]:
        """by_backend() of the recorder, ``SERIES_SLICE`` series a turn of the loop (its
        2,000 series summed in one go held the loop for milliseconds)."""
        out: dict[BackendKey, list[float]] = {}
        for chunk in slices(self.ctx.recorder.requests, SERIES_SLICE):
            add_by_backend(chunk, out)
            await asyncio.sleep(0)
        return out

    def tick(
        self, current: dict[BackendKey, list[float]] | None = None
    ) -> dict[BackendKey, list[float]]:
        """The last interval's counts per backend (``current``: by_backend() of the
        recorder, taken now if not given); the minute window moves by one."""
        if current is None:
            current = by_backend(self.ctx.recorder.requests)
        delta: dict[BackendKey, list[float]] = {}
        for key, now in current.items():
            before = self.previous.get(key)
            d = now if before is None else [a - b for a, b in zip(now, before, strict=True)]
            if d[REQ]:
                delta[key] = d
        self.previous = current
        self.window.append(delta)
        minute = self.minute
        for key, d in delta.items():
            acc = minute.get(key)
            if acc is None:
                minute[key] = list(d)
            else:
                for i, v in enumerate(d):
                    acc[i] += v
        if len(self.window) > WINDOW:
            for key, d in self.window.popleft().items():
                acc = minute[key]
                for i, v in enumerate(d):
                    acc[i] -= v
                if not acc[REQ]:
                    del minute[key]
        self.ticks += 1
        return delta

    async def _in_flight_in_steps(self) -> dict[BackendKey, int]:
        """in_flight() ``POOL_SLICE`` pools a turn of the loop."""
        out: dict[BackendKey, int] = {}
        for chunk in slices(self.ctx.pools, POOL_SLICE):
            add_in_flight(chunk, out)
            await asyncio.sleep(0)
        return out

    def document(
        self, last: dict[BackendKey, list[float]], in_flight: dict[BackendKey, int] | None = None
    ) -> dict[str, Any]:
        """The heartbeat (``in_flight``: in_flight() of the pools, taken now if not given)."""
        ctx = self.ctx
        inst = self.instance
        if in_flight is None:
            in_flight = {}
            add_in_flight(ctx.pools.items(), in_flight)
        keys = sorted(set(self.minute) | set(in_flight))[:MAX_BACKENDS]
        zero = [0.0] * WIDTH
        backends = [
            [pool, backend, in_flight.get((pool, backend), 0),
             _ints(last.get((pool, backend), zero)), _ints(self.minute.get((pool, backend), zero))]
            for pool, backend in keys
        ]  # fmt: skip
        routes, route_count, pools = self._describe_table()
        return {
            "instance": inst.id,
            "host": inst.host,
            "pid": inst.pid,
            "version": inst.version,
            "started": inst.started,
            "listen": inst.listen,
            "admin": inst.admin_listen,
            "worker": self.worker,
            "worker_pid": os.getpid(),
            "time": time.time(),
            "interval": INTERVAL,
            "pools": pools,
            "routes": routes,
            "route_count": route_count,
            "active_requests": ctx.active_exchanges,
            "open_connections": len(ctx.clients),
            "redis_latency": self.redis_latency,
            "draining": ctx.draining,
            "backends": backends,
        }

    def _describe_table(self) -> tuple[list[str], int, list[str]]:
        """The first 100 route labels, the route count and the pools, of the current table."""
        table = self.ctx.table
        if self.described[0] is not table:
            routes = table.routes if table.single is None else ()
            labels = [r.label.decode() for r in routes[:100]]
            self.described = (table, labels, len(routes), sorted(self.ctx.pools))
            part = {"routes": labels, "route_count": len(routes), "pools": self.described[3]}
            self.described_json = json.dumps(part, separators=(",", ":"))[1:-1]
        return self.described[1], self.described[2], self.described[3]

    def encode(self, document: dict[str, Any]) -> str:
        """document() as JSON, the table's part encoded once per table."""
        _, routes, _, pools = self.described
        if document.get("routes") is routes and document.get("pools") is pools:
            rest = {k: v for k, v in document.items() if k not in _TABLE_PART}
            return json.dumps(rest, separators=(",", ":"))[:-1] + "," + self.described_json + "}"
        return json.dumps(document, separators=(",", ":"))

    async def publish(self, document: dict[str, Any]) -> None:
        if not self.link.up:
            return  # the pool sync reconnects; a heartbeat would only add timeouts
        text = self.encode(document)
        await asyncio.sleep(0)  # the encoding and the round trip's start: two turns
        if not self.link.up:
            return
        now = time.time()
        pipe = self.link.client.pipeline(transaction=False)
        pipe.set(fleet_worker(self.member), text, px=TTL_MS)
        pipe.zadd(FLEET_WORKERS, {self.member: now})
        commands = 2
        if self.ticks % PRUNE_EVERY == 1:
            pipe.zremrangebyscore(FLEET_WORKERS, "-inf", now - PRUNE_AFTER)
            commands += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(pipe.execute(), self.ctx.config.redis_timeout * 4)
        except Exception as exc:  # a slow or dead Redis: the next tick tries again
            log.debug("fleet heartbeat failed: %r", exc)
            return
        self.redis_latency = time.monotonic() - started
        self.published += commands

    async def withdraw(self) -> None:
        """On a clean stop: hand in the last counts (a replaced worker's last second would
        vanish from /metrics), then leave the registry at once instead of after the TTL."""
        while self.writing is not None:  # its older document renamed over the last counts
            await asyncio.shield(self.writing)
        try:
            self.write_snapshot()
        except OSError as exc:
            log.warning("cannot write the metrics snapshot: %s", exc)
        if not self.link.up:
            return
        pipe = self.link.client.pipeline(transaction=False)
        pipe.delete(fleet_worker(self.member))
        pipe.zrem(FLEET_WORKERS, self.member)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pipe.execute(), self.ctx.config.redis_timeout * 4)


def add_in_flight(pools: Iterable[tuple[str, PoolState]], out: dict[BackendKey, int]) -> None:
    """Add the requests in flight (and waiting for a connection) per (pool, backend)."""
    for name, state in pools:
        for conns in state.conns.values():
            busy = conns.busy + len(conns.waiters)
            if busy:
                # Several per backend when routes reach an https:// one with other Hosts.
                key = (name, conns.backend.key)
                out[key] = out.get(key, 0) + busy


def by_backend(requests: dict[Any, list[float]]) -> dict[BackendKey, list[float]]:
    """The recorder's request series summed per (pool, backend)."""
    out: dict[BackendKey, list[float]] = {}
    add_by_backend(requests.items(), out)
    return out


def add_by_backend(
    requests: Iterable[tuple[Any, list[float]]], out: dict[BackendKey, list[float]]
) -> None:
    """Add request series (label set, series) to ``out``'s sums per (pool, backend)."""
    for (_, pool, backend, _, klass), series in requests:
        if not backend or backend == OTHER:
            continue
        acc = out.get((pool, backend))
        if acc is None:
            acc = out[(pool, backend)] = [0.0] * WIDTH
        count = series[COUNT]
        acc[REQ] += count
        if klass == 4:
            acc[E4] += count
        elif klass == 5:
            acc[E5] += count
        acc[B_IN] += series[1]
        acc[B_OUT] += series[2]
        for i in range(N_BUCKETS):
            acc[LAT + i] += series[FIRST_BUCKET + i]


def _ints(values: list[float]) -> list[int]:
    return [int(v) for v in values]
