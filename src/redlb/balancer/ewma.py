"""Peak EWMA (Finagle, Linkerd): P2C on expected latency x requests in flight.

The cost of a backend is its peak-EWMA response time (balancer/load.py) times one more
than its fleet-wide in-flight count, divided by its weight.  A backend that turns slow is
avoided after its first slow answer, before its queue builds up; one never measured costs
nothing and gets tried.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

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

    def pick(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = int(self.rand() * n)
        j = int(self.rand() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        load = self.load
        cost_a = max(load.ewma(a, UNMEASURED), UNMEASURED) * (load.outstanding(a) + 1)
        cost_b = max(load.ewma(b, UNMEASURED), UNMEASURED) * (load.outstanding(b) + 1)
        weights = weights_of(candidates)
        if weights:
            cost_a, cost_b = cost_a / weights[i], cost_b / weights[j]
        return a if cost_a <= cost_b else b
