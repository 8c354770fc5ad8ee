"""Least connections, per instance (nginx least_conn, HAProxy leastconn).

A full scan of this instance's own in-flight counts; equals are taken in turn.  It knows
nothing of the other instances: kept for comparison with least_outstanding and for the
single-instance deployments where it is exact.
"""

from __future__ import annotations

import math

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView


class LeastConnections(Strategy):
    name = "least_conn"
    counts = True

    def __init__(self, load: LoadView) -> None:
        self.load = load
        self.turn = 0
        # From the snapshot, once per snapshot (base.py rule 3).
        self.seen: tuple[Backend, ...] | None = None
        self.keys: tuple[str, ...] = ()
        self.weights: tuple[int, ...] = ()

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self.seen = candidates
            keys = tuple(backend.key for backend in candidates)
            self.keys = keys + keys  # twice: a scan from any start is one range
            self.weights = weights_of(candidates) * 2
        keys, weights, local = self.keys, self.weights, self.load.local
        n = len(candidates)
        self.turn += 1
        start = best = self.turn % n
        least = math.inf
        for index in range(start, start + n):  # from this turn's start
            count = local.get(keys[index], 0)
            if weights:
                cost = (count + 1) / weights[index]
            elif not count:
                best = index
                break  # idle: none can be less
            else:
                cost = float(count)  # a float, as least is (mypyc: no int in a float)
            if cost < least:
                least, best = cost, index
        return candidates[best % n]
