"""Default rotation: the shared counter, leased in blocks, no Redis on the request path.

Each block of the shared counter (``INCRBY``) is a contiguous run of indices, and any prefix
of a contiguous run gives every backend the same count within one.  So however requests are
spread over instances, every backend's share stays even, while the request path only bumps a
local cursor; the next block is fetched in the background before the current one runs out.
With weights, the counter indexes nginx's smooth weighted period instead (balancer/wrr.py).
"""

from __future__ import annotations

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.balancer.wrr import WeightedOrder
from redlb.store.rotation import CounterLease


class LeasedRoundRobin(Strategy):
    name = "lease"

    def __init__(self, lease: CounterLease) -> None:
        self.lease = lease
        self.weighted = WeightedOrder()

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        weighted = self.weighted
        order = weighted.order if candidates is weighted.seen else weighted.of(candidates)
        return order[self.lease.next_index() % len(order)]
