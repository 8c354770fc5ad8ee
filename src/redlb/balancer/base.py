"""The strategy interface: given the healthy snapshot, choose one backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from redlb.address import Backend


class Strategy(ABC):
    name: ClassVar[str]
    #: True when pick() answers without I/O; otherwise the exchange awaits pick_async().
    immediate: ClassVar[bool] = True

    @abstractmethod
    def pick(self, candidates: Sequence[Backend]) -> Backend:
        """Choose from a non-empty sequence, without waiting on anything."""

    async def pick_async(self, candidates: Sequence[Backend]) -> Backend:
        return self.pick(candidates)
