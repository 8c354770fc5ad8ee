"""Least outstanding requests, fleet-wide, by the power of two choices (P2C).

Two distinct candidates are drawn at random and the one with fewer requests in flight wins
(divided by weight: Envoy's weighted least request).  In flight means this instance's exact
count plus every other instance's last published count (balancer/load.py), so ten instances
do not all pile onto the one backend that each of them alone thinks idle.  P2C rather than
a full scan: O(1) per pick, and stale counts do not make every instance herd onto the same
"least loaded" backend at once (Mitzenmacher; Envoy's and Traefik's default).  Pools of up
to ``SCAN_UP_TO`` backends are scanned whole (from a random start): there P2C's pair leaves
out the best backend a third of the time or more, and a scan costs as little.  Near-ties go
to the backend this instance saw answer faster (``NEAR``): a bias of at most 1.25 requests,
like Envoy's active request bias a small correction on the counts, not peak_ewma's product.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from itertools import permutations

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView

SCAN_UP_TO = 4

# Near-ties go to the faster backend: each candidate's cost gets up to NEAR more (in
# requests), in proportion to its mean latency over the slowest candidate's.  Counts alone
# hold a slow backend above its share of the time in flight: a fast backend's client spends
# more of its time between requests (not counted), so even exact counts, equal at each
# pick, left a backend 10 times slower at 1.06x its share (tests/test_review_strategies.py).
# It takes more than one request of bias to lose the one-request lead it has then: 1.25
# puts that at 5 times slower (1.25 x (1 - 1/5) = 1); NEAR = 1 measured 0.90-1.01x its
# share, 1.25 0.81x.  Never more than NEAR above the least loaded, so it stays least
# outstanding; backends of like latency differ by a small fraction of a request.
NEAR = 1.25
# Costs closer than this are equal, and the random start (the pair's order) decides: the
# bias alone made the faster by a hair of two like backends win every tie, and with one
# client it got every request while the other one idled.
EQUAL = 0.1


# A random order of the scanned candidates, per pool size: the first of the equals in it is
# each of them with the same chance (the first from a random start gave the one after a
# busier backend two turns in three), whatever their number, for one draw.
ORDERS = {n: tuple(permutations(range(n))) for n in range(2, SCAN_UP_TO + 1)}


class LeastOutstanding(Strategy):
    name = "least_outstanding"
    counts = True
    fleet = True

    def __init__(self, load: LoadView, rand: Callable[[], float] | None = None) -> None:
        load.track_mean_latency()
        self.load = load
        self.rand = rand or random.Random().random
        # From the snapshot, once per snapshot (base.py rule 3): its keys, weights, orders.
        self.seen: tuple[Backend, ...] | None = None
        self.keys: tuple[str, ...] = ()
        self.weights: tuple[int, ...] = ()
        self.orders: tuple[tuple[int, ...], ...] = ()
        self.equal = EQUAL
        # The scan's scratch, one entry per candidate: reused, not made anew each pick.
        self.costs: list[float] = []
        self.means: list[float] = []

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self.seen = candidates
            self.keys = tuple(backend.key for backend in candidates)
            self.weights = weights = weights_of(candidates)
            self.orders = ORDERS.get(len(candidates), ())
            # EQUAL is in requests of the heaviest backend: costs are divided by weights
            # (x10 while slow start ramps), and weights 20:10 are the shares of 2:1.
            self.equal = EQUAL / max(weights) if weights else EQUAL
            self.costs = [0.0] * len(candidates)
            self.means = [0.0] * len(candidates)
        n = len(candidates)
        if n == 1:
            return candidates[0]
        load = self.load
        if n > SCAN_UP_TO:  # P2C: two distinct candidates at random, compared alike
            rand = self.rand
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            a, b = candidates[i], candidates[j]
            cost_a = load.outstanding(a) + 1
            cost_b = load.outstanding(b) + 1
            latency = load.mean_latency or {}
            latency_a, latency_b = latency.get(a.key, 0.0), latency.get(b.key, 0.0)
            slower = max(latency_a, latency_b)
            if slower > 0:
                cost_a += NEAR * latency_a / slower
                cost_b += NEAR * latency_b / slower
            weights = self.weights
            if weights:
                cost_a, cost_b = cost_a / weights[i], cost_b / weights[j]
            return b if cost_b < cost_a - self.equal else a
        # The scan, one pass over the keys: LoadView.outstanding inlined (the hot path), and
        # each latency kept for the bias, which needs the slowest first.
        local, others, peers = load.local, load.others, load.peers
        latency = load.mean_latency or {}
        costs, means, keys = self.costs, self.means, self.keys
        slowest = 0.0
        for index in range(n):
            name = keys[index]
            mine = local.get(name, 0)
            cost = mine + 1.0
            if others:
                cost += others.get(name, 0.0)
            if peers:  # the others moved on as this instance did (LoadView.others_now)
                rise = mine - load.baseline.get(name, 0)
                if rise > 0:
                    cost += peers * rise
            costs[index] = cost
            mean = latency.get(name, 0.0)
            means[index] = mean
            if mean > slowest:
                slowest = mean
        near = NEAR / slowest if slowest > 0 else 0.0
        weights = self.weights
        least = math.inf
        for index in range(n):
            cost = costs[index] + near * means[index]
            if weights:  # the bias too: a weight is never outvoted by a latency
                cost /= weights[index]
            costs[index] = cost
            if cost < least:
                least = cost
        # One of those equal to the least, each with the same chance.
        good_enough = least + self.equal
        orders = self.orders
        for index in orders[int(self.rand() * len(orders))]:
            if costs[index] <= good_enough:
                break
        return candidates[index]
