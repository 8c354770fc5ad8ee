"""Consistent hashing's figures: keys moved when a backend leaves, shares, build time.

For every address family below and every N in 2..30, every backend is removed in turn from
the table of N: the share of slots that changes against the 1/N + 1% bound, and whether
exactly the leaver's slots changed.  Then how far each backend's share strays from 1/N
(sampling noise, the price of exact disruption) and the time a build takes (min of 3).

    .venv/bin/python bench/hash_disruption.py            # N = 2..30, five families
    .venv/bin/python bench/hash_disruption.py 12         # N = 2..12
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from redlb.balancer.rendezvous import TABLE_SIZE, build_table

FAMILIES = [
    ("10.0.0.{}:80", 0),
    ("192.168.1.{}:8443", 10),
    ("127.0.0.1:{}", 9000),
    ("backend-{}.internal:8080", 1),
    ("[fd00::{}]:443", 1),
]


def removals(family: str, first: int, largest: int) -> tuple[float, tuple[int, int], int, int]:
    """The worst extra share moved (over 1/N), where, removals over the bound, inexact ones."""
    worst, where, over, inexact = -1.0, (0, 0), 0, 0
    for n in range(2, largest + 1):
        names = [family.format(first + i) for i in range(n)]
        before = build_table(names, [])
        for leaving in range(n):
            reduced = names[:leaving] + names[leaving + 1 :]
            after = build_table(reduced, [])
            moved = sum(1 for a, b in zip(before, after, strict=True) if names[a] != reduced[b])
            inexact += moved != before.count(leaving)
            extra = moved / TABLE_SIZE - 1 / n
            over += extra > 0.01
            if extra > worst:
                worst, where = extra, (n, leaving)
    return worst, where, over, inexact


def main() -> None:
    largest = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    count = sum(range(2, largest + 1))
    print("| family | removals | worst extra over 1/N | at (N, leaver) | over 1/N + 1% | not exactly the leaver's |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for family, first in FAMILIES:
        worst, (n, leaving), over, inexact = removals(family, first, largest)
        print(f"| {family.format('i')} | {count} | {worst * 100:.3f}% | ({n}, {leaving}) | {over} | {inexact} |")  # fmt: skip
    print()
    print("| backends | largest share / (1/N) | smallest | build ms (min of 3) |")
    print("|---|---|---|---|")
    for n in (2, 10, 100, 1000):
        names = [f"10.1.{i // 250}.{i % 250}:80" for i in range(n)]
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            table = build_table(names, [])
            best = min(best, time.perf_counter() - start)
        shares = Counter(table)
        ratios = [shares[i] * n / TABLE_SIZE for i in range(n)]
        print(f"| {n} | {max(ratios):.3f} | {min(ratios):.3f} | {best * 1000:.0f} |")


if __name__ == "__main__":
    main()
