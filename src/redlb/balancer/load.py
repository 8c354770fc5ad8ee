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

# Each answer's share of the plain mean latency: about the last 10 answers matter.
MEAN_LATENCY_WEIGHT = 0.1
# How long the plain mean latency is kept (forget_mean_latency, from the publisher's loop).
MEAN_LATENCY_MEMORY = 5.0


class LoadView:
    __slots__ = (
        "baseline",
        "clock",
        "counts_at_start",
        "decay",
        "latency",
        "local",
        "local_total",
        "mean_latency",
        "others",
        "others_total",
        "peers",
        "sampled_at",
        "times",
        "window_start",
        "windowed",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic, decay: float = 10.0) -> None:
        self.clock = clock
        self.decay = decay
        self.local: dict[str, int] = {}
        self.local_total = 0
        # For publishing the mean count over a window: per backend, the sum of finish times
        # minus the sum of start times of the window's events (see take_means).
        self.windowed = False  # set by the publisher: only then are windows kept
        self.times: dict[str, float] = {}
        self.counts_at_start: dict[str, int] = {}
        self.window_start = clock()
        self.others: dict[str, float] = {}
        self.others_total = 0.0
        # This instance's own counts as the peers last saw them (the means it published with
        # the read of ``others``), and how many instances ``others`` sums.
        self.baseline: dict[str, float] = {}
        self.peers = 0
        # Peak EWMA of response time per backend key (seconds); filled only when tracked.
        self.latency: dict[str, float] | None = None
        self.sampled_at: dict[str, float] = {}
        # Plain EWMA of response time per backend key (seconds), for least_outstanding's
        # tie-break: no clock, no exp, one dict read and write per request; filled only
        # when tracked (track_mean_latency).
        self.mean_latency: dict[str, float] | None = None

    # started() and finished() take ``now`` from a caller that read the clock already (the
    # exchange: one read a request, not three); -1 (no reading) reads ``clock``.

    def started(self, backend: Backend, now: float = -1.0) -> None:
        key = backend.key
        local = self.local
        local[key] = local.get(key, 0) + 1
        self.local_total += 1
        if self.windowed:
            times = self.times
            times[key] = times.get(key, 0.0) - (now if now >= 0 else self.clock())

    def finished(self, backend: Backend, elapsed: float, now: float = -1.0) -> None:
        key = backend.key
        local = self.local
        count = local.get(key, 0) - 1
        if count > 0:
            local[key] = count
        else:
            local.pop(key, None)
        self.local_total -= 1
        windowed, latency = self.windowed, self.latency
        if windowed or latency is not None:
            if now < 0:
                now = self.clock()  # once for both
            if windowed:
                times = self.times
                times[key] = times.get(key, 0.0) + now
            if latency is not None:
                self.sample(key, elapsed, now)
        means = self.mean_latency
        if means is not None:
            old = means.get(key, elapsed)
            means[key] = old + (elapsed - old) * MEAN_LATENCY_WEIGHT

    def outstanding(self, backend: Backend) -> float:
        """This instance's count plus its estimate of the others' (see ``others_now``)."""
        key = backend.key
        local = self.local.get(key, 0)
        return local + self.others_now(key, local)

    def others_now(self, key: str, local: int) -> float:
        """The others' count, moved on by what this instance did since it was published.

        Published counts are up to two intervals old; every instance that trusted them alone
        would fill the same gap at once (a herd: N instances, N times the requests).  Each
        instance assumes instead that its peers went above their published means as it went
        above its own: picks made on the same view are alike.  Only rises: finishes are not
        alike (each ends a request started at its own time), and taking this instance's own
        finish for the fleet's made the backend it just left look emptiest, so every client
        went back where it came from and an uneven split (5 on the slow backend, 3 on a fast
        one) held for good.
        """
        others = self.others.get(key, 0.0)
        peers = self.peers
        if peers:
            rise = local - self.baseline.get(key, 0)
            if rise > 0:
                others += peers * rise
        return others

    def take_means(self) -> dict[str, float]:
        """Each backend's mean count since the last call (what this instance publishes).

        A mean over the publish interval, not a sample: a backend answering in 2 ms shows
        its steady load, not whether a request happened to be in flight at that instant.
        """
        # The integral of a count over [start, end] is
        #   count(end) x end - count(start) x start + sum(finish times) - sum(start times)
        # over the events in between: two additions per request, no per-event products.
        end = self.clock()
        start = self.window_start
        span = end - start
        local, at_start, times = self.local, self.counts_at_start, self.times
        means = {}
        if span > 0:
            for key in set(times) | set(local):
                area = local.get(key, 0) * end - at_start.get(key, 0) * start + times.get(key, 0.0)
                if area > 0:
                    means[key] = area / span
        self.window_start = end
        self.times = {}
        self.counts_at_start = dict(local)
        return means

    def total(self) -> float:
        return self.local_total + self.others_total

    def set_others(
        self, others: dict[str, float], peers: int = 0, baseline: dict[str, float] | None = None
    ) -> None:
        self.others = others
        self.others_total = sum(others.values())
        self.baseline = dict(self.local) if baseline is None else baseline
        self.peers = peers

    def track_mean_latency(self) -> None:
        if self.mean_latency is None:
            self.mean_latency = {}

    def forget_mean_latency(self) -> None:
        """Start the plain means afresh (every MEAN_LATENCY_MEMORY seconds).

        A backend that loses near-ties for being slow may get no request at all while the
        load is low, and then no news that it is fast again: unmeasured, it wins the next
        near-tie and its first answer sets its mean.  Forgetting all of them at once, not a
        decay: the bias compares latencies, and a uniform decay would change no comparison.
        """
        if self.mean_latency is not None:
            self.mean_latency = {}

    # Peak EWMA

    def track_latency(self) -> None:
        if self.latency is None:
            self.latency = {}

    def sample(self, key: str, elapsed: float, now: float) -> None:
        latency = self.latency
        assert latency is not None
        old = latency.get(key)
        weight = math.exp((self.sampled_at.get(key, now) - now) / self.decay)
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
