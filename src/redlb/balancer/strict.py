"""Strict rotation: every request takes the next number of the one shared counter.

Requests sent one after another to different instances go to consecutive backends.  Picks
waiting at the same moment share one ``INCRBY n`` round trip, so throughput does not fall
to one Redis round trip per request.
"""

from __future__ import annotations

from collections.abc import Sequence

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.store.rotation import StrictCounter


class StrictRoundRobin(Strategy):
    name = "strict"
    immediate = False

    def __init__(self, counter: StrictCounter) -> None:
        self.counter = counter

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        return candidates[self.counter.local_index() % len(candidates)]

    async def pick_async(self, candidates: Sequence[Backend]) -> Backend:
        index = await self.counter.next_index()
        return candidates[index % len(candidates)]
