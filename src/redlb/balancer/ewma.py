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
        # From the snapshot, once per snapshot (base.py rule 3): its keys and weights.
        self.seen: tuple[Backend, ...] | None = None
        self.keys: tuple[str, ...] = ()
        self.weights: tuple[int, ...] = ()

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self.seen = candidates
            self.keys = tuple(backend.key for backend in candidates)
            self.weights = weights_of(candidates)
        n = len(candidates)
        if n == 1:
            return candidates[0]
        rand = self.rand
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        now = self.load.clock()
        cost_i = self.cost(self.keys[i], now)
        cost_j = self.cost(self.keys[j], now)
        weights = self.weights
        if weights:
            cost_i, cost_j = cost_i / weights[i], cost_j / weights[j]
        return candidates[i] if cost_i <= cost_j else candidates[j]

    def cost(self, name: str, now: float) -> float:
        """LoadView.ewma x (LoadView.outstanding + 1), inlined: the hot path."""
        load = self.load
        latency = load.latency
        seconds = latency.get(name) if latency is not None else None
        if seconds is None:
            seconds = UNMEASURED
        else:
            seconds *= math.exp((load.sampled_at[name] - now) / load.decay)
            if seconds < UNMEASURED:
                seconds = UNMEASURED
        mine = load.local.get(name, 0)
        theirs = load.others.get(name, 0.0)
        if load.peers:  # the others moved on as this instance did (LoadView.others_now)
            rise = mine - load.baseline.get(name, 0)
            if rise > 0:
                theirs += load.peers * rise
        return seconds * (mine + theirs + 1)
