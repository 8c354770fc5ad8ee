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
from collections.abc import Sequence
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
    def pick(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        """Choose from a non-empty sequence, without waiting on anything.

        ``key`` is the request's hash key (only strategies that hash read it).
        """

    async def pick_async(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        return self.pick(candidates, key)


class Snapshot(tuple[Backend, ...]):
    """The healthy backends in pool order, with each one's effective weight.

    A tuple, so the data path indexes it as before; ``weights`` is aligned with it and empty
    when every weight is equal (the common case, and the fast path of every strategy).
    """

    weights: tuple[int, ...] = ()

    @classmethod
    def of(cls, backends: Sequence[Backend], weights: Sequence[int] = ()) -> Snapshot:
        snapshot = cls(backends)
        if weights and len(set(weights)) > 1:
            snapshot.weights = tuple(weights)
        return snapshot


def weights_of(candidates: Sequence[Backend]) -> tuple[int, ...]:
    """The snapshot's effective weights, aligned with it; () when they are all equal."""
    return getattr(candidates, "weights", ())
