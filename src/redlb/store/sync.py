"""Keeping the local pool in step with Redis, whatever Redis does.

Rules:
1. The request path never waits on this: it reads ``Pool.healthy``, which only changes here.
2. Redis down or slow: keep the last-known pool, log the change once, reconnect with jittered
   exponential backoff (capped), then re-subscribe and re-read everything.
3. Push for speed (keyspace notifications + the events channel), a resync every
   ``resync_interval`` as the fallback for lost messages or notifications that are off.
4. "The pool is empty" (epoch present) is not "Redis lost its data" (epoch gone too): the
   first is served as 503, the second keeps the last-known pool and is logged loudly.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.config import Config
from redlb.pool import Pool
from redlb.store.keys import Keys
from redlb.store.link import MasterChanged, RedisLink

log = logging.getLogger("redlb.sync")

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0


class PoolSync:
    def __init__(
        self,
        link: RedisLink,
        keys: Keys,
        pool: Pool,
        config: Config,
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.link = link
        self.keys = keys
        self.pool = pool
        self.config = config
        self.on_connected = on_connected
        self.warned_entries: set[bytes] = set()
        self.problem: str | None = None  # the pool-level condition last logged
        self.notifications_warned = False

    async def run(self) -> None:
        backoff = BACKOFF_START
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except MasterChanged:
                continue  # already logged; reconnect to the new master at once
            except Exception as exc:
                self.link.mark_down(exc)
            else:
                backoff = BACKOFF_START
            await asyncio.sleep(random.uniform(0.5, 1.0) * backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _session(self) -> None:
        client = self.link.client
        timeout = self.config.redis_timeout
        await asyncio.wait_for(client.ping(), timeout)
        await self._enable_notifications(client)
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(self.subscribe(pubsub, db), timeout)
            await self.sync_once()
            if self.on_connected is not None:
                await self.on_connected()
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.config.resync_interval
                )
                while message is not None:  # coalesce a burst of edits into one read
                    self.note(message)
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                await self.sync_once()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, pubsub: PubSub, db: int) -> None:
        """What to listen to (store/routes.py listens to every routed pool on this one)."""
        await pubsub.subscribe(self.keys.keyspace_channel(db), self.keys.events)

    def note(self, message: dict[str, Any]) -> None:
        """A message arrived; the next sync_once runs after the burst (routes.py reads it)."""

    async def _enable_notifications(self, client: Redis) -> None:
        """Turn on list/generic keyspace events if we may; else rely on the resync."""
        try:
            current = await asyncio.wait_for(
                client.config_get("notify-keyspace-events"), self.config.redis_timeout
            )
            raw: Any = current
            flags = _text(
                raw.get(b"notify-keyspace-events") or raw.get("notify-keyspace-events", "")
            )
            # l, g: the pool lists; h: the routes and settings hashes.
            if "K" in flags and ("A" in flags or all(c in flags for c in "lgh")):
                return
            wanted = "".join(sorted(set(flags) | set("Klgh")))
            await asyncio.wait_for(
                client.config_set("notify-keyspace-events", wanted), self.config.redis_timeout
            )
        except ResponseError as exc:
            if not self.notifications_warned:
                log.warning(
                    "cannot enable keyspace notifications (%s); redis-cli edits will be seen by "
                    "the %.1f s resync instead",
                    exc,
                    self.config.resync_interval,
                )
                self.notifications_warned = True

    async def sync_once(self) -> None:
        """Read pool, drain set, health and ejection marks; apply them to the local pool."""
        client = self.link.client
        keys = self.keys
        timeout = self.config.redis_timeout
        pipe = client.pipeline(transaction=False)
        pipe.type(keys.pool)
        pipe.lrange(keys.pool, 0, self.config.max_pool_entries - 1)
        pipe.exists(keys.epoch)
        pipe.smembers(keys.draining)
        kind_raw, entries, epoch, draining_raw = await asyncio.wait_for(
            pipe.execute(raise_on_error=False), timeout
        )
        if isinstance(kind_raw, Exception):
            raise kind_raw
        kind = _text(kind_raw)
        members = self._members(kind, entries, bool(epoch))
        if members is not None and not epoch:
            await asyncio.wait_for(client.set(keys.epoch, "1", nx=True), timeout)
        known = members if members is not None else list(self.pool.members)
        down, ejected = await self._status(client, known)
        draining = self._parse_set(draining_raw)
        await self.link.check_master(timeout)
        self.link.mark_up()
        self.pool.update(members=members, down=down, draining=draining, ejected=ejected)

    def _members(self, kind: str, entries: Any, epoch: bool) -> list[Backend] | None:
        """The members to use, or None to keep the last-known ones."""
        if kind == "none":
            if not epoch and self.pool.members:
                self._problem(
                    "lost",
                    "Redis lost its data (the pool key %r and redlb's epoch are both gone): "
                    "keeping the last-known pool of %d backends until the pool is written again",
                    self.keys.pool,
                    len(self.pool.members),
                    level=logging.ERROR,
                )
                return None
            self._problem("empty", "the pool %r is empty: answering 503", self.keys.pool)
            return []
        if kind != "list":
            self._problem(
                "wrongtype:" + kind,
                "the pool key %r holds a %s, not a list: keeping the last-known pool (%d backends)",
                self.keys.pool,
                kind,
                len(self.pool.members),
                level=logging.ERROR,
            )
            return None
        if isinstance(entries, Exception):
            raise entries
        members: list[Backend] = []
        seen_bad: set[bytes] = set()
        for raw in entries:
            try:
                members.append(parse_backend(raw))
            except InvalidAddress as exc:
                seen_bad.add(raw)
                if raw not in self.warned_entries:
                    shown = raw[:80].decode("utf-8", "backslashreplace")
                    log.warning("skipping pool entry %r: %s", shown, exc)
            # Warn again only if a bad entry goes away and comes back.
        self.warned_entries = seen_bad
        if len(entries) >= self.config.max_pool_entries:
            self._problem(
                "capped",
                "the pool has over %d entries; reading only those",
                self.config.max_pool_entries,
            )
        elif members:
            self._problem(None, "")
        else:
            self._problem(
                "no-valid", "the pool %r has no valid entry: answering 503", self.keys.pool
            )
        return members

    async def _status(
        self, client: Redis, members: list[Backend]
    ) -> tuple[list[Backend], dict[Backend, float]]:
        unique = list(dict.fromkeys(members))
        if not unique:
            return [], {}
        pipe = client.pipeline(transaction=False)
        pipe.mget([self.keys.health(b) for b in unique])
        for backend in unique:
            pipe.pttl(self.keys.ejected(backend))
        health, *ttls = await asyncio.wait_for(pipe.execute(), self.config.redis_timeout)
        down = [b for b, state in zip(unique, health, strict=True) if state == b"down"]
        ejected = {b: ms / 1000.0 for b, ms in zip(unique, ttls, strict=True) if ms > 0}
        return down, ejected

    def _parse_set(self, raw: Any) -> list[Backend]:
        if isinstance(raw, Exception):
            log.error("cannot read %s: %s", self.keys.draining, raw)
            return list(self.pool.draining)
        result = []
        for item in raw:
            try:
                result.append(parse_backend(item))
            except InvalidAddress:
                continue
        return result

    def _problem(
        self, name: str | None, message: str, *args: object, level: int = logging.WARNING
    ) -> None:
        """Log a pool-level condition when it starts, not on every resync."""
        if name == self.problem:
            return
        if name is None:
            if self.problem is not None:
                log.info("the pool %r is usable again", self.keys.pool)
        else:
            log.log(level, message, *args)
        self.problem = name


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
