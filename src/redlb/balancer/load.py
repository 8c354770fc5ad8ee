"""In-flight requests per backend, as the counting strategies see them.

``local`` is this worker's exact count (the exchange calls started/finished around each
attempt); ``others`` is the sum of every other instance's last published count, replaced
whole by store/inflight.py a few times a second.  A pick reads ``local + others``: exact
for its own requests, at most one publish interval old for the fleet's.

Peak EWMA (Finagle, Linkerd): a latency average that jumps up to any slower sample at once
and decays back with time constant ``decay`` seconds, so a backend that turns slow is
avoided on its first slow answer.  As in Finagle, a backend without news decays toward
zero too, so one avoided for being slow is tried again after a while and can recover.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from redlb.address import Backend


class LoadView:
    __slots__ = (
        "clock",
        "decay",
        "latency",
        "local",
        "local_total",
        "others",
        "others_total",
        "sampled_at",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic, decay: float = 10.0) -> None:
        self.clock = clock
        self.decay = decay
        self.local: dict[str, int] = {}
        self.local_total = 0
        self.others: dict[str, int] = {}
        self.others_total = 0
        # Peak EWMA of response time per backend key (seconds); filled only when tracked.
        self.latency: dict[str, float] | None = None
        self.sampled_at: dict[str, float] = {}

    def started(self, backend: Backend) -> None:
        key = backend.key
        local = self.local
        local[key] = local.get(key, 0) + 1
        self.local_total += 1

    def finished(self, backend: Backend, elapsed: float) -> None:
        key = backend.key
        local = self.local
        count = local.get(key, 0) - 1
        if count > 0:
            local[key] = count
        else:
            local.pop(key, None)
        self.local_total -= 1
        if self.latency is not None:
            self.sample(key, elapsed)

    def outstanding(self, backend: Backend) -> int:
        key = backend.key
        return self.local.get(key, 0) + self.others.get(key, 0)

    def total(self) -> int:
        return self.local_total + self.others_total

    def set_others(self, others: dict[str, int]) -> None:
        self.others = others
        self.others_total = sum(others.values())

    # Peak EWMA

    def track_latency(self) -> None:
        if self.latency is None:
            self.latency = {}

    def sample(self, key: str, elapsed: float) -> None:
        latency = self.latency
        assert latency is not None
        now = self.clock()
        old = latency.get(key)
        weight = math.exp(-(now - self.sampled_at.get(key, now)) / self.decay)
        if old is None or elapsed > old * weight:
            latency[key] = elapsed  # the peak: slower news counts at once
        else:
            latency[key] = old * weight + elapsed * (1.0 - weight)
        self.sampled_at[key] = now

    def ewma(self, backend: Backend, default: float = 0.0) -> float:
        """The peak EWMA now: the last value, decayed by the time since it was sampled."""
        latency = self.latency
        if latency is None:
            return default
        key = backend.key
        value = latency.get(key)
        if value is None:
            return default
        return value * math.exp(-(self.clock() - self.sampled_at[key]) / self.decay)
