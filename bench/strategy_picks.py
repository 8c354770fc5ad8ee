"""Each strategy's own cost per request, in process: what the bench's strategy table adds.

Per request a strategy costs its pick, plus for the counting ones the LoadView's started and
finished around the attempt (windowed, as when the fleet publisher runs; given the exchange's
clock readings, as the exchange does), plus for hash the request key.  This loop does
exactly that on the bench's shape (three backends, 50 requests in flight, finished first in
first out with latencies of 1-2 ms), and takes the minimum of many repetitions: a busy
machine only ever adds time, so the minimum is the figure to compare.

    .venv/bin/python bench/strategy_picks.py              # every strategy, ns per request
    .venv/bin/python bench/strategy_picks.py hash first   # some of them
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from collections.abc import Callable

from redlb.address import parse_backend
from redlb.balancer.base import Strategy
from redlb.balancer.ewma import PeakEwma
from redlb.balancer.first import FirstAvailable
from redlb.balancer.leased import LeasedRoundRobin
from redlb.balancer.least import LeastOutstanding
from redlb.balancer.leastconn import LeastConnections
from redlb.balancer.load import LoadView
from redlb.balancer.random_choice import RandomChoice
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.requestkey import cookie, parse_key_spec, request_key
from redlb.balancer.snapshot import Snapshot
from redlb.store.rotation import _END, CounterLease, Cursor

IN_FLIGHT = 50
REQUESTS = 2000  # per repetition
REPEAT = 200
# Hash on the client's address: wrk's one address (a hot key, spilled by the bounded load),
# and 50 clients' addresses.
ONE_PEER = [b"127.0.0.1"] * IN_FLIGHT
PEERS = [f"127.0.0.{i + 1}".encode() for i in range(IN_FLIGHT)]
HEADERS = [(b"Host", b"localhost"), (b"User-Agent", b"wrk")]


def round_robin(load: LoadView) -> Strategy:
    cursor = Cursor()  # as `redlb serve --workers 1` has it
    cursor.values[_END] = 1 << 60  # one endless lease: no refill, no I/O
    return LeasedRoundRobin(CounterLease(None, "rr", 1.0, cursor))  # type: ignore[arg-type]


BUILDERS: dict[str, Callable[[LoadView], Strategy]] = {
    "round_robin": round_robin,
    "least_outstanding": LeastOutstanding,
    "least_conn": LeastConnections,
    "peak_ewma": PeakEwma,
    "hash": lambda load: RendezvousHash(load, 0.25),
    "hash, 50 clients": lambda load: RendezvousHash(load, 0.25),
    "random": lambda load: RandomChoice(),
    "first": lambda load: FirstAvailable(load, 20),
}


def one_repetition(
    name: str, strategy: Strategy, load: LoadView, candidates: Snapshot
) -> tuple[float, float]:
    """Seconds for REQUESTS requests, and for the same loop without the strategy."""
    spec = parse_key_spec("ip") if name.startswith("hash") else None
    peers = PEERS if name == "hash, 50 clients" else ONE_PEER
    counts = strategy.counts
    pick = strategy.pick
    started, finished = load.started, load.finished
    flight: deque[object] = deque()
    latencies = [0.001 + 0.001 * random.random() for _ in range(REQUESTS)]
    # The exchange's own clock readings, passed to the counts as it does (none of the strategy's).
    nows = [time.monotonic() + 0.00002 * i for i in range(REQUESTS)]
    for i in range(IN_FLIGHT):  # the steady state: 50 in flight
        backend = pick(candidates, peers[i])
        if counts:
            started(backend)
        flight.append(backend)
    append, popleft = flight.append, flight.popleft
    began = time.perf_counter()
    for i in range(REQUESTS):
        peer = peers[i % IN_FLIGHT]
        done = popleft()
        if counts:
            finished(done, latencies[i], nows[i])  # type: ignore[arg-type]
        key = request_key(spec, peer, b"/ok", HEADERS) if spec is not None else b""
        backend = pick(candidates, key)
        if counts:
            started(backend, nows[i])
        append(backend)
    spent = time.perf_counter() - began
    # The loop's own cost: the same without the strategy.
    began = time.perf_counter()
    for i in range(REQUESTS):
        peer = peers[i % IN_FLIGHT]
        done = popleft()
        key = b""
        backend = done
        append(backend)
    return spent, time.perf_counter() - began


def measure(name: str) -> float:
    """Nanoseconds per request: the minimum over REPEAT repetitions."""
    load = LoadView()
    load.windowed = True  # the publisher's windows, as with a fleet strategy
    strategy = BUILDERS[name](load)
    if not strategy.fleet:
        load.windowed = False
    candidates = Snapshot.of([parse_backend(f"127.0.0.1:{8080 + i}") for i in range(3)])
    runs = [one_repetition(name, strategy, load, candidates) for _ in range(REPEAT)]
    best = min(spent for spent, _ in runs) - min(loop for _, loop in runs)
    return best / REQUESTS * 1e9


def main() -> None:
    names = sys.argv[1:] or list(BUILDERS)
    base = measure("round_robin")
    print("| strategy | ns/request | vs round robin (ns) |")
    print("|---|---:|---:|")
    for name in names:
        ns = base if name == "round_robin" else measure(name)
        print(f"| {name} | {ns:.0f} | {ns - base:+.0f} |", flush=True)
    _ = cookie  # the sticky cookie's read is measured by the proxy bench, not here


if __name__ == "__main__":
    main()
