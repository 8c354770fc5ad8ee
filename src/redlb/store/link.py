"""One worker's Redis client and what it knows of Redis's health (state changes logged once)."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

log = logging.getLogger("redlb.redis")


class RedisLink:
    def __init__(self, client: Redis, where: str) -> None:
        self.client = client
        self.where = where
        self.up = False
        self._ever_up = False
        self.reconnects = 0  # times Redis came back after an outage, for metrics

    async def check_master(self, timeout: float) -> None:
        """Under Sentinel, follow a failover even when the old master still answers.

        redis-py re-resolves the master only on a connection error or READONLY; an old
        master that stays up as a master (or not yet demoted) would keep our writes.
        Asking a sentinel each resync bounds how long we keep talking to the wrong one.
        """
        sentinel_info = getattr(self.client, "redlb_sentinel", None)
        if sentinel_info is None:
            return
        sentinel, name = sentinel_info
        current = await asyncio.wait_for(sentinel.discover_master(name), timeout)
        pool = self.client.connection_pool
        known = getattr(pool, "redlb_master", None)
        pool.redlb_master = current  # type: ignore[attr-defined]
        if known is not None and tuple(current) != tuple(known):
            log.warning("Sentinel failover: the master of %r is now %s:%s", name, *current)
            await pool.disconnect()
            raise MasterChanged(f"master moved to {current[0]}:{current[1]}")

    def mark_up(self) -> None:
        if not self.up:
            self.up = True
            if self._ever_up:
                self.reconnects += 1
                log.warning("Redis at %s is reachable again", self.where)
            else:
                log.info("connected to Redis at %s", self.where)
            self._ever_up = True

    def mark_down(self, reason: BaseException) -> None:
        if self.up or not self._ever_up:
            log.error(
                "Redis at %s is unreachable (%s); serving the last-known pool and retrying",
                self.where,
                reason.__class__.__name__ + (f": {reason}" if str(reason) else ""),
            )
            self._ever_up = True  # log the first failure once, not on every retry
        self.up = False

    async def close(self) -> None:
        await self.client.aclose()


class MasterChanged(Exception):
    """The Sentinel master moved: reconnect and re-read everything."""
