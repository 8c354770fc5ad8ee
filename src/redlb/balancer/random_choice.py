"""Random: each request to a backend drawn at random (by weight).

No shared state at all, no coordination: the baseline that needs nothing, and an even
spread over many requests and many instances.  Less even than round robin over a few.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of


class RandomChoice(Strategy):
    name = "random"

    def __init__(self, rand: Callable[[], float] | None = None) -> None:
        self.rand = rand or random.Random().random
        self.seen: tuple[Backend, ...] | None = None
        self.cumulative: list[int] = []

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self.seen = candidates
            self.cumulative = list(accumulate(weights_of(candidates)))
        cumulative = self.cumulative
        if not cumulative:
            return candidates[int(self.rand() * len(candidates))]
        return candidates[bisect_right(cumulative, self.rand() * cumulative[-1])]
