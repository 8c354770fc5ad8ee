"""CPU per request with the metrics on and off, in the same run (interleaved rounds).

"metrics off (this tree)" is this tree with Recorder.request a no-op and no scrape: the
comparison issue 12 asks for.  All three run pure (REDLB_PURE=1, set here): a compiled
Recorder cannot be patched.

"off" is redlb without the operations work (git ref BASE, default the commit this branch
started from), exported to a temporary directory and run from there; "on" is this tree with
its per-request counters, the 1 s fleet heartbeat and a Prometheus scrape every second
(the status listener on, as in production).  Same layout as bench/run.py.

    .venv/bin/python bench/metrics_cost.py [BASE]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

BASE = sys.argv[1] if len(sys.argv) > 1 else "68b4875"


def main() -> None:
    os.environ["REDLB_PURE"] = "1"  # the redlb processes started below inherit it
    bench.ensure_tools()
    from redlb.store.embedded import redis_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="redlb-metrics-cost-"))
    tmp.chmod(0o755)
    base_tree = tmp / "base"
    base_tree.mkdir()
    archive = subprocess.run(["git", "-C", str(bench.ROOT), "archive", BASE, "src"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
    ports = [bench.free_port() for _ in range(3)]
    procs = [bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(bench.backends_conf(tmp, ports)),
                                           "-e", str(tmp / "b.err")])]  # fmt: skip
    redis_port = bench.free_port()
    procs.append(bench.pinned(bench.LOAD_CPU, [redis_server_binary(), "--port", str(redis_port),
                                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL))  # fmt: skip
    for p in [*ports, redis_port]:
        bench.wait_port(p)
    client = redis.Redis(port=redis_port)
    client.delete("servers")
    client.rpush("servers", *[f"127.0.0.1:{p}" for p in ports])
    url = f"redis://127.0.0.1:{redis_port}/0"
    log = (tmp / "access.log").open("ab")
    status_ports: dict[str, int] = {}

    def redlb(name: str, pythonpath: str | None, launcher: list[str] | None = None):
        def start(port: int) -> subprocess.Popen:
            status = status_ports[name] = bench.free_port()
            env = None
            if pythonpath:
                env = dict(os.environ, PYTHONPATH=pythonpath)
            return bench.pinned(bench.PROXY_CPU, [*(launcher or [sys.executable, "-m", "redlb"]),
                                                  "serve", "--listen", f"127.0.0.1:{port}",
                                                  "--redis", url, "--workers", "1",
                                                  "--status-listen", f"127.0.0.1:{status}"],
                                stdout=log, stderr=subprocess.DEVNULL, env=env)  # fmt: skip

        return start

    targets = [
        bench.Target("metrics off (base)", redlb("off", str(base_tree / "src")), client),
        bench.Target("metrics on", redlb("on", None), client),
    ]
    # Metrics off in this very tree: the per-request recording a no-op and nobody scraping.
    # The base commit above differs from this tree in much more than metrics by now.
    noop = [sys.executable, "-c", NOOP_LAUNCHER]
    targets.append(bench.Target("metrics off (this tree)", redlb("noop", None, noop), client))
    rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    try:
        for r in range(bench.ROUNDS):
            for target in targets:
                target.start()
                stop = threading.Event()
                scraper = threading.Thread(target=_scrape, args=(status_ports, target, stop))
                scraper.start()  # Prometheus every second, on both
                try:
                    rounds[target.name].append(target.measure("/ok", 50))
                finally:
                    stop.set()
                    scraper.join()
                    target.stop()
            print(f"  round {r + 1}/{bench.ROUNDS} done", file=sys.stderr, flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    medians = {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rounds.items()
    }
    print(
        "| redlb | req/s | p99 ms | CPU µs/req | user µs | system µs |\n|---|---|---|---|---|---|"
    )
    for name, m in medians.items():
        print(f"| {name} | {m['rps']:,.0f} | {m['p99_ms']:.2f} | "
              f"{m['cpu_us_per_req']:.1f} | {m['user_us_per_req']:.1f} | "
              f"{m['system_us_per_req']:.1f} |")  # fmt: skip
    off = medians["metrics off (base)"]["cpu_us_per_req"]
    on = medians["metrics on"]["cpu_us_per_req"]
    print(f"\nCPU per request: base {off:.1f} µs, on {on:.1f} µs: {100 * (on / off - 1):+.1f}%")
    same = medians["metrics off (this tree)"]["cpu_us_per_req"]
    print(f"this tree, metrics off {same:.1f} µs, on {on:.1f} µs: {100 * (on / same - 1):+.1f}%"
          " (goal <= +5%)")  # fmt: skip
    print("all rounds (cpu µs/req):", {k: [round(m["cpu_us_per_req"], 1) for m in v]
                                       for k, v in rounds.items()})  # fmt: skip


NOOP_LAUNCHER = """
import sys
from redlb.metrics.recorder import Recorder
Recorder.request = lambda self, ex, seconds: None
from redlb.cli import main
sys.argv[0] = "redlb"
main()
"""


def _scrape(ports: dict[str, int], target: bench.Target, stop: threading.Event) -> None:
    if target.name == "metrics off (this tree)":
        return  # nobody scrapes a redlb whose metrics are off
    name = "off" if "off" in target.name else "on"
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}/metrics", timeout=2).read()


if __name__ == "__main__":
    main()
