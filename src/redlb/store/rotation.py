"""The shared round-robin counter: leased in blocks (default) or one by one (strict).

Both are ``INCRBY`` on one key: atomic, and nothing is ever popped from the user's list, so
no server can be lost or resurrected by a crash between two commands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import MutableSequence
from typing import Any, Final

from redlb.store.link import RedisLink, describe_failure

log = logging.getLogger("redlb.rotation")

# Slots of a cursor: current index, end of current block, next block [start, end), the pid
# leasing the next block (0: none) and since when (monotonic ns, system-wide on Linux).
# Final: compiled, constants rather than lookups in the module's dict (next_index is per request).
_CUR: Final = 0
_END: Final = 1
_NEXT_START: Final = 2
_NEXT_END: Final = 3
_REFILLING: Final = 4
_REFILL_SINCE: Final = 5
_SLOTS: Final = 6
MIN_BLOCK: Final = 16
MAX_BLOCK: Final = 16384


class _NoLock:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


class Cursor:
    """Lease state of one process, or shared by the workers of one supervisor (fork).

    Shared, it lives in shared memory under a process lock, so the workers of one machine
    take consecutive indices of one block: requests alternate exactly across workers.
    """

    def __init__(self, shared: bool = False) -> None:
        self.values: MutableSequence[int]
        self.lock: Any
        if shared:
            import multiprocessing  # the supervisor's, before it forks: one worker never needs it

            self.values = multiprocessing.RawArray("q", _SLOTS)
            self.lock = multiprocessing.Lock()
        else:
            self.values = [0] * _SLOTS
            self.lock = _NoLock()

    def recover(self, dead_pid: int | None = None) -> None:
        """After a worker died: free the lock if it died holding it (held for µs otherwise),
        and its claim on the next lease, which nobody else would ever clear."""
        if self.lock.acquire(timeout=0.2):
            self.lock.release()
        else:
            self.lock.release()
        if dead_pid is not None and self.values[_REFILLING] == dead_pid:
            self.values[_REFILLING] = 0


class CounterLease:
    def __init__(self, link: RedisLink, key: str, timeout: float, cursor: Cursor) -> None:
        self.link = link
        self.key = key
        self.timeout = timeout
        self.cursor = cursor
        self.block = MIN_BLOCK
        self.last_refill = 0.0
        self.retry_after = 0.0
        self.refill_task: asyncio.Task[None] | None = None
        self.fallback = 0
        self.pid = os.getpid()
        # A lease claimed longer ago than any refill can take was claimed by a worker that
        # died mid-refill: take the claim over rather than stop leasing for good.
        self.stale_claim_ns = int((2 * timeout + 2.0) * 1e9)

    def next_index(self) -> int:
        values = self.cursor.values
        lock = self.cursor.lock
        # A worker killed while holding the lock must not stall the others: after a short
        # wait, rotate locally instead (fairness suffers for a moment, nothing blocks).
        # The non-blocking try first: a timed acquire costs several times more.
        if not lock.acquire(False) and not lock.acquire(timeout=0.05):
            self.fallback += 1
            return self.fallback
        try:
            index = values[_CUR]
            if index >= values[_END] and values[_NEXT_END] > values[_NEXT_START]:
                index = values[_NEXT_START]
                values[_END] = values[_NEXT_END]
                values[_NEXT_START] = values[_NEXT_END] = 0
            values[_CUR] = index + 1
            refill = (
                not values[_NEXT_END]
                and values[_END] - index <= self.block // 2
                and (not values[_REFILLING] or self._claim_is_stale())
            )
            if refill:
                values[_REFILLING] = self.pid
                values[_REFILL_SINCE] = time.monotonic_ns()
        finally:
            lock.release()
        if refill:
            self._schedule_refill()
        return index

    def _claim_is_stale(self) -> bool:
        return time.monotonic_ns() - self.cursor.values[_REFILL_SINCE] > self.stale_claim_ns

    def _schedule_refill(self) -> None:
        now = time.monotonic()
        if not self.link.up or now < self.retry_after:
            self.cursor.values[_REFILLING] = 0
            return
        self.refill_task = asyncio.get_running_loop().create_task(self.refill())

    async def refill(self) -> None:
        """Lease the next block; adapt its size so leases stay about a second apart."""
        now = time.monotonic()
        if self.last_refill:
            interval = now - self.last_refill
            if interval < 1.0:
                self.block = min(self.block * 2, MAX_BLOCK)
            elif interval > 10.0:
                self.block = max(self.block // 2, MIN_BLOCK)
        self.last_refill = now
        block = self.block
        values = self.cursor.values
        try:
            end = int(
                await asyncio.wait_for(self.link.client.incrby(self.key, block), self.timeout)
            )
        except Exception as exc:  # any Redis failure: keep rotating locally, try again later
            log.debug("leasing a rotation block failed: %r", exc)
            self.retry_after = time.monotonic() + 1.0
            values[_REFILLING] = 0
            return
        lock = self.cursor.lock
        if not lock.acquire(timeout=1.0):
            values[_REFILLING] = 0  # the block is lost; the next pick may lease another
            return
        try:
            if values[_CUR] >= values[_END]:
                values[_CUR], values[_END] = end - block, end
            else:
                values[_NEXT_START], values[_NEXT_END] = end - block, end
            values[_REFILLING] = 0
        finally:
            lock.release()


class StrictCounter:
    """One shared number per pick; concurrent picks share one ``INCRBY n`` round trip."""

    def __init__(self, link: RedisLink, key: str, timeout: float) -> None:
        self.link = link
        self.key = key
        self.timeout = timeout
        self.waiters: list[asyncio.Future[int]] = []
        self.flushing = False
        self.flush_task: asyncio.Task[None] | None = None
        self.local = 0
        self.degraded = False

    def local_index(self) -> int:
        self.local += 1
        return self.local - 1

    async def next_index(self) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self.waiters.append(future)
        if not self.flushing:
            self.flushing = True
            self.flush_task = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self.waiters:
                batch, self.waiters = self.waiters, []
                start = await self._take(len(batch))
                for offset, future in enumerate(batch):
                    if not future.done():
                        future.set_result(start + offset)
        finally:
            self.flushing = False

    async def _take(self, count: int) -> int:
        if self.link.up:
            try:
                end = await asyncio.wait_for(self.link.client.incrby(self.key, count), self.timeout)
                if self.degraded:
                    log.warning("strict rotation is shared through Redis again")
                    self.degraded = False
                self.local = int(end)
                return int(end) - count
            except Exception as exc:
                if not self.degraded:
                    log.error(
                        "strict rotation falls back to a local counter: Redis %s",
                        describe_failure(exc)[1],
                    )
                    self.degraded = True
        start = self.local
        self.local += count
        return start
