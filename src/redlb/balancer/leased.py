"""Default rotation: the shared counter, leased in blocks, no Redis on the request path.

Each block of the shared counter (``INCRBY``) is a contiguous run of indices, and any prefix
of a contiguous run gives every backend the same count within one.  So however requests are
spread over instances, every backend's share stays even, while the request path only bumps a
local cursor; the next block is fetched in the background before the current one runs out.
"""

from __future__ import annotations

from collections.abc import Sequence

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.store.rotation import CounterLease


class LeasedRoundRobin(Strategy):
    name = "lease"

    def __init__(self, lease: CounterLease) -> None:
        self.lease = lease

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        return candidates[self.lease.next_index() % len(candidates)]
