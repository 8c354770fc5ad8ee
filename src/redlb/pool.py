"""Membership and status -> the healthy snapshot that strategies pick from.

Checkers push status here (active health, passive ejection, drain); strategies only ever see
``Pool.healthy`` and handle an empty one.  Nothing here does I/O: the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from redlb.address import Backend


@dataclass(frozen=True, slots=True)
class PoolView:
    """What the pool says of each member, for describing changes (marks of non-members omitted)."""

    members: frozenset[Backend] = frozenset()
    down: frozenset[Backend] = frozenset()
    draining: frozenset[Backend] = frozenset()
    ejected: frozenset[Backend] = frozenset()


def describe_changes(before: PoolView, after: PoolView) -> list[str]:
    """One sentence per backend whose membership or status differs, in a stable order."""
    lines: list[str] = []
    for backends, what in (
        (after.members - before.members, "added"),
        (before.members - after.members, "removed"),
        (after.draining - before.draining, "drained"),
        ((before.draining & after.members) - after.draining, "undrained"),
        (after.ejected - before.ejected, "ejected"),
        ((before.ejected & after.members) - after.ejected, "ejection ended"),
        (after.down - before.down, "health down"),
        ((before.down & after.members) - after.down, "health up"),
    ):
        lines.extend(f"backend {b.key} {what}" for b in sorted(backends, key=lambda b: b.key))
    return lines


class Pool:
    def __init__(
        self, max_eject_percent: float = 50.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_eject_percent = max_eject_percent
        self.clock = clock
        self.members: tuple[Backend, ...] = ()
        self.known = False  # True once a pool was read from Redis
        self.down: frozenset[Backend] = frozenset()  # active health: failing
        self.draining: frozenset[Backend] = frozenset()
        self.ejected: dict[Backend, float] = {}  # passive: backend -> until (clock)
        self.healthy: tuple[Backend, ...] = ()
        self.ejections = 0  # by this process, for metrics

    def update(
        self,
        members: Iterable[Backend] | None = None,
        down: Iterable[Backend] | None = None,
        draining: Iterable[Backend] | None = None,
        ejected: dict[Backend, float] | None = None,
    ) -> None:
        """Replace whichever parts are given (ejected: backend -> seconds left), rebuild."""
        if members is not None:
            self.members = tuple(members)
            self.known = True
        if down is not None:
            self.down = frozenset(down)
        if draining is not None:
            self.draining = frozenset(draining)
        if ejected is not None:
            now = self.clock()
            self.ejected = {b: now + left for b, left in ejected.items() if left > 0}
        self.rebuild()

    def view(self) -> PoolView:
        members = frozenset(self.members)
        now = self.clock()
        return PoolView(
            members=members,
            down=self.down & members,
            draining=self.draining & members,
            ejected=frozenset(b for b, until in self.ejected.items() if until > now) & members,
        )

    def eject(self, backend: Backend, seconds: float) -> None:
        self.ejected[backend] = max(self.ejected.get(backend, 0.0), self.clock() + seconds)
        self.rebuild()

    def rebuild(self) -> None:
        now = self.clock()
        self.ejected = {b: until for b, until in self.ejected.items() if until > now}
        members = self.members
        unique = set(members)
        # Never eject more than a share of the pool (Envoy's max_ejection_percent): a wide
        # failure is more likely ours than every backend's.  Longest-ejected stay out first.
        allowed = int(len(unique) * self.max_eject_percent / 100.0)
        if len(unique) >= 2:
            allowed = max(allowed, 1)
        ejected_now = sorted(
            (b for b in self.ejected if b in unique), key=lambda b: (-self.ejected[b], b.key)
        )
        out = set(ejected_now[:allowed]) | self.down | self.draining
        healthy = tuple(b for b in members if b not in out)
        self.healthy = healthy
