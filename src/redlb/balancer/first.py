"""First available (HAProxy ``balance first``): fill backends in pool order up to their cap.

The first backend with fewer requests in flight (from this instance) than the pool's
``max_conns`` takes the request; the others stay idle and can be scaled down or kept warm.
When every backend is at its cap, the first one is chosen and the request waits in its
line (the connection cap's bounded queue).  Without a cap (``max_conns=0``) everything goes
to the first backend: set one.
"""

from __future__ import annotations

from redlb.address import Backend
from redlb.balancer.base import Strategy
from redlb.balancer.load import LoadView


class FirstAvailable(Strategy):
    name = "first"
    counts = True

    def __init__(self, load: LoadView, cap: int) -> None:
        self.load = load
        self.cap = cap

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        cap = self.cap
        if cap > 0:
            local = self.load.local
            for backend in candidates:
                if local.get(backend.key, 0) < cap:
                    return backend
        return candidates[0]
