"""Active health checks with one elected prober per backend across all redlb instances.

Each backend has a lease in Redis (``SET NX PX``, renewed only by its owner).  The owner
probes, applies rise/fall, and writes ``up``/``down`` with a TTL; every instance routes on
what is written.  A prober that dies stops renewing, its lease expires, another takes over,
and its stale verdict expires too (a missing verdict routes normally).

The verdict outlives the lease (VERDICT_TTL > LEASE_TTL intervals): the instance taking over
finds it still there and starts from it, so a failing backend stays down through a takeover
instead of being written "up" again until ``fall`` failures.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from redlb.address import Backend
from redlb.backend_tls import client_context, describe, failures
from redlb.config import Config
from redlb.descriptors import is_own_shortage
from redlb.pool import Pool
from redlb.store.keys import Keys
from redlb.store.link import RedisLink

log = logging.getLogger("redlb.health")

LEASE_TTL = 3  # probe intervals
VERDICT_TTL = 5  # probe intervals: long enough for another instance to take the lease over

# KEYS: lease.  ARGV: instance id, ttl ms.  Returns 1 when this instance holds the lease.
_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


@dataclass(slots=True)
class Verdict:
    """Rise/fall bookkeeping for one backend this instance probes."""

    up: bool = True
    streak: int = 0  # consecutive results that disagree with ``up``

    def record(self, passed: bool, rise: int, fall: int) -> bool:
        """Apply one probe result; return True when the state flips."""
        if passed == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (rise if passed else fall):
            self.up = passed
            self.streak = 0
            return True
        return False


class HealthProber:
    def __init__(
        self, link: RedisLink, keys: Keys, pool: Pool, config: Config, instance_id: str
    ) -> None:
        assert config.health_path is not None
        self.link = link
        self.keys = keys
        self.pool = pool
        self.config = config
        self.instance_id = instance_id
        self.path = config.health_path
        self.verdicts: dict[Backend, Verdict] = {}

    async def run(self) -> None:
        interval = self.config.health_interval
        log.info("active health checks every %.1f s as prober %s", interval, self.instance_id)
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            if not self.link.up:
                continue
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("health round failed: %r", exc)

    async def round(self) -> None:
        client = self.link.client
        members = list(dict.fromkeys(self.pool.members))
        if not members:
            self.verdicts.clear()
            return
        lease_ms = int(self.config.health_interval * LEASE_TTL * 1000)
        verdict_ms = int(self.config.health_interval * VERDICT_TTL * 1000)
        pipe = client.pipeline(transaction=False)
        for backend in members:
            pipe.eval(_LEASE, 1, self.keys.probe_lease(backend), self.instance_id, lease_ms)
        pipe.mget([self.keys.health(b) for b in members])
        *held, shared = await asyncio.wait_for(pipe.execute(), self.config.redis_timeout)
        owned = [b for b, mine in zip(members, held, strict=True) if mine == 1]
        mine = set(owned)
        for backend, state in zip(members, shared, strict=True):
            if backend in mine and backend not in self.verdicts:
                # Taking over: go on from the fleet's verdict, not from a fresh "up".
                self.verdicts[backend] = Verdict(up=state != b"down")
        for backend in list(self.verdicts):
            if backend not in mine:
                del self.verdicts[backend]  # another instance probes it now
        if not owned:
            return
        results = await asyncio.gather(*(self.probe(b) for b in owned))
        changed = False
        pipe = client.pipeline(transaction=False)
        for backend, passed in zip(owned, results, strict=True):
            verdict = self.verdicts.setdefault(backend, Verdict())
            # Not probed (None): the verdict stands, and is written again so as not to expire.
            rise, fall = self.config.health_rise, self.config.health_fall
            if passed is not None and verdict.record(passed, rise, fall):
                changed = True
                log.warning("health check: %s is %s", backend, "UP" if verdict.up else "DOWN")
            pipe.set(self.keys.health(backend), "up" if verdict.up else "down", px=verdict_ms)
        if changed:
            pipe.publish(self.keys.events, "health")
        await asyncio.wait_for(pipe.execute(), self.config.redis_timeout)

    async def probe(self, backend: Backend) -> bool | None:
        """GET the health path; 2xx and 3xx pass.  An https:// backend is probed over TLS
        with the proxy's own verification: a certificate requests would refuse fails.
        None: not probed, this process is out of descriptors."""
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {backend.authority}\r\n"
            "User-Agent: redlb-health\r\nConnection: close\r\n\r\n"
        ).encode()
        writer = None
        try:
            async with asyncio.timeout(self.config.health_timeout):
                if backend.tls:
                    reader, writer = await self._open_tls(backend)
                else:
                    reader, writer = await asyncio.open_connection(backend.host, backend.port)
                writer.write(request)
                status_line = await reader.readline()
            parts = status_line.split(b" ", 2)
            return (
                len(parts) >= 2
                and parts[0].startswith(b"HTTP/1.")
                and parts[1].isdigit()
                and 200 <= int(parts[1]) < 400
            )
        except OSError as exc:  # a timeout too
            # Out of descriptors: no verdict (a "down" would stop the fleet routing to it).
            return None if is_own_shortage(exc) else False
        except ValueError:
            return False
        finally:
            if writer is not None:
                writer.close()

    async def _open_tls(
        self, backend: Backend
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = client_context(self.config.upstream_ca, self.config.upstream_insecure)
        try:
            return await asyncio.open_connection(
                backend.host, backend.port, ssl=context, server_hostname=backend.host
            )
        except OSError as exc:
            if not isinstance(exc, ConnectionRefusedError) and not is_own_shortage(exc):
                failures.report(backend, describe(exc), " (health check)")
            raise
