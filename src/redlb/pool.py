"""Membership and status -> the healthy snapshot that strategies pick from.

Checkers push status here (active health, passive ejection, drain); strategies only ever see
``Pool.healthy`` and handle an empty one.  Nothing here does I/O: the clock is injected.

Weights (``redlb:{P}:weights``) and slow start ride on the snapshot (``Snapshot.weights``).
Slow start: a backend that joins or comes back ramps from 10% to its full weight over
``slow_start`` seconds, in tenths, from the moment the fleet first saw it healthy (kept in
``redlb:{P}:up-since`` by the store; this pool reports the joins and leaves it observed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from redlb.address import Backend
from redlb.balancer.snapshot import Snapshot

RAMP_STEPS = 10  # slow start ramps in tenths of the weight: few snapshot rebuilds


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
        self,
        max_eject_percent: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_eject_percent = max_eject_percent
        self.clock = clock
        self.wall = wall  # slow start is timed across machines: wall clock
        self.members: tuple[Backend, ...] = ()
        self.known = False  # True once a pool was read from Redis
        self.down: frozenset[Backend] = frozenset()  # active health: failing
        self.draining: frozenset[Backend] = frozenset()
        self.ejected: dict[Backend, float] = {}  # passive: backend -> until (clock)
        self.healthy: Snapshot = Snapshot()
        self.weights: dict[Backend, int] = {}  # absent: 1
        self.slow_start = 0.0
        self.up_since: dict[Backend, float] = {}  # wall-clock time each one became healthy
        self.ramping = False  # some backend is still ramping: rebuild as time passes
        # Transitions this pool saw since the store last took them (for redlb:{P}:up-since).
        self.joined: set[Backend] = set()
        self.left: set[Backend] = set()
        self.ejections = 0  # by this process, for metrics

    def update(
        self,
        members: Iterable[Backend] | None = None,
        down: Iterable[Backend] | None = None,
        draining: Iterable[Backend] | None = None,
        ejected: dict[Backend, float] | None = None,
        weights: dict[Backend, int] | None = None,
        up_since: dict[Backend, float] | None = None,
    ) -> None:
        """Replace whichever parts are given (ejected: backend -> seconds left), rebuild."""
        if weights is not None:
            self.weights = weights
        if up_since is not None:
            # The fleet's times, read before this pool's latest joins were written there:
            # those keep the time this pool saw them (else they ramp from full weight).
            pending = {b: self.up_since[b] for b in self.joined if b in self.up_since}
            self.up_since = {**up_since, **pending}
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
        weights = self._weights(healthy)
        old = self.healthy
        if healthy == old and weights == old.weights:
            return  # same snapshot: strategies keep what they built from it
        if self.slow_start > 0 and self.known and old:
            # What this instance saw change (not its own start-up, when everything is new).
            now_in, was_in = set(healthy), set(old)
            for backend in now_in - was_in:
                self.joined.add(backend)
                self.left.discard(backend)
                self.up_since[backend] = self.wall()
            for backend in was_in - now_in:
                self.left.add(backend)
                self.joined.discard(backend)
                self.up_since.pop(backend, None)
            weights = self._weights(healthy)
        self.healthy = Snapshot.of(healthy, weights)

    def _weights(self, healthy: tuple[Backend, ...]) -> tuple[int, ...]:
        """Effective weights, aligned with healthy; () when none is set and none ramps."""
        configured = self.weights
        ramp = self.slow_start
        self.ramping = False
        if not configured and not (ramp > 0 and self.up_since):
            return ()
        if ramp <= 0 or not self.up_since:
            return tuple(configured.get(b, 1) for b in healthy)
        now = self.wall()
        weights = []
        for backend in healthy:
            weight = configured.get(backend, 1) * RAMP_STEPS
            since = self.up_since.get(backend)
            if since is not None and now - since < ramp:
                self.ramping = True
                step = max(1, min(RAMP_STEPS, 1 + int(RAMP_STEPS * (now - since) / ramp)))
                weight = weight * step // RAMP_STEPS or 1
            weights.append(weight)
        return tuple(weights)
