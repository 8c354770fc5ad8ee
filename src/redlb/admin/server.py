"""One worker's admin listener: the API over its own Redis client.

Not the data plane's client: that one gives up after ``--redis-timeout`` (0.25 s) so that
no request waits on Redis, while an operator's write should rather wait a second than fail.
"""

from __future__ import annotations

from collections.abc import Callable

from redlb.admin.api import AdminApi
from redlb.admin.auth import Guard
from redlb.admin.listener import AdminProtocol
from redlb.proxy.context import ProxyContext
from redlb.store.client import make_client

ADMIN_REDIS_TIMEOUT = 2.0


def admin_protocol(ctx: ProxyContext, url: str) -> Callable[[], AdminProtocol]:
    config = ctx.config
    timeout = max(config.redis_timeout, ADMIN_REDIS_TIMEOUT)
    client = make_client(url, timeout)
    api = AdminApi(client, Guard(config.admin_token), config.pool, timeout)
    # A request's whole head and body within --header-timeout, as on the data plane.
    return lambda: AdminProtocol(api, config.header_timeout)
