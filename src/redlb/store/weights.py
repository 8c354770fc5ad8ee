"""Backend weights (``redlb:{P}:weights``) and slow-start times (``redlb:{P}:up-since``).

Weights are a hash next to the list, owned by the user: field = backend (any spelling the
list accepts), value = an integer 1..1000.  A bad field or value is skipped with one
warning and that backend keeps weight 1.  The list stays the membership: a weight for a
backend not in the list does nothing.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.client import Pipeline

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.pool import Pool
from redlb.store.keys import Keys

MAX_WEIGHT = 1000


def parse_weight(text: str) -> int:
    weight = int(text)
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"a weight is an integer within 1..{MAX_WEIGHT}")
    return weight


def parse_weights(raw: Any) -> tuple[dict[Backend, int], list[str]]:
    """The weights that parse, and one problem sentence for each field that does not."""
    weights: dict[Backend, int] = {}
    problems: list[str] = []
    for field, value in raw.items():
        try:
            backend = parse_backend(field)
            weights[backend] = parse_weight(value.decode("ascii", "replace"))
        except (InvalidAddress, ValueError) as exc:
            shown = field[:80].decode("utf-8", "backslashreplace")
            problems.append(f"weight of {shown!r} ({value[:20]!r}): {exc}")
    return weights, problems


def queue_up_since(pipe: Pipeline, keys: Keys, pool: Pool) -> int:
    """Record the joins and leaves this pool saw (first writer wins), then read them all.

    Returns how many commands were queued; the last one's reply is the whole hash.
    """
    for backend in pool.joined:
        pipe.hsetnx(keys.up_since, backend.key, f"{pool.up_since.get(backend, pool.wall()):.3f}")
    if pool.left:
        pipe.hdel(keys.up_since, *[b.key for b in pool.left])
    queued = len(pool.joined) + (1 if pool.left else 0) + 1
    pool.joined, pool.left = set(), set()
    pipe.hgetall(keys.up_since)
    return queued


def parse_up_since(raw: Any) -> dict[Backend, float]:
    since: dict[Backend, float] = {}
    if isinstance(raw, dict):
        for field, value in raw.items():
            try:
                since[parse_backend(field)] = float(value)
            except (InvalidAddress, ValueError):
                continue
    return since
