"""The healthy snapshot strategies pick from: the backends in pool order, with their weights.

A tuple subclass, so the data path and the compiled strategies index it as a plain tuple
(mypyc reads a ``tuple[Backend, ...]`` item in C); ``weights`` rides along.  Not compiled
(build.py): mypyc cannot compile a subclass of tuple, and nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Sequence

from redlb.address import Backend


class Snapshot(tuple[Backend, ...]):
    """The healthy backends in pool order, with each one's effective weight.

    ``weights`` is aligned with the backends and empty when every weight is equal (the
    common case, and the fast path of every strategy).
    """

    weights: tuple[int, ...] = ()

    @classmethod
    def of(cls, backends: Sequence[Backend], weights: Sequence[int] = ()) -> Snapshot:
        snapshot = cls(backends)
        if weights and len(set(weights)) > 1:
            snapshot.weights = tuple(weights)
        return snapshot
