"""A restarted worker's counts are kept in one file, not one file per dead worker.

Each worker writes its counts to ``<metrics dir>/<pid>.json``; a dead worker's file stays so
that counters never go backwards.  Before, a crash-looping worker left one more file per
restart, read on every scrape forever: scrape cost grew without bound.  Now the supervisor
folds a dead worker's file into ``retired.json``, and the totals stay exact.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from redlb.fleet.instance import metrics_parent
from support import metric_sum, scrape, wait_for


def _metrics_dir(proxy) -> Path:
    dirs = [Path(f.path).parent for f in psutil.Process(proxy.pid).children()[0].open_files()
            if "redlb-metrics" in f.path]  # fmt: skip
    if dirs:
        return dirs[0]
    (found,) = metrics_parent().glob(f"redlb-metrics-{proxy.pid}-*")
    return found


def test_dead_workers_are_folded_into_one_file_and_no_count_is_lost(
    redis_server, backends, start_proxy
):
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    assert wait_for(lambda: len(psutil.Process(proxy.pid).children()) == 2, 10)
    directory = _metrics_dir(proxy)
    sent = 0
    for _round in range(6):
        for _ in range(10):
            assert proxy.get("/")[0] == 200
            sent += 1
        time.sleep(1.2)  # a SIGKILLed worker keeps what it wrote: let it write its counts
        victim = psutil.Process(proxy.pid).children()[0].pid
        os.kill(victim, signal.SIGKILL)
        assert wait_for(
            lambda v=victim: (
                v not in [c.pid for c in psutil.Process(proxy.pid).children()]
                and len(psutil.Process(proxy.pid).children()) == 2
                and proxy.ready()
            ),
            20,
        )
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == sent, 5), (
        sent,
        metric_sum(scrape(proxy), "redlb_requests_total"),
    )
    files = sorted(p.name for p in directory.glob("*.json"))
    assert len(files) <= 3, files  # two live workers and the retired sum
