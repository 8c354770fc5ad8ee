"""The strategy interface: given the healthy snapshot (and a request key), choose one backend.

Rules every strategy keeps:
1. It only ever sees the healthy snapshot (``Pool.healthy``): health, ejection and drain
   were applied before; it never decides health and always gets a non-empty sequence.
2. ``pick`` does no I/O.  Randomness and the clock are injected; shared state (the fleet's
   in-flight counts, the shared counter) is read from objects the store keeps up to date.
3. Anything derived from the snapshot (schedules, tables) is rebuilt when the snapshot
   object changes (``is``), never per request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from redlb.address import Backend


class Strategy(ABC):
    name: ClassVar[str]
    #: True when pick() answers without I/O; otherwise the exchange awaits pick_async().
    immediate: ClassVar[bool] = True
    #: True when picks read the pool's in-flight counts (LoadView): the exchange counts.
    counts: bool = False
    #: True when picks use the other instances' published counts: the store publishes them.
    fleet: bool = False

    @abstractmethod
    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        """Choose from a non-empty sequence, without waiting on anything.

        ``key`` is the request's hash key (only strategies that hash read it).
        """

    async def pick_async(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        return self.pick(candidates, key)


def weights_of(candidates: tuple[Backend, ...]) -> tuple[int, ...]:
    """The snapshot's effective weights, aligned with it; () when they are all equal (or
    ``candidates`` is a plain tuple).  Read once per snapshot (rule 3), not per pick."""
    weights: tuple[int, ...] = getattr(candidates, "weights", ())
    return weights
