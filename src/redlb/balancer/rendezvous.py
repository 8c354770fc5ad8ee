"""Consistent hashing: a rendezvous lookup table, with Google's bounded loads on top.

Rendezvous (highest random weight) hashing, Thaler and Ravishankar 1998, over a table: each
of M = 65536 slots (key ranges) ranks every backend at random, and goes to the present
backend that ranks it first.  So when a backend leaves, exactly its slots move (each to its
next choice) and no other slot changes; when one joins, it only takes slots; a weight raised
only takes slots, a weight lowered only gives.  The share that moves when one of N leaves is
its own: 1/N within sampling noise (sd = sqrt((1/N)(1 - 1/N) / M) <= 0.2%), which holds the
bound "<= 1/N + 1% of keys move" five standard deviations clear for every membership.

Maglev (Eisenbud et al., NSDI 2016), which this module used first, balances its table
exactly, but a departure reshuffles other slots too: with backends 10.0.0.0-7:80, removing
one moved 1/8 + 1.65% of the keys.  The price of exact disruption is sampling noise in the
shares: +-1% of a backend's weighted share at 2 backends, +-4% at 100, +-25% at 1,000 (M / N
slots each).  Bounded loads, on by default, cap what that costs in load.

The ranks, cheaply: every backend draws slots at random from its own stream (SHAKE-128 of
its name and a counter, so every instance, machine and Python version draws the same), w
draws per unit of time for weight w.  A slot ranks the backends by when each first draws it;
merging the present backends' draws in time order (ties by a hash of the name, never by
pool order) and giving each slot to its first drawer builds the table.  That takes about
M (ln M + 1) draws whatever N (the coupon collector's), every step of which runs in C:
hashed bytes read as 16-bit slots, the streams interleaved by slice assignment, the draws
written into the table last to first so that each slot keeps its first.  Weights whose unit
of time holds more draws than a block (1,000 backends weighted 999 and 1000, or any weights
during a slow-start ramp) are merged by windows of time instead, sorted by a C sort: the
same table, at a cost that no longer grows with the weights' sum.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018): with ``balance`` = epsilon > 0, no
backend takes a request while it has ceil((1 + epsilon) x (in flight + 1) / N) in flight
(with weights, its share: x weight / the sum of weights, not N), counting the whole fleet's
requests (balancer/load.py).  The bound starts once the fleet has
at least one request in flight per backend: below that nothing is overloaded, and the other
instances' counts (up to 50 ms old) would only scatter keys for nothing.  A key whose
backend is full probes further slots (rehashes of its key, so the spill is consistent
too), then falls to the least loaded backend.  A hot key spreads instead of sinking one
backend.
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from hashlib import blake2b, shake_128
from math import ceil, gcd, log

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView

PROBES = 16
HASH_CACHE = 4096  # recent keys' routes kept
_MASK = (1 << 64) - 1


def key_hash(key: bytes) -> int:
    """A stable 64-bit hash (Python's hash() differs between processes)."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "little")


def rehash(value: int, attempt: int) -> int:
    """The attempt-th probe after ``value`` (splitmix64's finaliser)."""
    z = (value + attempt * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


# The table size: fixed, since a size that followed the membership would remap every key on
# each change; >= 62,500 for the disruption bound (its sd <= 0.2%), and 2**16 so that slots
# are the random bytes' own 16-bit words (no arithmetic per draw).
TABLE_SIZE = 1 << 16
# Draws per block: the table fills in about TABLE_SIZE x (ln TABLE_SIZE + 1) = 790,000.
BLOCK = 1 << 16
CHUNK_BYTES = 4096  # a stream's bytes are hashed in chunks of this size


class SlotStream:
    """One backend's draws: 16-bit little-endian words of SHAKE-128 over its name and a chunk
    counter, the same on every machine and however the draws are taken."""

    __slots__ = ("chunks", "name", "pending")

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.chunks = 0
        self.pending = b""

    def take(self, count: int) -> array[int]:
        """The next ``count`` slots."""
        size = 2 * count
        parts = [self.pending]
        have = len(self.pending)
        while have < size:
            counter = self.chunks.to_bytes(8, "little")
            parts.append(shake_128(self.name + counter).digest(CHUNK_BYTES))
            self.chunks += 1
            have += CHUNK_BYTES
        data = b"".join(parts)
        self.pending = data[size:]
        drawn = array("H", data[:size])
        if sys.byteorder == "big":
            drawn.byteswap()
        return drawn


def _tiebreak(name: str) -> bytes:
    return blake2b(name.encode(), digest_size=8, person=b"tie").digest()


def build_table(
    names: Sequence[str], weights: Sequence[int], by_window: bool | None = None
) -> array[int]:
    """Slot -> index into names: each slot's first drawer among ``names`` (module doc).
    Two bytes a slot (a list would take eight): 128 KB per hashing pool.

    ``by_window`` chooses how the draws are merged (None: units of time while a unit's
    draws fit in a block, windows of time past that); both give the same table."""
    n = len(names)
    typecode = "H" if n <= 1 << 16 else "I"
    if n == 1:
        return array(typecode, bytes(TABLE_SIZE * array(typecode).itemsize))
    sizes = list(weights) if weights else [1] * n
    common = gcd(*sizes)  # time's unit is arbitrary: the order of the draws stays
    sizes = [w // common for w in sizes]
    ties = [_tiebreak(name) for name in names]
    if by_window is None:
        by_window = sum(sizes) > BLOCK
    blocks = _window_blocks(names, sizes, ties) if by_window else _unit_blocks(names, sizes, ties)
    # The blocks that usually fill the table, applied last to first: the last write to a
    # slot is its first draw.
    expected = [next(blocks)]
    draws = len(expected[0][1])
    expected += [next(blocks) for _ in range(ceil(TABLE_SIZE * (log(TABLE_SIZE) + 1) / draws) - 1)]
    table = [-1] * TABLE_SIZE
    claim = table.__setitem__
    for slots, owners in reversed(expected):
        deque(map(claim, reversed(slots), reversed(owners)), maxlen=0)
    while -1 in table:  # the last few slots, from later blocks
        later = [-1] * TABLE_SIZE
        slots, owners = next(blocks)
        deque(map(later.__setitem__, reversed(slots), reversed(owners)), maxlen=0)
        for slot, owner in enumerate(table):
            if owner < 0:
                table[slot] = later[slot]
    return array(typecode, table)


def _unit_blocks(
    names: Sequence[str], sizes: list[int], ties: list[bytes]
) -> Iterator[tuple[array[int], list[int]]]:
    """Blocks of whole units of time: every stream's draws in time order, with their owners.

    One unit of time: backend i's draws at j / w_i (j < w_i), in time order, ties by a hash
    of the name.  Floats order these exactly: two different fractions with denominators
    <= MAX_WEIGHT differ far above a double's rounding, and equal ones round alike."""
    n = len(names)
    schedule = sorted((j / w, ties[i], i, j) for i, w in enumerate(sizes) for j in range(w))
    units = max(1, BLOCK // len(schedule))  # of time per block
    streams = [SlotStream(name) for name in names]
    owners = [i for _, _, i, _ in schedule] * units
    place = [[0] * w for w in sizes]  # backend i's j-th draw of a unit: its place in the unit
    for p, (_, _, i, j) in enumerate(schedule):
        place[i][j] = p
    width = len(schedule)
    while True:
        block = array("H", bytes(2 * len(owners)))
        for stream, i, w in zip(streams, range(n), sizes, strict=True):
            drawn = stream.take(units * w)
            for j in range(w):  # its j-th draw of each unit goes to its place in the schedule
                block[place[i][j] :: width] = drawn[j::w]
        yield block, owners


def _window_blocks(
    names: Sequence[str], sizes: list[int], ties: list[bytes]
) -> Iterator[tuple[array[int], list[int]]]:
    """Blocks of about BLOCK draws each, for weights whose unit of time holds more than a
    block (a schedule of one entry per draw of a unit would cost seconds and hundreds of
    MB): window m holds the draws at times in [(m - 1) B / W, m B / W), W the sum of the
    weights, sorted by time (backend i's k-th draw at k / w_i), ties by the name's hash.
    The times stay below ~13 units: floats order them exactly, as in a unit."""
    total = sum(sizes)
    by_tie = sorted(range(len(names)), key=lambda i: (ties[i], i))
    streams = [SlotStream(names[i]) for i in by_tie]
    taken = [0] * len(names)
    window = 0
    while True:
        window += 1
        slots = array("H")
        times: list[float] = []
        owners: list[int] = []
        for position, i in enumerate(by_tie):
            w = sizes[i]
            low, high = taken[position], -(-(window * BLOCK * w) // total)  # draws before
            if high > low:
                slots.extend(streams[position].take(high - low))
                times.extend([k / w for k in range(low, high)])
                owners.extend([i] * (high - low))
                taken[position] = high
        order = sorted(range(len(times)), key=times.__getitem__)  # stable: ties keep by_tie
        yield array("H", map(slots.__getitem__, order)), list(map(owners.__getitem__, order))


class RendezvousHash(Strategy):
    name = "hash"

    def __init__(self, load: LoadView, balance: float = 0.25) -> None:
        self.load = load
        self.balance = balance
        self.permille = 1000 + round(balance * 1000)  # 1 + epsilon, in integers: exact caps
        self.counts = self.fleet = balance > 0
        self.seen: tuple[Backend, ...] | None = None
        self.table: array[int] = array("H")
        self.size = 1
        self.keys: tuple[str, ...] = ()
        # Each entry's backend's weight, all its entries' together ((): all equal), and the
        # entries' sum: a bound is on a backend's weighted share.
        self.weights: tuple[int, ...] = ()
        self.weight_sum = 1
        # Recent keys' routes (clients repeat their address, cookie or header), for this
        # table: the key's own slot's backend, then once it had to spill, every further
        # backend its probes reach, in probe order (one already full is full again).
        self.routes: dict[bytes, tuple[int, ...]] = {}

    def _rebuild(self, candidates: tuple[Backend, ...]) -> None:
        self.size = TABLE_SIZE
        copies: dict[str, int] = {}
        names = []
        for backend in candidates:  # a duplicated entry is one more share, its own stream
            copy = copies[backend.key] = copies.get(backend.key, 0) + 1
            names.append(backend.key if copy == 1 else f"{backend.key}#{copy}")
        entries = weights_of(candidates)
        self.table = build_table(names, entries)
        each = entries or (1,) * len(candidates)
        self.weight_sum = sum(each)
        self.weights = entries
        if len(copies) < len(candidates):
            # The load is counted per backend, all its entries' keys together: so is its cap.
            shares: dict[str, int] = {}
            for backend, weight in zip(candidates, each, strict=True):
                shares[backend.key] = shares.get(backend.key, 0) + weight
            self.weights = tuple(shares[backend.key] for backend in candidates)
        self.keys = tuple(backend.key for backend in candidates)
        self.routes = {}
        self.seen = candidates

    def _route(self, key: bytes, spilled: bool) -> tuple[int, ...]:
        """The key's home backend (index), and if ``spilled`` where its probes go next."""
        routes = self.routes
        if len(routes) >= HASH_CACHE:
            routes.clear()
        table, size = self.table, self.size
        h = key_hash(key)
        route = [table[h % size]]
        if spilled:
            every = len(self.keys)  # each has slots: once all are in, no probe adds one
            for attempt in range(1, PROBES + 1):
                index = table[rehash(h, attempt) % size]
                if index not in route:
                    route.append(index)
                    if len(route) == every:
                        break
        routes[key] = tuple(route)
        return routes[key]

    def pick(self, candidates: tuple[Backend, ...], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self._rebuild(candidates)
        route = self.routes.get(key) or self._route(key, False)
        n = len(candidates)
        if self.balance <= 0 or n == 1:
            return candidates[route[0]]
        # Bounded load, with LoadView.outstanding inlined (the hot path).
        load = self.load
        total = load.local_total + load.others_total + 1  # this request counted
        if total <= n:
            return candidates[route[0]]  # under one request per backend: none overloaded
        cap = -(-(self.permille * total) // (1000 * n))  # ceil((1 + eps) x total / n)
        # With weights, each backend's own: ceil((1 + eps) x total x weight / sum of weights).
        weights = self.weights
        if weights:
            share = self.permille * total
            whole = 1000 * self.weight_sum
        local, others, peers, keys = load.local, load.others, load.peers, self.keys
        spilled = len(route) > 1
        while True:
            for index in route:
                if weights:
                    cap = -(-(share * weights[index]) // whole)
                name = keys[index]
                mine = local.get(name, 0)
                cost = mine + others.get(name, 0.0) if others else mine
                if peers:  # the others moved on as this instance did (LoadView.others_now)
                    rise = mine - load.baseline.get(name, 0)
                    if rise > 0:
                        cost += peers * rise
                if cost < cap:
                    return candidates[index]
            if spilled:
                break
            spilled = True  # its home is full, for the first time with this table
            route = self._route(key, True)
        if weights:
            return candidates[
                min(range(n), key=lambda i: load.outstanding(candidates[i]) / weights[i])
            ]
        return min(candidates, key=load.outstanding)
