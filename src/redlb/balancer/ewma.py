"""Peak EWMA (Finagle, Linkerd): P2C on expected latency x requests in flight.

The cost of a backend is its peak-EWMA response time (balancer/load.py) times one more
than its fleet-wide in-flight count, divided by its weight.  A backend that turns slow is
avoided after its first slow answer, before its queue builds up; one never measured costs
nothing and gets tried.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView

# A backend without a sample yet is priced at this latency (seconds) times its load, so
# that in-flight counts still separate unmeasured backends.
UNMEASURED = 1e-3


class PeakEwma(Strategy):
    name = "peak_ewma"
    counts = True
    fleet = True

    def __init__(self, load: LoadView, rand: Callable[[], float] | None = None) -> None:
        load.track_latency()
        self.load = load
        self.rand = rand or random.Random().random

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        rand = self.rand
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        # cost = LoadView.ewma x (LoadView.outstanding + 1) / weight, inlined: the hot path.
        load = self.load
        latency, sampled_at, local, others, peers = (
            load.latency or {},
            load.sampled_at,
            load.local,
            load.others,
            load.peers,
        )
        now = load.clock()
        weights = weights_of(candidates)
        costs = []
        for index in (i, j):
            name = candidates[index].key
            seconds = latency.get(name)
            if seconds is None:
                seconds = UNMEASURED
            else:
                seconds *= math.exp((sampled_at[name] - now) / load.decay)
                if seconds < UNMEASURED:
                    seconds = UNMEASURED
            mine = local.get(name, 0)
            theirs = others.get(name, 0.0)
            if peers:  # the others moved on as this instance did (LoadView.others_now)
                rise = mine - load.baseline.get(name, 0)
                if rise > 0:
                    theirs += peers * rise
            cost = seconds * (mine + theirs + 1)
            costs.append(cost / weights[index] if weights else cost)
        return candidates[i] if costs[0] <= costs[1] else candidates[j]
