"""Least outstanding requests, fleet-wide, by the power of two choices (P2C).

Two distinct candidates are drawn at random and the one with fewer requests in flight wins
(divided by weight: Envoy's weighted least request).  In flight means this instance's exact
count plus every other instance's last published count (balancer/load.py), so ten instances
do not all pile onto the one backend that each of them alone thinks idle.  P2C rather than
a full scan: O(1) per pick, and stale counts do not make every instance herd onto the same
"least loaded" backend at once (Mitzenmacher; Envoy's and Traefik's default).  Pools of up
to ``SCAN_UP_TO`` backends are scanned whole (from a random start): there P2C's pair leaves
out the best backend a third of the time or more, and a scan costs as little.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView

SCAN_UP_TO = 4


class LeastOutstanding(Strategy):
    name = "least_outstanding"
    counts = True
    fleet = True

    def __init__(self, load: LoadView, rand: Callable[[], float] | None = None) -> None:
        self.load = load
        self.rand = rand or random.Random().random

    def pick(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        # Inlined LoadView.outstanding (this is the hot path): local + others moved on.
        load = self.load
        local, others, baseline, peers = load.local, load.others, load.baseline, load.peers
        weights = weights_of(candidates)
        rand = self.rand
        if n <= SCAN_UP_TO:
            start = int(rand() * n)
            best = candidates[start]
            best_cost = 0.0
            for offset in range(n):
                index = (start + offset) % n
                backend = candidates[index]
                name = backend.key
                mine = local.get(name, 0)
                theirs = others.get(name, 0.0)
                if peers:
                    rise = mine - baseline.get(name, 0)
                    if rise > 0:
                        theirs += peers * rise
                cost = mine + theirs + 1.0
                if weights:
                    cost /= weights[index]
                if offset == 0 or cost < best_cost:
                    best, best_cost = backend, cost
            return best
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        cost_a = load.outstanding(a) + 1
        cost_b = load.outstanding(b) + 1
        if weights:
            return a if cost_a * weights[j] <= cost_b * weights[i] else b
        return a if cost_a <= cost_b else b
