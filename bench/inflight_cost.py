"""What publishing in-flight counts costs a worker with 1,000 least_outstanding pools.

Two real `redlb serve --strategy least_outstanding` instances (one worker each, so each pool
has a peer; INFLIGHT_INSTANCES=1: one, alone) on the table of tests/test_idle_cost.py (10,000 routes over 1,000 pools of three
backends, on a real redis-server).  Measured on the first instance, each over a window:
- Redis commands/s: INFO commandstats of the whole server, less what the same table costs
  with round robin (no publisher) measured the same way;
- publisher wakeups/s: the first instance runs with ``redlb.store.inflight``'s ``asyncio``
  replaced by a proxy that counts its ``sleep`` calls (each loop iteration sleeps once).
Windows: idle (after IDLE_SETTLE s without requests), then a bounded load on one pool
(LOAD_RATE requests/s over 4 connections, through the first instance).

    .venv/bin/python bench/inflight_cost.py            # about a minute
    INFLIGHT_WINDOW=5 .venv/bin/python bench/inflight_cost.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import (  # noqa: E402  # the tests' real servers and clients
    HttpBackend,
    Load,
    LoopThread,
    RedisProcess,
    free_port,
    raw_exchange,
    wait_for,
)

WINDOW = float(os.environ.get("INFLIGHT_WINDOW", "10"))
IDLE_SETTLE = float(os.environ.get("INFLIGHT_SETTLE", "12"))
LOAD_RATE = float(os.environ.get("INFLIGHT_RATE", "200"))
INSTANCES = int(os.environ.get("INFLIGHT_INSTANCES", "2"))
POOLS = 1000

# Run as the worker: counts the publisher's sleeps into a file, once a second.
WRAPPER = """
import asyncio, sys, threading, time, types
import redlb.store.inflight as inflight
count = [0]
async def sleep(delay, *a, **k):
    count[0] += 1
    return await asyncio.sleep(delay, *a, **k)
proxy = types.SimpleNamespace(**{n: getattr(asyncio, n) for n in dir(asyncio) if not n.startswith('__')})
proxy.sleep = sleep
inflight.asyncio = proxy
path = sys.argv.pop(1)
def dump():
    while True:
        time.sleep(0.2)
        with open(path + '.tmp', 'w') as f:
            f.write(str(count[0]))
        import os; os.replace(path + '.tmp', path)
threading.Thread(target=dump, daemon=True).start()
from redlb.cli import main
main()
"""


def seed(client, addresses: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for p in range(POOLS):
        pipe.rpush(f"pool{p}", *addresses)
    routes = {f"host{i}.example.com/": f"pool{i % POOLS}" for i in range(5000)}
    routes.update({f"*.wild{i}.example.org/": f"pool{(i * 7) % POOLS}" for i in range(1000)})
    routes.update({f"/svc{i}/v{i % 3}": f"pool{(i * 13) % POOLS}" for i in range(4000)})
    pipe.hset("redlb:routes", mapping=routes)
    pipe.execute()


def commands(client) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


class Worker:
    def __init__(self, redis_url: str, strategy: str, workdir: Path, counted: bool) -> None:
        self.port, self.status = free_port(), free_port()
        self.counter = workdir / f"wakeups-{self.port}"
        pre = [sys.executable, "-c", WRAPPER, str(self.counter)] if counted else [
            sys.executable, "-m", "redlb"]  # fmt: skip
        self.process = subprocess.Popen(
            [*pre, "serve", "--listen", f"127.0.0.1:{self.port}", "--status-listen",
             f"127.0.0.1:{self.status}", "--redis", redis_url, "--workers", "1",
             "--strategy", strategy, "--no-access-log", "--state-dir", str(workdir / "state")],
            stdout=subprocess.DEVNULL, stderr=(workdir / f"log-{self.port}").open("wb"),
        )  # fmt: skip

    def routed(self) -> bool:
        try:
            response, _ = raw_exchange(
                self.port, b"GET /svc5/v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
        except OSError:
            return False
        return response.startswith(b"HTTP/1.1 200 ")

    def wakeups(self) -> int:
        try:
            return int(self.counter.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def window(client, worker: Worker, seconds: float) -> tuple[float, float]:
    """(Redis commands/s, publisher wakeups/s) over ``seconds``."""
    before, woken = commands(client), worker.wakeups()
    time.sleep(seconds)
    ran = commands(client) - before - 1  # less the INFO itself
    return ran / seconds, (worker.wakeups() - woken) / seconds


def main() -> None:
    loop = LoopThread()
    backends = [HttpBackend(loop, f"b{i}").start() for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = RedisProcess(workdir / "redis").start(persistent=False)
        client = server.client()
        seed(client, [b.address for b in backends])
        try:
            figures = {}
            for strategy in ("round_robin", "least_outstanding"):
                client.delete(*[f"redlb:pool{p}:inflight" for p in range(POOLS)])
                workers = [
                    Worker(server.url, strategy, workdir, counted=i == 0) for i in range(INSTANCES)
                ]
                try:
                    assert all(wait_for(w.routed, 30) for w in workers), "not routed"
                    time.sleep(IDLE_SETTLE)
                    figures[strategy, "idle"] = window(client, workers[0], WINDOW)
                    with Load(workers[0].port, LOAD_RATE, 4, "/svc5/v2") as load:
                        time.sleep(1)
                        sent = load.result.sent
                        figures[strategy, "load"] = window(client, workers[0], WINDOW)
                        sent = load.result.sent - sent
                    figures[strategy, "requests/s"] = (sent / (WINDOW + 0.0), 0.0)
                finally:
                    for w in workers:
                        w.stop()
            base_idle = figures["round_robin", "idle"][0]
            base_load = figures["round_robin", "load"][0]
            idle, idle_wake = figures["least_outstanding", "idle"]
            busy, busy_wake = figures["least_outstanding", "load"]
            rate = figures["least_outstanding", "requests/s"][0]
            print(f"{POOLS} least_outstanding pools, {INSTANCES} instance(s), Redis commands/s")
            print(f"  idle:  {idle:7.0f} (round robin {base_idle:.0f}), "
                  f"per instance over round robin {(idle - base_idle) / INSTANCES:.0f}; "
                  f"publisher wakeups/s {idle_wake:.0f}")  # fmt: skip
            print(f"  load on one pool ({rate:.0f} requests/s through one instance): "
                  f"{busy:7.0f} (round robin {base_load:.0f}); publisher wakeups/s "
                  f"{busy_wake:.0f}; publisher commands per request "
                  f"{(busy - base_load) / max(rate, 1):.3f}")  # fmt: skip
        finally:
            server.kill()
            for b in backends:
                b.stop()
            loop.stop()


if __name__ == "__main__":
    main()
