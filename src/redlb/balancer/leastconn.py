"""Least connections, per instance (nginx least_conn, HAProxy leastconn).

A full scan of this instance's own in-flight counts; equals are taken in turn.  It knows
nothing of the other instances: kept for comparison with least_outstanding and for the
single-instance deployments where it is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView


class LeastConnections(Strategy):
    name = "least_conn"
    counts = True

    def __init__(self, load: LoadView) -> None:
        self.load = load
        self.turn = 0

    def pick(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        n = len(candidates)
        self.turn += 1
        start = self.turn % n
        local = self.load.local
        weights = weights_of(candidates) or (1,) * n
        best = candidates[start]
        best_cost = (local.get(best.key, 0) + 1) / weights[start]
        for offset in range(1, n):
            index = (start + offset) % n
            backend = candidates[index]
            cost = (local.get(backend.key, 0) + 1) / weights[index]
            if cost < best_cost:
                best, best_cost = backend, cost
        return best
