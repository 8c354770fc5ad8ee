"""The fleet's sticky-session secret: created once (``SET NX``), read by every instance.

Re-read every ``REFRESH`` seconds, so that a Redis that lost its data (and with it the
secret) or an operator's rotation (``DEL redlb:sticky-secret``) is followed by every
instance: old cookies then name nothing, and requests are placed by the pool's strategy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

from redlb.store.keys import STICKY_SECRET
from redlb.store.link import RedisLink

log = logging.getLogger("redlb.sticky")

REFRESH = 10.0


async def load_secret(link: RedisLink, timeout: float) -> AsyncIterator[bytes]:
    """Yield the secret as soon as it is known, then again after each refresh."""
    while True:
        try:
            pipe = link.client.pipeline(transaction=False)
            pipe.set(STICKY_SECRET, secrets.token_hex(32), nx=True)
            pipe.get(STICKY_SECRET)
            _, secret = await asyncio.wait_for(pipe.execute(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("cannot read the sticky-session secret: %r", exc)
            await asyncio.sleep(1.0)
            continue
        if secret:
            yield bytes(secret)
        await asyncio.sleep(REFRESH)
