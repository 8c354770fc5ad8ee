"""Consistent hashing: Maglev's lookup table, with Google's bounded loads on top.

Maglev (Eisenbud et al., NSDI 2016): every backend has its own permutation of the M table
slots (from hashes of its name, so every instance builds the same table); backends take
turns claiming their next free slot (more turns for more weight) until the table is full.
A request's key hashes to one slot.  When a backend leaves, its slots go to others and
few other slots change: about 1/N of the keys move, which the property tests hold to
<= 1/N + 1%.  M = 65537 slots: shares within 1% of the weights up to 512 backends.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018): with ``balance`` = epsilon > 0, no
backend takes a request while it has ceil((1 + epsilon) x (in flight + 1) / N) in flight,
counting the whole fleet's requests (balancer/load.py).  The bound starts once the fleet has
at least one request in flight per backend: below that nothing is overloaded, and the other
instances' counts (up to 50 ms old) would only scatter keys for nothing.  A key whose
backend is full probes further slots (rehashes of its key, so the spill is consistent
too), then falls to the least loaded backend.  A hot key spreads instead of sinking one
backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b

from redlb.address import Backend
from redlb.balancer.base import Strategy, weights_of
from redlb.balancer.load import LoadView

PROBES = 16
HASH_CACHE = 4096  # recent keys' hashes: clients repeat their address, cookie or header
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
    heaviest = max(weights) if weights else 1
    shares = [w / heaviest for w in weights] if weights else [1.0] * n
    credit = [0.0] * n
    nexts = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            credit[i] += shares[i]
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
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


class MaglevHash(Strategy):
    name = "hash"

    def __init__(self, load: LoadView, balance: float = 0.25) -> None:
        self.load = load
        self.balance = balance
        self.permille = 1000 + round(balance * 1000)  # 1 + epsilon, in integers: exact caps
        self.counts = self.fleet = balance > 0
        self.seen: Sequence[Backend] | None = None
        self.table: list[int] = []
        self.size = 1
        self.hashes: dict[bytes, int] = {}

    def _rebuild(self, candidates: Sequence[Backend]) -> None:
        self.size = TABLE_SIZE
        copies: dict[str, int] = {}
        names = []
        for backend in candidates:  # a duplicated entry is one more share, its own permutation
            copy = copies[backend.key] = copies.get(backend.key, 0) + 1
            names.append(backend.key if copy == 1 else f"{backend.key}#{copy}")
        self.table = build_table(names, weights_of(candidates), self.size)
        self.seen = candidates

    def pick(self, candidates: Sequence[Backend], key: bytes = b"") -> Backend:
        if candidates is not self.seen:
            self._rebuild(candidates)
        hashes = self.hashes
        h = hashes.get(key)
        if h is None:
            if len(hashes) >= HASH_CACHE:
                hashes.clear()
            h = hashes[key] = key_hash(key)
        backend = candidates[self.table[h % self.size]]
        if self.balance <= 0 or len(candidates) == 1:
            return backend
        load = self.load
        n = len(candidates)
        total = load.total() + 1  # this request counted
        if total <= n:
            return backend  # under one request per backend on average, nothing is overloaded
        cap = -(-(self.permille * total) // (1000 * n))  # ceil((1 + eps) x total / n)
        if load.outstanding(backend) < cap:
            return backend
        for attempt in range(1, PROBES + 1):
            backend = candidates[self.table[rehash(h, attempt) % self.size]]
            if load.outstanding(backend) < cap:
                return backend
        return min(candidates, key=load.outstanding)
