"""nginx's smooth weighted round robin, laid out as one period indexed by the shared counter.

nginx keeps a running score per backend: each pick adds every backend's weight to its
score, takes the highest and subtracts the total from it.  The sequence repeats every
``sum(weights)`` picks and spreads each backend evenly over the period (weights 5,1,1 give
a a b a c a a, never a a a a a b c).  redlb computes that period once per snapshot and takes
``period[counter mod len(period)]``: every instance indexes one sequence with the one shared
counter, so the fleet as a whole follows it, not N copies of it started at random places.

Invariant (what the property tests check): in any run of consecutive indices, a backend's
count differs from ``run length x weight / total`` by less than 2.  Leased counter blocks
are such runs, so a fleet that used k blocks is off by less than 2k per backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

from redlb.address import Backend
from redlb.balancer.base import weights_of

# Building a period costs O(len x backends): past these, weights are scaled down (rounding).
MAX_PERIOD = 10_000
MAX_WORK = 2_000_000


def smooth_period(backends: Sequence[Backend], weights: Sequence[int]) -> tuple[Backend, ...]:
    """One period of nginx's smooth weighted sequence (weights >= 1, aligned with backends)."""
    if not weights:
        return tuple(backends)
    divisor = 0
    for weight in weights:
        divisor = gcd(divisor, weight)
    reduced = [w // divisor for w in weights]
    total = sum(reduced)
    limit = min(MAX_PERIOD, max(len(reduced), MAX_WORK // max(1, len(reduced))))
    if total > limit:
        reduced = [max(1, w * limit // total) for w in reduced]
        total = sum(reduced)
    scores = [0] * len(reduced)
    period = []
    for _ in range(total):
        scores = [s + w for s, w in zip(scores, reduced, strict=True)]
        best = scores.index(max(scores))  # the first of equals, as nginx does
        scores[best] -= total
        period.append(backends[best])
    return tuple(period)


class WeightedOrder:
    """The sequence a rotation indexes: the snapshot itself, or its smooth weighted period."""

    __slots__ = ("order", "seen")

    def __init__(self) -> None:
        self.seen: Sequence[Backend] | None = None
        self.order: Sequence[Backend] = ()

    def of(self, candidates: Sequence[Backend]) -> Sequence[Backend]:
        if candidates is not self.seen:
            weights = weights_of(candidates)
            self.order = smooth_period(candidates, weights) if weights else candidates
            self.seen = candidates
        return self.order
