"""Review (lifecycle, CLI, status listener): defects found from the outside, real processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from support import Proxy, RedisProcess, free_port, rss_bytes, wait_for


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args], capture_output=True, text=True, timeout=timeout
    )


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.parametrize(
    "url",
    [
        "foo",
        "",
        "http://127.0.0.1:6379",
        "redis+sentinel://127.0.0.1:1",
        "redis://:x",
        "redis://[::1",
        "redis+sentinel://127.0.0.1:x/master",
    ],
)
def test_serve_refuses_a_malformed_redis_url_in_one_line(url: str) -> None:
    try:
        out = run_cli(
            "serve", "--redis", url, "--listen", f"127.0.0.1:{free_port()}",
            "--status-listen", "off", timeout=10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"--redis {url!r} was accepted: redlb started serving")
    line = one_line_error(out, 2)
    assert "--redis" in line, line


@pytest.mark.parametrize(
    "command", [["ls"], ["weight", "127.0.0.1:8080", "3"], ["rm", "127.0.0.1:8080"]]
)
def test_backend_commands_with_a_weights_key_of_the_wrong_type(
    redis_server: RedisProcess, command: list[str]
) -> None:
    redis_server.cli("RPUSH", "servers", "127.0.0.1:8080", "127.0.0.1:8081")
    redis_server.cli("SET", "redlb:servers:weights", "oops")
    line = one_line_error(run_cli("backend", *command, "--redis", redis_server.url), 1)
    assert "redlb:servers:weights" in line, line


def test_backend_ls_with_a_health_key_of_the_wrong_type(redis_server: RedisProcess) -> None:
    redis_server.cli("RPUSH", "servers", "127.0.0.1:8080")
    redis_server.cli("HSET", "redlb:servers:health:127.0.0.1:8080", "a", "b")
    line = one_line_error(run_cli("backend", "ls", "--redis", redis_server.url), 1)
    assert "WRONGTYPE" in line or "wrong type" in line, line


def test_backend_with_a_sentinel_that_knows_no_master_is_one_short_line() -> None:
    port = free_port()  # nothing listens: no sentinel answers
    out = run_cli("backend", "ls", "--redis", f"redis+sentinel://127.0.0.1:{port}/mymaster")
    line = one_line_error(out, 1)
    assert "mymaster" in line and len(line) < 300, line


@pytest.mark.parametrize("which", ["--listen", "--status-listen"])
def test_address_in_use_names_the_address(
    redis_server: RedisProcess, start_proxy, which: str
) -> None:  # type: ignore[no-untyped-def]
    first: Proxy = start_proxy(redis_server.url)
    taken = first.port if which == "--listen" else first.status_port
    listen = f"127.0.0.1:{taken}" if which == "--listen" else f"127.0.0.1:{free_port()}"
    status = f"127.0.0.1:{taken}" if which == "--status-listen" else f"127.0.0.1:{free_port()}"
    out = run_cli(
        "serve", "--redis", redis_server.url, "--listen", listen, "--status-listen", status,
        timeout=15,
    )  # fmt: skip
    line = one_line_error(out, 1)
    assert f"127.0.0.1:{taken}" in line and which in line, line


def test_status_listener_bounds_a_pipelining_client_that_never_reads(
    redis_server: RedisProcess, start_proxy
) -> None:  # type: ignore[no-untyped-def]
    """Tiny requests, big /metrics answers, never read: memory stays bounded, the client is cut."""
    proxy: Proxy = start_proxy(redis_server.url)
    before = rss_bytes(proxy.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.status_port))
    sock.settimeout(0.5)
    burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            try:
                sock.send(burst)
            except TimeoutError:
                pass
            except OSError:
                break  # cut off: what we want
        grown = rss_bytes(proxy.pid) - before
        assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"

        # Cut off by the 5 s status deadline although it never read a byte.
        def cut_off() -> bool:
            import psutil

            return not any(
                c.laddr and c.laddr.port == proxy.status_port and c.status == "ESTABLISHED"
                for c in psutil.Process(proxy.pid).net_connections("tcp")
            )

        assert wait_for(cut_off, 10, 0.2), "the status connection is still open"
        assert proxy.status("/-/live")[0] == 200
    finally:
        sock.close()


@pytest.mark.parametrize("path", ["/a b", "/x\r\nX-Injected: 1", "/\tx"])
def test_health_path_with_spaces_or_controls_is_refused(path: str) -> None:
    """It becomes the probe's request line: a space or CRLF there is a broken or forged request."""
    try:
        out = run_cli(
            "serve", "--redis", "redis://127.0.0.1:1/0", "--listen", f"127.0.0.1:{free_port()}",
            "--status-listen", "off", "--health-path", path, timeout=10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"--health-path {path!r} was accepted: redlb started serving")
    assert "--health-path" in one_line_error(out, 2)


def test_removing_the_last_backend_and_listing_an_empty_pool_say_so(
    redis_server: RedisProcess,
) -> None:
    """drain of the last backend needs --force; rm of it empties the pool: at least a warning."""
    url = redis_server.url
    redis_server.cli("RPUSH", "servers", "127.0.0.1:8080")
    out = run_cli("backend", "rm", "127.0.0.1:8080", "--redis", url)
    assert out.returncode == 0 and "503" in out.stderr, (out.stdout, out.stderr)
    out = run_cli("backend", "ls", "--redis", url)
    assert out.returncode == 0 and "empty" in out.stderr, (out.stdout, out.stderr)
