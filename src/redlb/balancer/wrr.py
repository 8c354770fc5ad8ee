"""nginx's smooth weighted round robin, laid out as one period indexed by the shared counter.

nginx keeps a running score per backend: each pick adds every backend's weight to its
score, takes the highest and subtracts the total from it.  The sequence repeats every
``sum(weights)`` picks and spreads each backend evenly over the period (weights 5,1,1 give
a a b a c a a, never a a a a a b c).  redlb computes that period once per snapshot and takes
``period[counter mod len(period)]``: every instance indexes one sequence with the one shared
counter, so the fleet as a whole follows it, not N copies of it started at random places.

Invariant (what the property tests check): in any run of consecutive indices, a backend's
count differs from ``run length x weight / total`` by less than 2 (less than 3 in the stride
order of large pools).  Leased counter blocks are such runs, so a fleet that used k blocks
is off by less than 2k (3k) per backend, and a whole period gives every weight exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

from redlb.address import Backend
from redlb.balancer.base import weights_of

# nginx's scan costs O(period x backends): past MAX_WORK, the period is laid out by stride
# scheduling instead, O(period x log period).  Past MAX_PERIOD entries (memory, and the time
# of one build), weights are scaled down to fit.
MAX_WORK = 2_000_000
MAX_PERIOD = 100_000


def smooth_period(backends: Sequence[Backend], weights: Sequence[int]) -> tuple[Backend, ...]:
    """One period of nginx's smooth weighted sequence (weights >= 1, aligned with backends).

    Large pools get the stride order instead (see ``stride_period``): the same weights
    exactly, the same period, a little less even inside it.
    """
    if not weights:
        return tuple(backends)
    divisor = 0
    for weight in weights:
        divisor = gcd(divisor, weight)
    reduced = [w // divisor for w in weights]
    total = sum(reduced)
    if total > MAX_PERIOD:
        reduced = scaled(reduced, MAX_PERIOD)
        total = sum(reduced)
    if total * len(reduced) > MAX_WORK:
        return stride_period(backends, reduced)
    scores = [0] * len(reduced)
    period = []
    for _ in range(total):
        scores = [s + w for s, w in zip(scores, reduced, strict=True)]
        best = scores.index(max(scores))  # the first of equals, as nginx does
        scores[best] -= total
        period.append(backends[best])
    return tuple(period)


def stride_period(backends: Sequence[Backend], weights: Sequence[int]) -> tuple[Backend, ...]:
    """Each backend's k-th turn at virtual time (k + 1/2) / weight, in time order.

    Every backend gets exactly its weight's turns per period, spread evenly (Sainte-Lague's
    order); ties go to the heavier backend, then to pool order.  A sort, not a scan per
    entry: 1,000 backends weighted 10 and 1 lay out 5,500 entries in milliseconds.
    """
    turns = sorted(
        ((2 * k + 1) / w, -w, i) for i, w in enumerate(weights) for k in range(w)
    )  # (2k+1)/w: equal fractions give equal floats, so ties are exact
    return tuple(backends[i] for _, _, i in turns)


def scaled(weights: Sequence[int], limit: int) -> list[int]:
    """Weights scaled to sum to about ``limit``, each at least 1, rounded to the nearest."""
    total = sum(weights)
    return [max(1, (2 * w * limit + total) // (2 * total)) for w in weights]


class WeightedOrder:
    """The sequence a rotation indexes: the snapshot itself, or its smooth weighted period."""

    __slots__ = ("order", "seen")

    def __init__(self) -> None:
        self.seen: tuple[Backend, ...] | None = None
        self.order: tuple[Backend, ...] = ()

    def of(self, candidates: tuple[Backend, ...]) -> tuple[Backend, ...]:
        if candidates is not self.seen:
            weights = weights_of(candidates)
            self.order = smooth_period(candidates, weights) if weights else candidates
            self.seen = candidates
        return self.order
