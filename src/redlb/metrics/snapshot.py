"""A worker's metrics as one JSON document, and the instance's view summed over its workers.

Every worker writes its snapshot to the instance's directory (one file per process, replaced
atomically) once a second and right before it answers a scrape; a scrape reads every file and
sums them.  The answering worker refreshes its own file first, so each worker's share only
ever grows between two scrapes, whichever worker answers: counters never go backwards.

A worker that died leaves its file behind: its counters stay in the sum (as in
prometheus_client's multiprocess mode) while its gauges (in flight, memory) drop out.  The
supervisor folds a dead worker's file into ``retired.json`` (one sum of every dead worker),
so that a crash-looping worker does not add one more file to every scrape each restart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from redlb.metrics.recorder import RequestKey, UpstreamKey
from redlb.slices import slices

if TYPE_CHECKING:
    from redlb.metrics.looplag import LoopLag
    from redlb.pool import Pool
    from redlb.proxy.context import ProxyContext
    from redlb.store.link import RedisLink

# Plain counters of ProxyContext.stats, exported under these names (with _total).
STATS_COUNTERS = {
    "rejected": "redlb_rejected_requests",
    "proxy_errors": "redlb_proxy_errors",
    "retries": "redlb_retries",
    "retries_refused": "redlb_retries_refused",
    "upstream_connects": "redlb_upstream_connects",
    "upstream_reuses": "redlb_upstream_reuses",
    "upstream_tls_failures": "redlb_upstream_tls_failures",
    "client_connections": "redlb_client_connections",
    "tls_handshake_failures": "redlb_tls_handshake_failures",
    "tunnels": "redlb_tunnels",
}
POOL_STATES = ("healthy", "down", "ejected", "draining")
RETIRED = "retired.json"
# The pids a retired sum holds: a reader that listed a pid's file before it was folded must
# not count it twice.  Only the last few can still be listed by a scrape in progress.
ABSORBED_KEPT = 64
# The fields every reader relies on, and their types.
_SHAPE = (("requests", list), ("connect", list), ("counters", dict), ("gauges", dict),
          ("pools", list))  # fmt: skip


# A snapshot is encoded a slice at a time, the event loop free in between (take_in_steps):
# a thousand pools, or a few hundred request series of 36 floats each, encoded in one go
# held the loop for milliseconds every second, the tail latency every request waits behind.
# Sized for a loaded worker, whose caches the requests keep cold: 100 pools took 0.16 ms a
# slice there (bench/loop_turns.py), and every slice delays the ~50 requests in flight.
POOL_SLICE = 25
SERIES_SLICE = 100  # series looked at a turn: one unchanged since the last snapshot is a lookup
# Series encoded a turn: 36 floats each, ~7 us hot (50 held a loaded worker's loop 0.4 ms).
ENCODE_SLICE = 10
# Listing /proc/self/fd costs ~0.5-1.5 us a descriptor, in system calls of a thousand that
# cannot be sliced (20,000 descriptors: 10-30 ms with the loop held): counted at most this
# often; the gauge is that old at most.
FDS_MAX_AGE = 10.0


def take(
    ctx: ProxyContext,
    link: RedisLink,
    worker: int,
    redis_latency: float,
    lag: LoopLag | None = None,
) -> str:
    """Everything one worker knows, as one JSON document (in one go: a scrape's answer)."""
    for text in take_in_steps(ctx, link, worker, redis_latency, lag):
        if text is not None:
            return text
    raise AssertionError("take_in_steps ended without the document")


def take_in_steps(
    ctx: ProxyContext,
    link: RedisLink,
    worker: int,
    redis_latency: float,
    lag: LoopLag | None = None,
) -> Iterator[str | None]:
    """The snapshot as JSON, a slice of pools or request series per step: ``None`` after
    each slice (the caller lets the loop run), the document last.  Counters only grow, so
    series encoded a few steps later are never below the ones encoded before: a file's
    share never goes backwards.  The pools are those of the table when it began."""
    rec = ctx.recorder
    stats = ctx.stats
    pools = ctx.pools  # replaced by a new table, never edited: this one is walked whole
    ejections = 0
    pool_parts: list[str] = []
    for chunk in slices(pools, POOL_SLICE):
        rows = []
        for name, state in chunk:
            ejections += state.pool.ejections
            rows.append(f"{_pool_counts(name, state.pool)}{int(state.budget.active_requests)}]")
        pool_parts.append(",".join(rows))
        yield None
    if len(_counted) > 2 * len(pools) + 100:  # pools gone from the table
        for name in [n for n in _counted if n not in pools]:
            del _counted[name]
    request_rows: list[str] = []
    yield from _encode_rows(rec.requests, _request_labels, _encoded_requests, request_rows)
    connect_rows: list[str] = []
    yield from _encode_rows(rec.connect, _connect_labels, _encoded_connects, connect_rows)
    fds = _open_fds(time.monotonic())
    yield None
    rss = _rss()
    counters = {name: getattr(stats, name) for name in STATS_COUNTERS}
    counters["ejections"] = ejections
    counters["redis_reconnects"] = link.reconnects
    counters["log_dropped"] = ctx.access_log.dropped
    counters["tunnel_bytes_to_client"] = stats.tunnel_bytes_to_client
    counters["tunnel_bytes_from_client"] = stats.tunnel_bytes_from_client
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counters["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    rest = {
        "pid": os.getpid(),
        "worker": worker,
        "time": time.time(),
        "counters": counters,
        "gauges": {
            "active_requests": ctx.active_exchanges,
            "open_connections": len(ctx.clients),
            "open_tunnels": ctx.open_tunnels,
            "redis_up": int(link.up),
            "redis_latency_seconds": redis_latency,
            "resident_memory_bytes": rss,
            "open_fds": fds,
        },
        "loop_lag": lag.snapshot() if lag is not None else None,
    }
    # One copy of the series into the document (a chain of + copied them at each step).
    parts = [_dumps(rest)[:-1], ',"connect":[', ",".join(connect_rows), '],"requests":[']
    parts += [",".join(request_rows), '],"pools":[', ",".join(p for p in pool_parts if p), "]}"]
    yield None
    yield "".join(parts)


def _encode_rows(
    table: Mapping[K, list[float]],
    labels: Callable[[K], list[object]],
    cache: dict[K, tuple[float, str]],
    out: list[str],
) -> Iterator[None]:
    """Append each series of ``table`` as a JSON row, its labels then its values, to
    ``out``; None between slices.  A series is encoded again only when its count (the
    first value) moved: every value of a series moves with its count (Recorder.count,
    Recorder.upstream), so an idle route's series costs a lookup, not 36 floats encoded
    again every second."""
    if len(cache) > 2 * len(table) + 100:  # another recorder's series
        cache.clear()
    encoded = 0
    for chunk in slices(table, SERIES_SLICE):
        for key, series in chunk:
            known = cache.get(key)
            if known is not None and known[0] == series[0]:
                out.append(known[1])
                continue
            text = _dumps([*labels(key), series])
            cache[key] = (series[0], text)
            out.append(text)
            encoded += 1
            if encoded % ENCODE_SLICE == 0:
                yield None
        yield None


def _request_labels(key: RequestKey) -> list[object]:
    return [key[0].decode("latin-1"), key[1], key[2], key[3].decode("latin-1"), key[4]]


def _connect_labels(key: UpstreamKey) -> list[object]:
    return [key[0], key[1]]


_encoded_requests: dict[RequestKey, tuple[float, str]] = {}
_encoded_connects: dict[UpstreamKey, tuple[float, str]] = {}

# One encoder, not one a call (json.dumps with separators makes one each time: a row a call).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _dumps(value: object) -> str:
    return _encode(value)


K = TypeVar("K")

# Per pool: the objects its counts were made from, and the counts as JSON.  A pool's state
# is replaced, never edited in place (Pool.update / rebuild), so the same objects mean the
# same counts: a thousand idle pools cost a thousand identity checks, not set algebra and
# encoding.
_counted: dict[str, tuple[tuple[object, ...], str]] = {}


def _pool_counts(name: str, pool: Pool) -> str:
    """``[name, members, healthy, down, ejected, draining,`` of one pool, as JSON (the row
    is ended by the requests in flight, which change more often)."""
    basis = (pool.members, pool.healthy, pool.down, pool.draining, pool.ejected)
    known = _counted.get(name)
    if known is not None:
        was = known[0]
        if (was[0] is basis[0] and was[1] is basis[1] and was[2] is basis[2]
                and was[3] is basis[3] and was[4] is basis[4]):  # fmt: skip
            return known[1]
    members = set(pool.members)
    healthy = set(pool.healthy)
    counts = [
        name,
        len(pool.members),
        len(healthy),
        len(pool.down & members),
        sum(1 for b in pool.ejected if b in members and b not in healthy),
        len(pool.draining & members),
    ]
    text = _dumps(counts)[:-1] + ","
    _counted[name] = (basis, text)
    return text


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# The last count of open descriptors: [count, monotonic time taken, pid it is of].
_fds: list[float] = [0, float("-inf"), 0]


def _open_fds(now: float) -> int:
    """Open descriptors of this process, counted again when older than FDS_MAX_AGE."""
    if now - _fds[1] < FDS_MAX_AGE and _fds[2] == os.getpid():
        return int(_fds[0])
    try:
        count = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        # Not kept: counted again next time.  Out of descriptors (listing needs one), every
        # one is open: 0 was the opposite of the truth, and stayed FDS_MAX_AGE.
        if exc.errno == errno.EMFILE:
            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return 0
    _fds[:] = [count, now, os.getpid()]
    return count


def write(directory: Path, document: str) -> None:
    """Replace this process's file in one rename: a reader sees the old or the new one."""
    for _ in write_in_steps(directory, document):
        pass


def write_in_steps(directory: Path, document: str) -> Iterator[None]:
    """write(), the rename in a step of its own (each about 0.1 ms of system calls)."""
    pid = os.getpid()
    tmp = directory / f".{pid}.tmp"
    tmp.write_bytes(document.encode())
    yield None
    os.replace(tmp, directory / f"{pid}.json")


@dataclass
class InstanceView:
    """Every worker's snapshot of one instance; ``live`` are the ones still running."""

    snapshots: list[dict[str, Any]] = field(default_factory=list)
    live: list[dict[str, Any]] = field(default_factory=list)

    @property
    def freshest(self) -> dict[str, Any] | None:
        """Pool membership is the same in every worker: the newest one says it."""
        return max(self.live, key=lambda s: s["time"], default=None)


def read_all(directory: Path) -> InstanceView:
    view = InstanceView()
    # Every worker's file is read before the retired sum: if one was folded in between, the
    # sum read afterwards names it and the file read is dropped.  The sum is read by name,
    # not from the listing: the first fold may create it after the listing was taken.
    read: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.json")):
        if path.name != RETIRED:
            snapshot = _load(path)
            if snapshot is not None and isinstance(snapshot.get("pid"), int):
                read.append(snapshot)
    absorbed: set[int] = set()
    retired = _load(directory / RETIRED)
    if retired is not None:
        absorbed.update(retired.get("absorbed", ()))
        view.snapshots.append(retired)
    for snapshot in read:
        if snapshot["pid"] in absorbed:
            continue
        view.snapshots.append(snapshot)
        if _alive(int(snapshot["pid"])):
            view.live.append(snapshot)
    return view


def _load(path: Path) -> dict[str, Any] | None:
    """A snapshot file, or None if it is gone, unreadable or not shaped as one (a hand
    edit, another version): one such file must not break every scrape, or the supervisor."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    for key, kind in _SHAPE:
        if not isinstance(value.get(key), kind):
            return None
    return value if isinstance(value.get("absorbed", []), list) else None


def retire(directory: Path, pid: int) -> None:
    """Fold dead worker ``pid``'s counters into the retired sum and remove its file.

    Only the supervisor calls this, after reaping the worker: nobody writes either file then.
    The sum is written (naming ``pid``) before the worker's file goes, so a scrape counts the
    worker's share exactly once whichever of the two states it reads.
    """
    path = directory / f"{pid}.json"
    dead = _load(path)
    if dead is None:
        return
    retired_path = directory / RETIRED
    try:
        retired = _folded(_load(retired_path) or _empty_sum(), dead, pid)
    except (TypeError, ValueError, IndexError):  # a sum of the wrong shape inside: begun again
        retired = _folded(_empty_sum(), dead, pid)
    tmp = directory / ".retired.tmp"
    tmp.write_text(json.dumps(retired, separators=(",", ":")))
    os.replace(tmp, retired_path)
    path.unlink(missing_ok=True)


def _empty_sum() -> dict[str, Any]:
    return {"pid": 0, "worker": -1, "time": 0.0, "requests": [], "connect": [],
            "counters": {}, "gauges": {}, "pools": [], "absorbed": []}  # fmt: skip


def _folded(retired: dict[str, Any], dead: dict[str, Any], pid: int) -> dict[str, Any]:
    retired["requests"] = _summed(retired["requests"], dead["requests"], 5)
    retired["connect"] = _summed(retired["connect"], dead["connect"], 2)
    counters = retired["counters"]
    for key, value in dead["counters"].items():
        counters[key] = counters.get(key, 0) + value
    retired["absorbed"] = [*retired.get("absorbed", []), pid][-ABSORBED_KEPT:]
    retired["time"] = time.time()
    return retired


def _summed(into: list[list[Any]], more: list[list[Any]], width: int) -> list[list[Any]]:
    """Rows ``[*labels, series]`` (``width`` labels) added series by series."""
    totals: dict[tuple[Any, ...], list[float]] = {tuple(row[:width]): row[width] for row in into}
    for row in more:
        key, series = tuple(row[:width]), row[width]
        have = totals.get(key)
        totals[key] = series if have is None else [a + b for a, b in zip(have, series, strict=True)]
    return [[*key, series] for key, series in totals.items()]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by the supervisor) is not running.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0] != b"Z"
    return True
