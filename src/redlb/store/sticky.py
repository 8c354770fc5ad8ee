"""The fleet's sticky-session secret: created once (``SET NX``), read by every instance.

Re-read every ``REFRESH`` seconds, so that an operator's rotation (``DEL
redlb:sticky-secret``, then ``SET`` or a fresh one) is followed by every instance: old cookies
then name nothing, and requests are placed by the pool's strategy.  An instance that knows a
secret offers that one to ``SET NX``: a Redis that lost its data gets the fleet's secret back
instead of a new one that would re-place every session.  (So a rotation is ``SET`` of a new
value; a ``DEL`` alone is refilled with the old one.)
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


async def load_secret(
    link: RedisLink, timeout: float, known: bytes | None = None
) -> AsyncIterator[bytes]:
    """Yield the secret as soon as it is known, then again after each refresh."""
    while True:
        try:
            pipe = link.client.pipeline(transaction=False)
            pipe.set(STICKY_SECRET, known or secrets.token_hex(32), nx=True)
            pipe.get(STICKY_SECRET)
            _, secret = await asyncio.wait_for(pipe.execute(), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("cannot read the sticky-session secret: %r", exc)
            await asyncio.sleep(1.0)
            continue
        if secret:
            known = bytes(secret)
            yield known
        await asyncio.sleep(REFRESH)
