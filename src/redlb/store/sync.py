"""Keeping the local pool in step with Redis, whatever Redis does.

Rules:
1. The request path never waits on this: it reads ``Pool.healthy``, which only changes here.
2. Redis down or slow: keep the last-known pool, log the change once, retry about once a
   second (jittered, so a fleet spreads out; one quick retry after a blip), then re-subscribe
   and re-read everything.  A cap of seconds would leave edits unseen that long after Redis
   is back; an attempt is one connection, cheap at this rate.
3. Push for speed (keyspace notifications + the events channel), a resync every
   ``resync_interval`` as the fallback for lost messages or notifications that are off.
4. "The pool is empty" (epoch present) is not "Redis lost its data" (epoch gone too): the
   first is served as 503, the second keeps the last-known pool and is logged loudly.  Only
   an instance that read a real list writes the epoch: one that knows no pool (new, or a
   restarted worker) must not turn lost data into "empty" for every other instance.
5. Every change of the pool (members, drain, ejection, health) is logged once per instance,
   from the difference between what was last logged and what the pool is now.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError, ResponseError

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.config import Config
from redlb.pool import Pool, PoolView, describe_changes
from redlb.store.keys import Keys
from redlb.store.link import MasterChanged, RedisLink

log = logging.getLogger("redlb.sync")

RETRY_AFTER_BLIP = 0.1  # the first retry after a session that worked a while ended
BLIP_AFTER = 5.0  # seconds a session must have lasted to earn the quick retry
RETRY_INTERVAL = 1.0  # then one attempt a second at most, jittered up to +50%
MAX_CHANGE_LINES = 20  # per difference; a pool of thousands is summed up, not listed


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
        self.push_warned: set[str] = set()  # each way of being told of edits lost, said once
        self.draining_unreadable = False
        self.logged_view = PoolView()  # the pool as the log last described it
        self.listening = False  # subscribed to the pool's messages (else only the resync)
        self.reading = False  # Redis answered and the session's first read is under way

    async def run(self) -> None:
        while True:
            was_up = False
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except MasterChanged:
                continue  # already logged; reconnect to the new master at once
            except Exception as exc:
                was_up = self.link.up
                self.link.mark_down(exc)
            self.log_changes()  # ejections that end while Redis is away are said too
            blip = was_up and time.monotonic() - started >= BLIP_AFTER
            delay = RETRY_AFTER_BLIP if blip else RETRY_INTERVAL
            await asyncio.sleep(delay * random.uniform(1.0, 1.5))

    async def _session(self) -> None:
        client = self.link.client
        timeout = self.config.redis_timeout
        await asyncio.wait_for(client.ping(), timeout)
        self.reading = True
        await self._enable_notifications(client)
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(self.subscribe(pubsub, db), timeout)
            await self.sync_once()
            self.reading = False
            if self.on_connected is not None:
                await self.on_connected()
            self.listening = True
            while True:
                if self.listening:
                    try:
                        await self._wait_for_news(pubsub)
                    except NoPermissionError as exc:  # an ACL user without channel access
                        self.listening = False
                        self._warn_no_push("subscribe", f"cannot subscribe ({exc})")
                else:
                    await asyncio.sleep(self.config.resync_interval)
                await self.sync_once()
        finally:
            self.listening = self.reading = False  # a new session reads everything first
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, pubsub: PubSub, db: int) -> None:
        """What to listen to (store/routes.py listens to every routed pool on this one)."""
        await pubsub.subscribe(self.keys.keyspace_channel(db), self.keys.events)

    def note(self, message: dict[str, Any]) -> None:
        """A message arrived; the next sync_once runs after the burst (routes.py reads it)."""

    async def _wait_for_news(self, pubsub: Any) -> None:
        """Until a message or the resync interval; a burst of edits makes one read."""
        # An await on buffered messages never gives the loop back: thousands of subscription
        # confirmations (one per routed pool's channel) or a burst of events would be read
        # in one go, so the loop gets its turn between messages.
        await asyncio.sleep(0)
        message = await pubsub.get_message(
            ignore_subscribe_messages=True, timeout=self.config.resync_interval
        )
        while message is not None:
            self.note(message)
            await asyncio.sleep(0)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)

    def _warn_no_push(self, what: str, reason: str) -> None:
        if what not in self.push_warned:
            log.warning(
                "%s; edits will be seen by the %.1f s resync instead",
                reason,
                self.config.resync_interval,
            )
            self.push_warned.add(what)

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
            # A setting of the user's Redis changed: say so, with what it was.
            log.warning(
                "changed the Redis setting notify-keyspace-events from %r to %r so that "
                "redis-cli edits of %r reach redlb at once",
                flags,
                wanted,
                self.keys.pool,
            )
        except ResponseError as exc:
            self._warn_no_push("config", f"cannot enable keyspace notifications ({exc})")

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
        if kind == "list" and not epoch:
            await asyncio.wait_for(client.set(keys.epoch, "1", nx=True), timeout)
        known = members if members is not None else list(self.pool.members)
        down, ejected = await self._status(client, known)
        draining = self._parse_set(draining_raw)
        await self.link.check_master(timeout)
        self.link.mark_up()
        self.pool.update(members=members, down=down, draining=draining, ejected=ejected)
        self.log_changes()

    def log_changes(self) -> None:
        """One line per change of the pool since the last call."""
        view = self.pool.view()
        if view == self.logged_view:
            return
        lines = describe_changes(self.logged_view, view)
        self.logged_view = view
        for line in lines[:MAX_CHANGE_LINES]:
            log.info("pool %r: %s", self.keys.pool, line)
        if len(lines) > MAX_CHANGE_LINES:
            log.info("pool %r: and %d more changes", self.keys.pool, len(lines) - MAX_CHANGE_LINES)

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
            if not epoch:
                self._problem(
                    "absent",
                    "the pool %r does not exist and this instance knows no earlier pool "
                    "(a new Redis, or one that lost its data): answering 503",
                    self.keys.pool,
                )
                return []
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
            if not self.draining_unreadable:  # said once, not on every resync
                log.error(
                    "cannot read %s (%s): keeping the last-known drained backends",
                    self.keys.draining,
                    raw,
                )
                self.draining_unreadable = True
            return list(self.pool.draining)
        if self.draining_unreadable:
            log.info("%s is readable again", self.keys.draining)
            self.draining_unreadable = False
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
