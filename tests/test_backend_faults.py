"""Section 7 of the cases file: backends that misbehave, scripted byte by byte."""

from __future__ import annotations

import asyncio
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import ScriptedBackend, raw_exchange, request, statuses

GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def scripted(redis_server, loop_thread, start_proxy):
    """Start a scripted backend as the only pool member and a proxy in front of it."""

    def make(script, *args: str, extra_backends: tuple[str, ...] = ()):
        backend = ScriptedBackend(loop_thread, script).start()
        redis_server.cli("RPUSH", "servers", *extra_backends, backend.address)
        proxy = start_proxy(redis_server.url, "--upstream-timeout", "3", *args)
        return proxy, backend

    return make


def _ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_UPS_01_closed_port(redis_server, start_proxy):
    redis_server.cli("RPUSH", "servers", f"127.0.0.1:{_closed_port()}")
    proxy = start_proxy(redis_server.url)
    status, _, _ = request(proxy.port, "GET", "/", timeout=5)  # the bar: within 5 s
    assert status in (502, 503)


def test_UPS_02_get_reset_once_is_retried(scripted):
    async def script(reader, writer, n):
        while True:
            head = await backend.read_request(reader)
            if n == 1:
                writer.transport.abort()
                return
            writer.write(_ok())
            assert head

    proxy, backend = scripted(script)
    status, body, _ = proxy.get("/")
    assert status == 200 and body == b"ok"
    assert len(backend.requests) == 2


def test_UPS_03_post_reset_is_never_sent_twice(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.transport.abort()

    proxy, backend = scripted(script)
    status, _, _ = request(proxy.port, "POST", "/x", body=b"data")
    assert status in (502, 503)
    assert len(backend.requests) == 1


def test_UPS_04_truncated_content_length_body(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 500)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    proxy, backend = scripted(script)
    out, closed = raw_exchange(proxy.port, GET, timeout=3)
    body = out.partition(b"\r\n\r\n")[2]
    assert statuses(out) == [200] and closed and len(body) < 1000


def test_UPS_05_truncated_chunked_body(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    proxy, backend = scripted(script)
    out, closed = raw_exchange(proxy.port, GET, timeout=3)
    assert closed and not out.endswith(b"0\r\n\r\n")


def test_UPS_06_backend_never_answers(scripted):
    async def script(reader, writer, n):
        await asyncio.sleep(30)

    proxy, backend = scripted(script)
    status, _, _ = request(proxy.port, "GET", "/", timeout=3 + 5)  # upstream timeout + slack
    assert status == 504


@pytest.mark.parametrize(
    "case, reply",
    [
        ("UPS-07", b"THIS IS NOT HTTP AT ALL\r\n\r\n"),
        ("UPS-08", b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
        ("UPS-09", b"just a body without any status line"),
        ("UPS-10", b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"h" * 256 * 1024 + b"\r\n\r\n"),
        (
            "UPS-10 fields",
            b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 300 + b"Content-Length: 0\r\n\r\n",
        ),
        ("UPS-12", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        (
            "UPS-15",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nRAW",
        ),
        ("UPS-17", b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n b\r\nContent-Length: 2\r\n\r\nok"),
        ("UPS-18", b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok"),
    ],
)
def test_bad_replies_are_502(scripted, case, reply):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.2)

    proxy, backend = scripted(script)
    out, _ = raw_exchange(proxy.port, GET, timeout=1)
    assert statuses(out)[:1] == [502], (case, out[:200])
    assert b"RAW" not in out and b"NOT HTTP" not in out and b"\x00" not in out
    # The proxy is healthy afterwards, and that backend connection was not kept.
    assert proxy.alive()


def test_UPS_12_conflicting_length_closes_upstream(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
        await writer.drain()
        await reader.read()  # returns when redlb closes its side

    proxy, backend = scripted(script)
    for _ in range(3):
        out, _ = raw_exchange(proxy.port, GET, timeout=1)
        assert statuses(out)[:1] == [502]
    assert backend.connections == 3  # each bad connection was discarded, not reused


def test_UPS_14_keepalive_then_fin_twenty_times(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(_ok())  # keep-alive by default, then close at once
        await writer.drain()

    proxy, backend = scripted(script)
    results = []
    for _ in range(20):
        status, _, _ = proxy.get("/")
        results.append(status)
    assert results == [200] * 20


def test_UPS_19_interim_responses(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        )
        writer.write(_ok(b"final"))
        await writer.drain()
        await asyncio.sleep(0.5)

    proxy, backend = scripted(script)
    status, body, _ = proxy.get("/")
    assert status == 200 and body == b"final"


def test_UPS_21_close_delimited_body(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"d" * 5000)
        await writer.drain()
        writer.close()

    proxy, backend = scripted(script)
    status, body, _ = proxy.get("/")
    assert status == 200 and body == b"d" * 5000


def test_UPS_22_post_500_not_retried(scripted):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    proxy, backend = scripted(script)
    status, _, _ = request(proxy.port, "POST", "/x", body=b"once")
    assert status == 500 and len(backend.requests) == 1


def test_UPS_30_connect_failures_are_retried_for_posts(scripted):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(_ok())
            await writer.drain()

    proxy, backend = scripted(script, extra_backends=(f"127.0.0.1:{_closed_port()}",))
    results = [request(proxy.port, "POST", "/x", body=b"p")[0] for _ in range(50)]
    assert results == [200] * 50
    assert len(backend.requests) == 50  # each POST reached the live backend exactly once


def test_UPS_32_dead_pool_is_a_fast_503_or_502(redis_server, start_proxy):
    redis_server.cli("RPUSH", "servers", *[f"127.0.0.1:{_closed_port()}" for _ in range(3)])
    proxy = start_proxy(redis_server.url)
    with ThreadPoolExecutor(8) as pool:  # each answer must come within 2 s: no retry storm
        codes = list(pool.map(lambda _: request(proxy.port, "GET", "/", timeout=2)[0], range(80)))
    assert set(codes) <= {502, 503}
    # Everything is ejected but the share the pool keeps (50 %): the answers turn into
    # fast refusals instead of 3 connect attempts each.
    _, metrics = proxy.status("/metrics")
    retries = float(re.search(rb"(?m)^redlb_retries_total (\S+)$", metrics).group(1))
    assert retries <= 80 * 2


def test_UPS_33_trickled_headers_time_out(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)

    proxy, backend = scripted(script)
    status, _, _ = request(proxy.port, "GET", "/", timeout=3 + 2)  # whole header phase bound
    assert status == 504


def test_UPS_34_connection_close_every_time(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(_ok(extra=b"Connection: close\r\n"))
        await writer.drain()
        writer.close()

    proxy, backend = scripted(script)
    codes = [proxy.get("/")[0] for _ in range(10)]
    assert codes == [200] * 10 and backend.connections == 10


def test_UPS_35_connection_cap_queues_then_503(scripted):
    """500 concurrent clients, a backend that serves 16 connections at a time: redlb opens
    at most 16, queues the rest (bounded, with a timeout) and answers each one quickly."""
    busy = {"now": 0, "max": 0}
    slots = asyncio.Semaphore(16)

    async def script(reader, writer, n):
        async with slots:
            busy["now"] += 1
            busy["max"] = max(busy["max"], busy["now"])
            try:
                while True:
                    await backend.read_request(reader)
                    await asyncio.sleep(0.05)
                    writer.write(_ok())
                    await writer.drain()
            finally:
                busy["now"] -= 1

    proxy, backend = scripted(
        script, "--max-conns-per-backend", "16", "--queue-timeout", "2", "--eject-consecutive", "0"
    )
    with ThreadPoolExecutor(500) as pool:  # each answer within 10 s: queued or refused, no hang
        codes = list(pool.map(lambda _: request(proxy.port, "GET", "/", timeout=10)[0], range(500)))
    print(f"\nUPS-35: 500 clients, cap 16: {codes.count(200)} x 200, {codes.count(503)} x 503")
    assert set(codes) <= {200, 503}, set(codes)
    assert codes.count(200) >= 100
    assert busy["max"] <= 16 and backend.connections <= 16
    from support import open_fds

    assert open_fds(proxy.pid) < 100  # no descriptor left behind
    assert proxy.get("/")[0] == 200
