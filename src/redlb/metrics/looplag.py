"""How late the worker's event loop runs what is due: the stalls every request waits behind.

One timer, never per request, from the moment the worker accepts (what happens before, no
request waits behind): a task asks to wake every ``INTERVAL`` and records how much later
than asked it woke.  A callback that holds the loop for D seconds is seen as a lag of
at least D - INTERVAL, so every stall the latency percentiles would show is counted.
Cumulative buckets (Prometheus histogram semantics), summed over workers by the exposition.
"""

from __future__ import annotations

import asyncio
import time

INTERVAL = 0.02  # 50 wakeups a second: ~1 ms of CPU a second
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LoopLag:
    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)  # lags <= each bound (cumulative)
        self.count = 0
        self.total = 0.0
        self.max = 0.0  # the largest lag since the last snapshot took it

    def observe(self, lag: float) -> None:
        self.count += 1
        self.total += lag
        if lag > self.max:
            self.max = lag
        for i, bound in enumerate(BUCKETS):
            if lag <= bound:
                self.buckets[i] += 1

    def snapshot(self) -> dict[str, object]:
        """Counts so far and the largest lag since the previous snapshot."""
        largest, self.max = self.max, 0.0
        return {"buckets": list(self.buckets), "count": self.count, "sum": self.total,
                "max": largest}  # fmt: skip

    async def run(self) -> None:
        clock = time.monotonic
        while True:
            due = clock() + INTERVAL
            await asyncio.sleep(INTERVAL)
            self.observe(max(0.0, clock() - due))
