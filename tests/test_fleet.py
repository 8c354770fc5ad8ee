"""The fleet registry: every instance in Redis with a heartbeat, its counters, bounded cost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import redis

from redlb.fleet import view
from redlb.store.client import make_client
from support import Load, wait_for

pytestmark = pytest.mark.timeout(90)


def overview(url: str) -> dict:
    async def go() -> dict:
        client = make_client(url, 2.0)
        try:
            return await view.overview(client, ["servers"])
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_every_instance_registers_with_its_identity(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address)
    r.hset("redlb:routes", "/api", "api")
    r.rpush("api", backends[2].address)
    first = start_proxy(redis_server.url, "--workers", "2")
    second = start_proxy(redis_server.url)
    assert wait_for(lambda: len(overview(redis_server.url)["instances"]) == 2, 10)
    data = overview(redis_server.url)
    by_listen = {i["listen"][0]: i for i in data["instances"]}
    one = by_listen[f"127.0.0.1:{first.port}"]
    two = by_listen[f"127.0.0.1:{second.port}"]
    assert one["pid"] == first.pid and two["pid"] == second.pid
    assert one["workers"] == 2 and two["workers"] == 1
    assert one["version"] == "0.1.0"
    assert time.time() - 60 < one["started"] <= time.time()
    assert one["routes"] == ["/api"] and one["pools"] == ["api"]  # routes replace --pool
    assert data["routes"] == [{"match": "/api", "pool": "api", "strip_prefix": False,
                               "host_header": None}]  # fmt: skip
    # A clean stop leaves at once; a killed one (one worker: no supervisor) when its
    # heartbeat expires.
    first.stop()
    assert wait_for(lambda: len(overview(redis_server.url)["instances"]) == 1, 3)
    assert second.process is not None
    second.process.kill()
    second.process.wait()
    assert len(overview(redis_server.url)["instances"]) == 1  # not yet: no one said goodbye
    assert wait_for(lambda: not overview(redis_server.url)["instances"], 10)


def test_live_rates_and_latency_per_backend(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address)
    proxy = start_proxy(redis_server.url, "--workers", "2", "--eject-consecutive", "0")
    backends[1].behaviour.status = 500  # every answer of b1 is an error (500: not retried)
    backends[1].behaviour.delay = 0.03
    with Load(proxy.port, rate=100, connections=4) as load:
        time.sleep(3)
    assert load.result.sent > 100

    def rows() -> dict:
        pool = next(p for p in overview(redis_server.url)["pools"] if p["name"] == "servers")
        return {b["address"]: b for b in pool["backends"]}

    assert wait_for(lambda: rows()[backends[0].address]["requests_last_minute"] > 50, 5)
    good, bad = rows()[backends[0].address], rows()[backends[1].address]
    assert good["error_rate"] == 0.0 and good["state"] == "healthy"
    assert bad["requests_last_minute"] > 0 and bad["error_rate"] == 1.0
    assert good["p50_ms"] is not None and good["p50_ms"] < bad["p50_ms"]  # 30 ms slower
    assert bad["p99_ms"] >= 25


def test_redis_cost_is_bounded_per_worker_at_any_load(redis_server, backends, start_proxy):
    """The fleet heartbeat costs the same with no traffic and under load: ~2 commands/s."""
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address)
    proxy = start_proxy(redis_server.url, "--workers", "2", "--no-access-log")
    time.sleep(1.5)  # past startup reads
    idle = _commands_during(redis_server, 4.0)
    with Load(proxy.port, rate=400, connections=8) as load:
        busy = _commands_during(redis_server, 4.0)
    assert load.result.sent > 800
    for counts in (idle, busy):
        fleet = sum(n for (_, fleet_key), n in counts.items() if fleet_key)
        per_worker_second = fleet / 4.0 / 2
        assert 1.0 <= per_worker_second <= 5.0, counts
    print("idle", dict(idle), "busy", dict(busy))


def _commands_during(redis_server, seconds: float) -> Counter:
    """Commands redlb sent, by (name, whether it is a fleet key), from Redis' MONITOR."""
    counts: Counter = Counter()
    proc = subprocess.Popen(
        [redis_server_cli(), "-p", str(redis_server.port), "monitor"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(max(0.0, deadline - time.monotonic()))
    proc.terminate()
    proc.wait(5)
    reader.join(5)
    for line in lines[1:]:  # the first line is "OK"
        parts = line.split('"')
        if len(parts) < 2:
            continue
        name = parts[1].upper()
        key = parts[3] if len(parts) > 3 else ""
        counts[(name, key.startswith("redlb:fleet:"))] += 1
    return counts


def redis_server_cli() -> str:
    from pathlib import Path

    from redlb.store.embedded import redis_server_binary

    return str(Path(redis_server_binary()).with_name("redis-cli"))


def test_status_and_top_print_the_fleet(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address, "not an address")
    r.sadd("redlb:servers:draining", backends[1].address)
    proxy = start_proxy(redis_server.url)
    for _ in range(5):
        proxy.get("/")
    assert wait_for(lambda: overview(redis_server.url)["instances"], 5)
    cmd = [sys.executable, "-m", "redlb", "status", "--redis", redis_server.url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=_wide())
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"127.0.0.1:{proxy.port}" in text
    assert backends[0].address in text and "healthy" in text
    assert backends[1].address in text and "draining" in text
    assert "INVALID" in text
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=20)
    assert json.loads(as_json.stdout)["instances"][0]["pid"] == proxy.pid
    top = subprocess.run(
        [sys.executable, "-m", "redlb", "top", "--redis", redis_server.url, "--count", "2",
         "--interval", "0.5"],
        capture_output=True, text=True, timeout=20, env=_wide(),
    )  # fmt: skip
    assert top.returncode == 0, top.stderr
    assert backends[0].address in top.stdout


def test_status_without_redis_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "redlb", "status", "--redis", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 1
    assert "cannot read the fleet" in out.stderr
    assert "Traceback" not in out.stderr


def _wide() -> dict[str, str]:
    import os

    return {**os.environ, "COLUMNS": "200"}


def test_heartbeat_survives_a_redis_outage(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    assert wait_for(lambda: overview(redis_server.url)["instances"], 5)
    redis_server.kill()
    time.sleep(1.5)
    assert proxy.get("/")[0] == 200  # serving on the last-known pool
    redis_server.start()
    assert wait_for(lambda: _alive(redis_server.url), 10)
    assert proxy.alive()


def _alive(url: str) -> bool:
    try:
        return bool(overview(url)["instances"])
    except (redis.RedisError, OSError):
        return False
