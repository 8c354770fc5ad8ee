"""Strategies end to end: real redis-server, real backends, three real `redlb serve`."""

from __future__ import annotations

import subprocess
import sys

from support import closed_loop

SECONDS = 8.0


def redlb(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args, "--redis", redis_url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip


def slow_share(
    redis_server, start_proxy, backends, strategy: str, clients: int = 1
) -> tuple[float, float, int]:
    """(slow backend's mean in flight, fleet's mean in flight / 3, requests answered).

    Three instances, ``clients`` closed-loop clients each.  With one, every instance alone
    sees all backends idle at each pick: where a per-instance strategy piles onto the slow one.
    """
    proxies = [start_proxy(redis_server.url, "--strategy", strategy, "--no-access-log")
               for _ in range(3)]  # fmt: skip
    closed_loop([p.port for p in proxies], 1, 1.0)  # warm up: connections, published counts
    for backend in backends:
        backend.reset()
    statuses = closed_loop([p.port for p in proxies], clients, SECONDS)
    averages = [b.average() for b in backends]
    for proxy in proxies:
        proxy.stop(timeout=10)
    assert set(statuses) == {200}, statuses
    return averages[-1], sum(averages) / 3, sum(statuses.values())


def test_fleet_view_keeps_requests_off_the_slow_backend(redis_server, fast_fast_slow, start_proxy):
    runs = {
        name: slow_share(redis_server, start_proxy, fast_fast_slow, name)
        for name in ("least_conn", "least_outstanding", "peak_ewma")
    }
    print("\nslow backend: mean in flight / fair share (fleet's in flight / 3) / requests")
    for name, (slow, fair, count) in runs.items():
        print(f"  {name:18} {slow:.2f} / {fair:.2f} / {count}")
    local, fleet, ewma = runs["least_conn"], runs["least_outstanding"], runs["peak_ewma"]
    assert fleet[0] < local[0] * 0.75  # the fleet's counts keep requests off the slow one
    assert fleet[2] > local[2]  # so the same clients get more done
    # Its fair share: counts equalised fleet-wide, near-ties to the faster backend.  At one
    # client per instance the slow one is idle but for one request each time its latency is
    # forgotten (measured: 0.08 and 0.00 against 0.92; counts alone: 1.01 against 0.96, 0.99
    # against 0.95; least_conn: 2.45 against 0.98).
    assert fleet[0] <= fleet[1] * 1.15
    assert ewma[0] <= ewma[1]  # latency-aware: no more than its fair share


def test_fleet_view_at_four_clients_per_instance(redis_server, fast_fast_slow, start_proxy):
    """Each instance sees a lot here; the fleet's counts must still do better, not herd."""
    runs = {
        name: slow_share(redis_server, start_proxy, fast_fast_slow, name, clients=4)
        for name in ("least_conn", "least_outstanding")
    }
    print("\n4 clients per instance: slow backend mean in flight / fair share / requests")
    for name, (slow, fair, count) in runs.items():
        print(f"  {name:18} {slow:.2f} / {fair:.2f} / {count}")
    local, fleet = runs["least_conn"], runs["least_outstanding"]
    # Measured: 0.86 and 0.80 times its fair share (counts alone: 1.13 and 1.23), against
    # 1.34 and 1.33 for least_conn; the herd this guards against (stale counts trusted as
    # they are) gave 1.76.
    assert fleet[0] / fleet[1] <= local[0] / local[1] * 1.05
