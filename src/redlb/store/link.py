"""One worker's Redis client and what it knows of Redis's health (state changes logged once)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

log = logging.getLogger("redlb.redis")


class RedisLink:
    def __init__(self, client: Redis, where: str) -> None:
        self.client = client
        self.where = where
        self.up = False
        self._ever_up = False

    def mark_up(self) -> None:
        if not self.up:
            self.up = True
            if self._ever_up:
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
