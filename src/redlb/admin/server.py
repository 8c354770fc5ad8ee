"""One worker's admin listener: the API over this worker's Redis client."""

from __future__ import annotations

from collections.abc import Callable

from redlb.admin.api import AdminApi
from redlb.admin.auth import Guard
from redlb.admin.listener import AdminProtocol
from redlb.proxy.context import ProxyContext
from redlb.store.link import RedisLink


def admin_protocol(ctx: ProxyContext, link: RedisLink) -> Callable[[], AdminProtocol]:
    config = ctx.config
    api = AdminApi(link.client, Guard(config.admin_token), config.pool, config.redis_timeout)
    return lambda: AdminProtocol(api)
