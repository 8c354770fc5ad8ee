"""One worker's Redis client and what it knows of Redis's health (state changes logged once)."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)

log = logging.getLogger("redlb.redis")


class RedisLink:
    def __init__(self, client: Redis, where: str) -> None:
        self.client = client
        self.where = where
        self.up = False
        self._ever_up = False
        self._problem = ""  # the kind of failure last logged: said once, not per retry
        self.reconnects = 0  # times Redis came back after an outage, for metrics

    @property
    def answered_once(self) -> bool:
        """True once the first attempt to reach Redis has either succeeded or failed."""
        return self._ever_up

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
            self._problem = ""

    def mark_down(self, reason: BaseException) -> None:
        """Log a failure when Redis was up or the kind of failure changed; never per retry."""
        kind, text = describe_failure(reason)
        if self.up or kind != self._problem:
            log.error(
                "Redis at %s %s; serving the last-known pool and retrying about once a second",
                self.where,
                text,
            )
            self._ever_up = True
            self._problem = kind
        self.up = False

    async def close(self) -> None:
        await self.client.aclose()


class MasterChanged(Exception):
    """The Sentinel master moved: reconnect and re-read everything."""


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """The kind of a Redis failure and a sentence for the log.

    redis-py's own text for refused credentials is misleading (``HELLO must be called...``),
    so those are named plainly; no message here can contain the password.
    """
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return "auth", (
            "refused redlb's password (AUTH failed: the password in --redis is wrong or was "
            "changed on the server)"
        )
    if isinstance(exc, AuthorizationError | NoPermissionError):
        return "acl", f"refused a command: the ACL user lacks a permission redlb needs ({exc})"
    detail = exc.__class__.__name__ + (f": {exc}" if str(exc) else "")
    return "unreachable", f"is unreachable ({detail})"
