"""Property-based: random and mutated requests through a real proxy.

Whatever arrives, redlb never crashes, never forwards two requests where the client sent
one (nor one it refused), and never leaks a socket.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import HttpBackend, Proxy, RedisProcess, open_fds, raw_exchange, statuses

VALID = [
    b"GET /f/x HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
    b"POST /f/x HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /f/x HTTP/1.1\r\nHost: fuzz.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HEAD /f/x HTTP/1.0\r\nHost: fuzz.test\r\nConnection: keep-alive\r\n\r\n",
]
ALPHABET = b" \t\r\n:;,0123456789abcdefxXGETPOSHT/\x00\x7f\xff-"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(ALPHABET))
        if op == 0:
            data.insert(pos, byte)
        elif op == 1 and pos < len(data):
            del data[pos]
        elif pos < len(data):
            data[pos] = byte
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory, loop_thread):
    base = tmp_path_factory.mktemp("fuzz")
    redis = RedisProcess(base / "redis").start()
    backend = HttpBackend(loop_thread, "fuzz").start()
    redis.cli("RPUSH", "servers", backend.address)
    proxy = Proxy(redis.url, "--header-timeout", "2", workdir=base / "proxy").start()
    yield proxy, backend
    proxy.stop()
    backend.stop()
    redis.kill()


def _check(proxy: Proxy, backend: HttpBackend, data: bytes) -> None:
    before = backend.count()
    out, _ = raw_exchange(proxy.port, data, timeout=0.5)
    forwarded = backend.count() - before
    codes = statuses(out)
    assert 500 not in codes
    # One message sent at most (mutations may split it, but never into two forwarded ones).
    assert forwarded <= 1, (data, forwarded)
    if codes and 400 <= codes[0] < 500:
        assert forwarded == 0  # refused means not forwarded
    assert proxy.alive()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated())
def test_mutated_requests(fuzz_env, data: bytes) -> None:
    _check(*fuzz_env, data)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=1, max_size=300))
def test_random_bytes(fuzz_env, data: bytes) -> None:
    _check(*fuzz_env, data)


def test_no_socket_leaks_after_fuzzing(fuzz_env) -> None:
    proxy, _ = fuzz_env
    time.sleep(1.0)
    fds = open_fds(proxy.pid)
    out, _ = raw_exchange(proxy.port, VALID[0], timeout=0.5)
    assert statuses(out) == [200]
    assert fds < 50, fds
