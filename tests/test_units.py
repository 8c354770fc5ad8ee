"""The I/O-free core: address parsing, the pool snapshot, rise/fall, the retry budget, rules."""

from __future__ import annotations

import pytest

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.config import Config
from redlb.health.active import Verdict
from redlb.pool import Pool
from redlb.proxy.errors import Reject
from redlb.proxy.retry import RetryBudget
from redlb.proxy.rules import check_transfer_encoding, normalise_target


@pytest.mark.parametrize(
    "raw, key",
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
        ("HTTP://Backend.Example:80", "backend.example:80"),
        ("[::1]:9000", "[::1]:9000"),
        (b"localhost:1", "localhost:1"),
    ],
)
def test_valid_addresses(raw, key):
    assert parse_backend(raw).key == key


@pytest.mark.parametrize(
    "raw",
    ["not a server", "127.0.0.1:99999", "ftp://x:1", "http://", "http://a b:80", "h:0",
     "http://10.0.0.1:80\r\nX-Injected: 1", b"\xff\xfe:80", "x" * 301 + ":1", "user@h:80",
     "h:80/path", "[::1:80", "[zz]:80", "h:", ":80", "h:-1", "h:+80"],
)  # fmt: skip
def test_invalid_addresses(raw):
    with pytest.raises(InvalidAddress):
        parse_backend(raw)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


A, B, C, D = (Backend("127.0.0.1", p) for p in (1, 2, 3, 4))


def test_pool_snapshot_excludes_down_draining_ejected():
    pool = Pool(max_eject_percent=50, clock=Clock())
    pool.update(members=[A, B, C, D], down=[B], draining=[C])
    assert pool.healthy == (A, D)
    pool.eject(A, 10)
    assert pool.healthy == (D,)


def test_ejection_expires_on_the_clock():
    clock = Clock()
    pool = Pool(clock=clock)
    pool.update(members=[A, B])
    pool.eject(A, 30)
    assert pool.healthy == (B,)
    clock.now += 31
    pool.rebuild()
    assert pool.healthy == (A, B)


def test_never_more_than_max_share_ejected():
    pool = Pool(max_eject_percent=50, clock=Clock())
    pool.update(members=[A, B, C])
    for b in (A, B, C):
        pool.eject(b, 30)
    assert len(pool.healthy) == 2  # at most 1 of 3 ejected (50 %, rounded down, at least 1)
    pool.update(ejected={A: 30.0, B: 30.0, C: 30.0, D: 30.0})
    pool.update(members=[A, B, C, D])
    assert len(pool.healthy) == 2


def test_known_and_empty_pool():
    pool = Pool()
    assert not pool.known and pool.healthy == ()
    pool.update(members=[])
    assert pool.known and pool.healthy == ()


def test_rise_and_fall():
    verdict = Verdict()
    assert not verdict.record(False, rise=2, fall=3)
    assert not verdict.record(False, rise=2, fall=3)
    assert verdict.record(False, rise=2, fall=3) and not verdict.up
    assert not verdict.record(True, rise=2, fall=3)
    assert verdict.record(True, rise=2, fall=3) and verdict.up
    assert not verdict.record(False, 2, 3) and not verdict.record(True, 2, 3)
    assert verdict.up and verdict.streak == 0  # a success resets the fall streak


def test_retry_budget():
    budget = RetryBudget(percent=20, min_concurrency=3)
    budget.active_requests = 5
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    budget.active_requests = 100
    assert budget.try_acquire()  # 20 % of 100 = 20 allowed
    budget.release()
    assert budget.active_retries == 3


@pytest.mark.parametrize(
    "method, target, host, expected",
    [
        (b"GET", b"/a?b", b"h", (b"/a?b", b"h")),
        (b"GET", b"http://other:81/p", b"h", (b"/p", b"other:81")),
        (b"GET", b"http://other", b"h", (b"/", b"other")),
        (b"OPTIONS", b"*", b"h", (b"*", b"h")),
    ],
)
def test_targets(method, target, host, expected):
    assert normalise_target(method, target, host) == expected


@pytest.mark.parametrize(
    "target", [b"*", b"a/b", b"/x#f", b"https://h/", b"http://u@h/", b"ftp://h/"]
)
def test_bad_targets(target):
    with pytest.raises(Reject):
        normalise_target(b"GET", target, b"h")


@pytest.mark.parametrize(
    "values, http10, status",
    [([b"chunked"], True, 400), ([b"chunked", b"chunked"], False, 400),
     ([b"gzip, chunked"], False, 501), ([b",chunked"], False, 400), ([b"identity"], False, 501)],
)  # fmt: skip
def test_transfer_encoding(values, http10, status):
    with pytest.raises(Reject) as info:
        check_transfer_encoding(values, http10)
    assert info.value.status == status


def test_safe_defaults():
    config = Config()
    assert (config.max_request_line, config.max_header_bytes, config.max_headers) == (
        8192,
        16384,
        100,
    )
    assert config.max_body == 10 * 1024 * 1024
    assert (config.header_timeout, config.keepalive_timeout, config.upstream_timeout) == (
        10,
        15,
        60,
    )
    assert (config.body_min_rate, config.body_rate_grace) == (500, 10)
    assert config.redis_timeout <= 0.25
    assert config.eject_max_percent == 50 and config.retry_budget_percent == 20
    assert config.status_listen is not None and config.status_listen.startswith("127.0.0.1")
    config.status_listen = "0.0.0.0:8100"
    with pytest.raises(ValueError, match="loopback"):
        config.validate()
