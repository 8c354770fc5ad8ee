"""The seed scenario, exactly as a user types it, and the `redlb backend` commands."""

from __future__ import annotations

import subprocess
import sys

from support import HttpBackend, RedisProcess, wait_for


def test_two_servers_lpushed_alternate(redis_server: RedisProcess, backends, start_proxy):
    a, b = backends[0], backends[1]
    redis_server.cli("LPUSH", "servers", a.address)
    redis_server.cli("LPUSH", "servers", b.address)
    proxy = start_proxy(redis_server.url)

    seen = []
    for _ in range(10):
        status, body, _ = proxy.get("/")
        assert status == 200
        seen.append(body.decode().split()[1])
    assert seen.count("b0") == 5 and seen.count("b1") == 5
    assert all(seen[i] != seen[i + 1] for i in range(9)), seen  # alternating
    assert wait_for(lambda: proxy.access_log().count("GET / => 200 OK") == 10, 3)
    assert a.address in proxy.access_log() and b.address in proxy.access_log()


def test_seed_formats_and_ipv6(redis_server: RedisProcess, loop_thread, start_proxy):
    one = HttpBackend(loop_thread, "one").start()
    try:
        redis_server.cli("RPUSH", "servers", f"http://{one.address}")
        proxy = start_proxy(redis_server.url)
        assert proxy.get("/x?y=1")[1] == b"ok one\n"
        assert one.received[-1].url == b"/x?y=1"
    finally:
        one.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args], capture_output=True, text=True, timeout=30
    )


def test_backend_commands_edit_the_same_list(redis_server: RedisProcess, backends):
    url = redis_server.url
    assert run_cli("backend", "add", backends[0].address, "--redis", url).returncode == 0
    assert (
        run_cli("backend", "add", f"http://{backends[1].address}", "--redis", url).returncode == 0
    )
    listed = redis_server.cli("LRANGE", "servers", "0", "-1").split()
    assert listed == [backends[0].address, backends[1].address]

    bad = run_cli("backend", "add", "127.0.0.1:99999", "--redis", url)
    assert bad.returncode != 0 and "out of range" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # one clear line, no traceback

    out = run_cli("backend", "ls", "--redis", url)
    assert backends[0].address in out.stdout

    assert run_cli("backend", "rm", backends[0].address, "--redis", url).returncode == 0
    assert redis_server.cli("LRANGE", "servers", "0", "-1").split() == [backends[1].address]
    missing = run_cli("backend", "rm", backends[0].address, "--redis", url)
    assert missing.returncode != 0 and "not in" in missing.stderr


def test_cli_errors_are_one_line():
    unreachable = run_cli("backend", "ls", "--redis", "redis://127.0.0.1:1/0")
    assert unreachable.returncode != 0
    assert "cannot reach Redis" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    bad_flag = run_cli("serve", "--rotation", "zigzag")
    assert bad_flag.returncode != 0 and "Traceback" not in bad_flag.stderr
    assert run_cli("serve", "--help").returncode == 0
    assert run_cli("backend", "add", "--help").returncode == 0


def test_two_workers_still_alternate(redis_server: RedisProcess, backends, start_proxy):
    """Workers of one machine share one rotation cursor: new connections land on any worker
    (SO_REUSEPORT), yet the backends still take turns exactly."""
    redis_server.cli("LPUSH", "servers", backends[0].address)
    redis_server.cli("LPUSH", "servers", backends[1].address)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    seen = [proxy.get("/")[1].split()[1].decode() for _ in range(20)]
    assert all(seen[i] != seen[i + 1] for i in range(19)), seen
