"""The command line: every bad flag value is refused with one line and exit 2; --version."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import redlb
from redlb.store.embedded import redis_server_binary
from support import RedisProcess, free_port, wait_for

UNREACHABLE = "redis://127.0.0.1:1/0"


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", *args], capture_output=True, text=True, timeout=timeout
    )


BAD_VALUES = [
    ("--health-interval", "0"),
    ("--health-interval", "-1"),
    ("--workers", "0"),
    ("--workers", "1000"),
    ("--connect-timeout", "0"),
    ("--connect-timeout", "-1"),
    ("--upstream-timeout", "nan"),
    ("--keepalive-timeout", "inf"),
    ("--header-timeout", "0"),
    ("--queue-timeout", "nan"),
    ("--drain-timeout", "-1"),
    ("--redis-timeout", "0"),
    ("--resync-interval", "0"),
    ("--health-timeout", "0"),
    ("--health-rise", "0"),
    ("--health-fall", "0"),
    ("--retry-budget-percent", "-10"),
    ("--retry-budget-percent", "nan"),
    ("--eject-max-percent", "101"),
    ("--eject-base-time", "0"),
    ("--eject-consecutive", "-1"),
    ("--max-body", "-1"),
    ("--max-headers", "0"),
    ("--max-request-line", "0"),
    ("--max-header-bytes", "0"),
    ("--body-min-rate", "-5"),
    ("--body-rate-grace", "inf"),
    ("--max-conns-per-backend", "-1"),
    ("--max-queue-per-backend", "-1"),
    ("--pool", ""),
    ("--pool", " "),
    ("--listen", ""),
    ("--host", ""),
    ("--state-dir", ""),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_bad_flag_value_is_one_line_exit_2(flag: str, value: str) -> None:
    args = ["serve", "--redis", UNREACHABLE, "--listen", "127.0.0.1:0", "--status-listen", "off"]
    if flag == "--listen":
        args = ["serve", "--redis", UNREACHABLE, "--status-listen", "off"]
    try:
        out = run_cli(*args, flag, value, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{flag} {value!r} was accepted: redlb started serving")
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert flag in lines[0], lines[0]


def test_many_workers_need_the_override() -> None:
    refused = run_cli("serve", "--redis", UNREACHABLE, "--workers", "1000")
    assert refused.returncode == 2 and "--force-workers" in refused.stderr


def test_usage_errors_are_one_line() -> None:
    out = run_cli("serve", "--no-such-flag")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = run_cli("backend", "add")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert run_cli("--help").returncode == 0


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"redlb {redlb.__version__}"


# redlb backend: deliberate answers to awkward pools


def _one_line_error(out: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["ls"], ["add", "127.0.0.1:8080"], ["rm", "127.0.0.1:8080"]])
def test_pool_key_of_the_wrong_type(redis_server: RedisProcess, command: list[str]) -> None:
    redis_server.cli("SET", "servers", "oops")
    line = _one_line_error(run_cli("backend", *command, "--redis", redis_server.url))
    assert "not a list" in line


def test_drain_unknown_and_last_backend(redis_server: RedisProcess) -> None:
    url = redis_server.url
    line = _one_line_error(run_cli("backend", "drain", "127.0.0.1:8080", "--redis", url))
    assert "not in" in line
    redis_server.cli("RPUSH", "servers", "127.0.0.1:8080", "127.0.0.1:8081")
    assert run_cli("backend", "drain", "127.0.0.1:8080", "--redis", url).returncode == 0
    line = _one_line_error(run_cli("backend", "drain", "127.0.0.1:8081", "--redis", url))
    assert "last backend" in line and "--force" in line
    assert run_cli("backend", "drain", "127.0.0.1:8081", "--force", "--redis", url).returncode == 0
    listed = run_cli("backend", "ls", "--redis", url)
    assert "no backend" in listed.stderr  # a warning, the listing still works
    assert listed.returncode == 0


def test_malformed_entries_are_readable_and_removable(redis_server: RedisProcess) -> None:
    url = redis_server.url
    redis_server.cli("RPUSH", "servers", "not an address", "127.0.0.1:8080")
    listed = run_cli("backend", "ls", "--redis", url)
    assert "not an address" in listed.stdout and "b'" not in listed.stdout
    assert run_cli("backend", "rm", "not an address", "--redis", url).returncode == 0
    redis_server.cli("RPUSH", "servers", "bad:entry:x")
    assert run_cli("backend", "rm", "--raw", "bad:entry:x", "--redis", url).returncode == 0
    assert redis_server.cli("LRANGE", "servers", "0", "-1").split() == ["127.0.0.1:8080"]


def test_duplicate_add_is_refused(redis_server: RedisProcess) -> None:
    url = redis_server.url
    assert run_cli("backend", "add", "127.0.0.1:8080", "--redis", url).returncode == 0
    line = _one_line_error(run_cli("backend", "add", "http://127.0.0.1:8080", "--redis", url))
    assert "already in" in line
    ok = run_cli("backend", "add", "127.0.0.1:8080", "--allow-duplicate", "--redis", url)
    assert ok.returncode == 0
    assert redis_server.cli("LLEN", "servers").strip() == "2"


# Credentials


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "auth", extra=["--requirepass", "sekret"]).start_unchecked()
    yield server
    server.kill()


@pytest.mark.parametrize(
    ("userinfo", "expected"), [("", "requires a password"), (":wrong@", "refused the password")]
)
@pytest.mark.parametrize("command", [["serve", "--status-listen", "off"], ["backend", "ls"]])
def test_password_problems_are_one_line(
    redis_with_password: RedisProcess, userinfo: str, expected: str, command: list[str]
) -> None:
    url = f"redis://{userinfo}127.0.0.1:{redis_with_password.port}/0"
    extra = ["--listen", f"127.0.0.1:{free_port()}"] if command[0] == "serve" else []
    try:
        out = run_cli(*command, *extra, "--redis", url, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("redlb started serving a Redis that refuses its credentials")
    line = _one_line_error(out)
    assert expected in line and "wrong" not in line.replace("wrong password", "")
    assert "HELLO" not in line


def test_backend_commands_take_a_sentinel_url(tmp_path: Path, redis_server: RedisProcess) -> None:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {redis_server.port} 1\n"
    )
    sentinel = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis+sentinel://127.0.0.1:{port}/main"
        assert wait_for(lambda: run_cli("backend", "ls", "--redis", url).returncode == 0, 15), (
            run_cli("backend", "ls", "--redis", url).stderr
        )
        assert run_cli("backend", "add", "127.0.0.1:8080", "--redis", url).returncode == 0
        assert redis_server.cli("LRANGE", "servers", "0", "-1").split() == ["127.0.0.1:8080"]
    finally:
        sentinel.kill()
        sentinel.wait()
