"""When a request may be sent again, and how many retries the whole worker may add.

Retry rules (RFC 9110 §9.2.2, RFC 9112 §9.3.1):
1. A connect failure sent nothing, so any method is retried on another backend.
2. A request already sent is retried only if its method is idempotent, its body copy is
   whole (see replay.py), and no response byte reached the client; and only once.
3. A 502/503/504 answer or a response timeout sends such a request to another backend.
4. Every retry needs a token from the retry budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from redlb.address import Backend


def may_retry(
    sent: bool,
    idempotent: bool,
    replay_whole: bool,
    replayed: bool,
    attempts: int,
    max_attempts: int,
    healthy: Sequence[Backend],
    tried: Sequence[Backend],
    elsewhere: bool,
) -> bool:
    """Rules 1-3 (the budget, rule 4, is asked only after these allow a retry).

    ``elsewhere``: only worth it on another backend (it answered 5xx or timed out);
    otherwise a new connection to the same one may do (the keep-alive race).
    """
    if attempts >= max_attempts or not healthy:
        return False
    if elsewhere and all(backend in tried for backend in healthy):
        return False
    return not sent or (idempotent and replay_whole and not replayed)


class RetryBudget:
    """Retries may add at most a share of the load, so a dead pool gets a fast 503 rather
    than a retry storm (Envoy's retry budget: 20 %, at least 3 concurrent)."""

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
