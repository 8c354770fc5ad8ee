"""Consistent hashing: Maglev's lookup table, with Google's bounded loads on top.

Maglev (Eisenbud et al., NSDI 2016): every backend has its own permutation of the M table
slots (from hashes of its name, so every instance builds the same table); backends take
turns claiming their next free slot (more turns for more weight) until the table is full.
A request's key hashes to one slot.  When a backend leaves, its slots go to others and
few other slots change: about 1/N of the keys move, which the property tests hold to
<= 1/N + 1%.  M = 65537 slots: shares within 1% of the weights up to 512 backends.

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

from collections.abc import Sequence
from hashlib import blake2b
from heapq import heapify, heapreplace

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


# The table size (a prime): fixed, since a size that followed the membership would remap
# every key on each change.  128 slots per backend up to 512 backends (shares within 1%);
# a build takes a few tens of ms, once per snapshot change.
TABLE_SIZE = 65537


def build_table(names: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Slot -> index into names; each name's share of slots follows its weight."""
    n = len(names)
    offsets = []
    skips = []
    for name in names:
        raw = name.encode()
        offsets.append(int.from_bytes(blake2b(raw, digest_size=8, person=b"offset").digest(),
                                      "little") % size)  # fmt: skip
        skips.append(int.from_bytes(blake2b(raw, digest_size=8, person=b"skip").digest(),
                                    "little") % (size - 1) + 1)  # fmt: skip
    # Backends take turns by weight: backend i's k-th turn comes in round ceil(k x heaviest /
    # weight), ties in pool order (so equal weights take turns in order, round by round).  A
    # heap of next turns hands them out in O(log n) each: stepping every backend through
    # every round cost rounds x n, seconds for one weight of 1000 among 1,000 of weight 1.
    sizes = list(weights) if weights else [1] * n
    heaviest = max(sizes)
    turns = [(-(-heaviest // w), i, 1) for i, w in enumerate(sizes)]
    heapify(turns)
    nexts = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        _, i, turn = turns[0]
        offset, skip, j = offsets[i], skips[i], nexts[i]
        slot = (offset + j * skip) % size
        while table[slot] >= 0:
            j += 1
            slot = (offset + j * skip) % size
        table[slot] = i
        nexts[i] = j + 1
        filled += 1
        if filled == size:
            return table
        turn += 1
        heapreplace(turns, (-(-turn * heaviest // sizes[i]), i, turn))


class MaglevHash(Strategy):
    name = "hash"

    def __init__(self, load: LoadView, balance: float = 0.25) -> None:
        self.load = load
        self.balance = balance
        self.permille = 1000 + round(balance * 1000)  # 1 + epsilon, in integers: exact caps
        self.counts = self.fleet = balance > 0
        self.seen: tuple[Backend, ...] | None = None
        self.table: list[int] = []
        self.size = 1
        self.keys: tuple[str, ...] = ()
        # Each entry's weight ((): all equal) and their sum: a bound is on a weighted share.
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
        for backend in candidates:  # a duplicated entry is one more share, its own permutation
            copy = copies[backend.key] = copies.get(backend.key, 0) + 1
            names.append(backend.key if copy == 1 else f"{backend.key}#{copy}")
        self.weights = weights_of(candidates)
        self.weight_sum = sum(self.weights) or 1
        self.table = build_table(names, self.weights, self.size)
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
