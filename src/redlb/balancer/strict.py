"""Strict rotation: every request takes the next number of the one shared counter.

Requests sent one after another to different instances go to consecutive backends.  Picks
waiting at the same moment share one ``INCRBY n`` round trip, so throughput does not fall
to one Redis round trip per request.  With weights, the counter indexes nginx's smooth
weighted period (balancer/wrr.py).
"""

from __future__ import annotations

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.balancer.wrr import WeightedOrder
from redlb.store.rotation import StrictCounter


class StrictRoundRobin(Strategy):
    name = "strict"
    immediate = False

    def __init__(self, counter: StrictCounter) -> None:
        self.counter = counter
        self.weighted = WeightedOrder()

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        order = self.weighted.of(candidates)
        return order[self.counter.local_index() % len(order)]

    async def pick_async(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        index = await self.counter.next_index()
        order = self.weighted.of(candidates)
        return order[index % len(order)]
