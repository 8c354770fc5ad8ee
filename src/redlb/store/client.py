"""Building the Redis client from a URL, with a timeout on every call.

redis-py waits forever by default (no socket timeout) and retries on its own; redlb sets both
explicitly so that a slow or dead Redis costs at most one timeout, and only off the request path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

SENTINEL_SCHEME = "redis+sentinel"


def make_client(url: str, timeout: float) -> Redis:
    """``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://h:p,h:p/master[/db]``."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": max(timeout, 0.5),
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if url.startswith(SENTINEL_SCHEME + "://"):
        hosts, master, db, password = parse_sentinel_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": max(timeout, 0.5),
            },
            **common,
        )
        client: Redis = sentinel.master_for(master, db=db, password=password, **common)
        client.redlb_sentinel = (sentinel, master)  # type: ignore[attr-defined]
        return client
    return Redis.from_url(url, **common)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """``redis+sentinel://[:pw@]h:p,h:p/master[/db]`` -> (sentinels, master, db, password)."""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a sentinel URL needs the master name: redis+sentinel://h:p/name")
    db = int(path[1]) if len(path) > 1 else 0
    return hosts, path[0], db, unquote(parts.password) if parts.password else None


def make_sync_client(url: str, timeout: float) -> redis.Redis:
    """The blocking twin of make_client, for the command line (same URL forms)."""
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith(SENTINEL_SCHEME + "://"):
        hosts, master, db, password = parse_sentinel_url(url)
        sentinel = redis.sentinel.Sentinel(hosts, sentinel_kwargs=dict(common), **common)  # type: ignore[no-untyped-call]
        client: redis.Redis = sentinel.master_for(master, db=db, password=password, **common)  # type: ignore[no-untyped-call]
        return client
    return redis.Redis.from_url(url, **common)


def auth_problem(exc: BaseException) -> str | None:
    """One clear sentence when Redis refused us for a password reason, else None."""
    text = str(exc)
    if isinstance(exc, redis.ResponseError | redis.AuthenticationError) and any(
        marker in text for marker in ("NOAUTH", "Authentication required", "HELLO must be called")
    ):
        return (
            "Redis requires a password: put it in the URL (redis://:PASSWORD@host:port) "
            "or in REDLB_REDIS"
        )
    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError):
        return "Redis refused the password (wrong password or user)"
    return None


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return parts._replace(netloc=netloc).geturl()
