"""The command line: every bad flag value is refused with one line and exit 2; --version."""

from __future__ import annotations

import subprocess
import sys

import pytest

import redlb

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
