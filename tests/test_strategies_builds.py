"""The compiled strategies decide as the pure ones do: one scripted run, both builds, same output.

mypyc changes what Python leaves loose: a float variable holds no int, an attribute's class
default is read natively, dict values are unboxed to the declared type (the peers' baseline
is a dict of ints declared float).  A scripted sequence of picks, starts and finishes of
every counting strategy (fake clock, seeded draws, weights, published counts, peers) prints
every choice and the LoadView's state; the compiled and the pure process must print the same.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import random
from redlb import build
from redlb.address import Backend
from redlb.balancer.ewma import PeakEwma
from redlb.balancer.first import FirstAvailable
from redlb.balancer.least import LeastOutstanding
from redlb.balancer.leastconn import LeastConnections
from redlb.balancer.load import LoadView
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.random_choice import RandomChoice
from redlb.balancer.snapshot import Snapshot

print(build.state)
backends = [Backend(f"10.0.0.{i}", 8000 + i) for i in range(1, 7)]
pools = [Snapshot.of(backends[:3]), Snapshot.of(backends), Snapshot.of(backends[:4], [3, 1, 2, 1])]
now = [1000.0]
for name in ("least_outstanding", "peak_ewma", "least_conn", "hash", "random", "first"):
    load = LoadView(clock=lambda: now[0], decay=2.0)
    load.windowed = True
    rand = random.Random(7).random
    strategy = {
        "least_outstanding": lambda: LeastOutstanding(load, rand),
        "peak_ewma": lambda: PeakEwma(load, rand),
        "least_conn": lambda: LeastConnections(load),
        "hash": lambda: RendezvousHash(load, 0.25),
        "random": lambda: RandomChoice(rand),
        "first": lambda: FirstAvailable(load, 2),
    }[name]()
    print(name, strategy.counts, strategy.fleet, strategy.immediate)
    draw = random.Random(3)
    flight = []
    for step in range(600):
        candidates = pools[(step // 100) % 3]
        if step % 50 == 10:  # published counts: floats, and a baseline of ints (dict(local))
            load.set_others({b.key: draw.random() * 4 for b in candidates[:2]}, peers=step % 3)
        if step % 150 == 0:
            print(sorted(load.take_means().items()))
        backend = strategy.pick(candidates, b"key-%d" % (step % 9))
        print(backend.key, end=" ")
        load.started(backend, now[0] if step % 2 else -1.0)
        flight.append((backend, now[0]))
        now[0] += draw.random() * 0.01
        if len(flight) > 4 + step % 5:
            done, began = flight.pop(draw.randrange(len(flight)))
            load.finished(done, now[0] - began, now[0] if step % 3 else -1.0)
    print()
    print(sorted(load.local.items()), load.local_total, load.others_total)
    print(sorted(load.times.items()), sorted((load.latency or {}).items()))
    print(sorted((load.mean_latency or {}).items()), sorted(load.sampled_at.items()))
"""


def _run(pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "REDLB_PURE"}
    if pure:
        env["REDLB_PURE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_compiled_strategies_decide_as_the_pure_ones() -> None:
    pure = _run(pure=True)
    either = _run(pure=False)  # compiled where the build is (test_build checks it is used)
    assert pure.splitlines()[0] == "pure"
    assert pure.splitlines()[1:] == either.splitlines()[1:]
    assert len(set(pure.split())) > 40  # it printed picks of many backends and states
