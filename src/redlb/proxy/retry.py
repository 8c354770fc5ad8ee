"""The retry budget: retries may add at most a share of the load, so a dead pool gets a fast
503 rather than a retry storm (Envoy's retry budget: 20 %, at least 3 concurrent)."""

from __future__ import annotations


class RetryBudget:
    __slots__ = ("active_requests", "active_retries", "min_concurrency", "percent")

    def __init__(self, percent: float = 20.0, min_concurrency: int = 3) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0

    def try_acquire(self) -> bool:
        allowed = max(self.min_concurrency, self.active_requests * self.percent / 100.0)
        if self.active_retries >= allowed:
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1
