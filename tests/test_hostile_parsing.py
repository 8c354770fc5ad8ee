"""The parser from the attacker's side: hostile clients and lying backends, real processes.

Sections 2, 3, 6 and 7 of ../shared/http-robustness-cases.md that test_robustness.py and
test_backend_faults.py do not already cover, plus what a review found against real processes:
framing a backend can strip through Connection, response transfer codings, invalid bytes that
arrive together with a valid head, deep pipelining, HTTP/1.0 without Host, forwarding fields.
The invariants: nothing invalid reaches a backend even in part (the backend's raw capture is
checked, not only what it managed to parse); a response the client sees as complete is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    HttpBackend,
    LoopThread,
    Proxy,
    RedisProcess,
    ScriptedBackend,
    peak_rss,
    raw_exchange,
    statuses,
)

MB = 1024 * 1024


# A recording backend behind one proxy, shared by the module.


@pytest.fixture(scope="module")
def capture(
    tmp_path_factory: pytest.TempPathFactory, loop_thread: LoopThread
) -> Iterator[tuple[Proxy, HttpBackend]]:
    base: Path = tmp_path_factory.mktemp("hostile")
    redis = RedisProcess(base / "redis").start()
    backend = HttpBackend(loop_thread, "capture").start()
    redis.cli("RPUSH", "servers", backend.address)
    proxy = Proxy(redis.url, "--header-timeout", "3", workdir=base / "proxy").start()
    yield proxy, backend
    proxy.stop()
    backend.stop()
    redis.kill()


@pytest.fixture
def scripted(redis_server, loop_thread, start_proxy):  # type: ignore[no-untyped-def]
    """A scripted backend as the only pool member and a proxy in front of it."""

    def make(script, *args: str):  # type: ignore[no-untyped-def]
        backend = ScriptedBackend(loop_thread, script).start()
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url, "--upstream-timeout", "3", *args)
        return proxy, backend

    return make


def raw_seen(backend: HttpBackend, marker: bytes) -> bool:
    """Whether any byte sequence with ``marker`` reached the backend, parsed or not."""
    return any(marker in raw for raw in backend.raw)


def split_responses(out: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each Content-Length or chunked response in a client byte stream."""
    responses = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        if not sep:
            break
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if re.search(rb"(?i)\r\ntransfer-encoding:[^\r]*chunked", head):
            body, rest = dechunk(rest)
        elif length:
            n = int(length.group(1))
            body, rest = rest[:n], rest[n:]
        else:
            body, rest = rest, b""
        responses.append((head, body))
        out = rest
    return responses


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """Decode chunked framing; raises ValueError when the last chunk never came."""
    body = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise ValueError("no last chunk")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            _, sep, data = data.partition(b"\r\n")  # no trailers from redlb
            if not sep:
                raise ValueError("no end of trailers")
            return body, data
        if len(data) < size + 2:
            raise ValueError("chunk cut short")
        body, data = body + data[:size], data[size + 2 :]


def header(head: bytes, name: bytes) -> list[bytes]:
    found = []
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        if n.strip().lower() == name.lower():
            found.append(v.strip())
    return found


# 6. A backend cannot strip the framing redlb forwards a response by.


@pytest.mark.parametrize(
    "connection, framing, body",
    [
        (b"Content-Length", b"Content-Length: 5\r\n", b"hello"),
        (b"close, Content-Length", b"Content-Length: 5\r\n", b"hello"),
        (b"Transfer-Encoding", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        (b"Content-Length, Transfer-Encoding", b"Content-Length: 5\r\n", b"hello"),
        (b"Date, Content-Type", b"Content-Length: 5\r\n", b"hello"),
    ],
    ids=["CL", "close-CL", "TE", "CL-TE", "Date-Content-Type"],
)
def test_connection_cannot_strip_response_framing(scripted, connection, framing, body):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: %b\r\n%bDate: Sun, 29 Nov 2026 03:00:00 GMT\r\n"
                b"Content-Type: text/plain\r\nX-Keep: 1\r\n\r\n%b" % (connection, framing, body)
            )
            await writer.drain()
            if b"close" in connection:
                return

    proxy, backend = scripted(script)
    get = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
    out, _ = raw_exchange(proxy.port, get + get, timeout=2)
    responses = split_responses(out)
    # Both answers arrive, each framed and whole: the second is never glued into the first.
    assert [(statuses(h + b"\r\n\r\n"), b) for h, b in responses] == [([200], b"hello")] * 2, out
    for head, _ in responses:
        assert header(head, b"x-keep") == [b"1"]
        for name in connection.lower().replace(b" ", b"").split(b","):
            if name not in (b"close", b"content-length", b"transfer-encoding"):
                assert not header(head, name), (name, head)  # RFC 9110 §7.6.1


# 9. Response transfer codings other than a final chunked (RFC 9112 §6.1, §6.3).

GZIPPED = gzip.compress(b"hello gzip " * 20)


def _chunks(data: bytes, size: int = 50) -> bytes:
    out = b"".join(b"%x\r\n%b\r\n" % (len(data[i : i + size]), data[i : i + size])
                   for i in range(0, len(data), size))  # fmt: skip
    return out + b"0\r\n\r\n"


def _te_backend(scripted, head: bytes, body: bytes):  # type: ignore[no-untyped-def]
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(head + body)
            await writer.drain()
            if (
                b"chunked"
                not in head.lower().rpartition(b"transfer-encoding:")[2].split(b"\r\n")[0]
            ):
                return  # read-until-close framing: the end of the body is the close

    proxy, backend = scripted(script)
    return proxy, backend


def test_te_gzip_alone_is_read_to_close_and_labelled(scripted):
    """TE present, chunked not final: the body is read until close (RFC 9112 §6.3 rule 4)
    and the client is told the coding it still carries; no bytes are read as chunk framing."""
    proxy, backend = _te_backend(
        scripted, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", GZIPPED
    )
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=2)
    [(head, body)] = split_responses(out)
    assert b" 200 " in head
    assert [v.lower().replace(b" ", b"") for v in header(head, b"transfer-encoding")] == [
        b"gzip,chunked"
    ]
    assert gzip.decompress(body) == b"hello gzip " * 20


def test_te_gzip_chunked_keeps_the_gzip_coding(scripted):
    """chunked final: the chunk framing is decoded, the gzip coding travels on, labelled;
    Content-Encoding is the backend's business and left as it is."""
    proxy, backend = _te_backend(
        scripted,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Encoding: br\r\n\r\n",
        _chunks(GZIPPED),
    )
    get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    out, _ = raw_exchange(proxy.port, get + get, timeout=2)
    responses = split_responses(out)
    assert len(responses) == 2, out
    for head, body in responses:
        assert [v.lower().replace(b" ", b"") for v in header(head, b"transfer-encoding")] == [
            b"gzip,chunked"
        ]
        assert header(head, b"content-encoding") == [b"br"]
        assert gzip.decompress(body) == b"hello gzip " * 20  # no chunk framing leaked in


@pytest.mark.parametrize(
    "fields, body, label",
    [
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", _chunks(GZIPPED), b"gzip"),
        (b"Transfer-Encoding: x-custom\r\n", GZIPPED, b"x-custom"),
        (b"Transfer-Encoding: ,gzip,,chunked\r\n", _chunks(GZIPPED), b"gzip"),
        (b"Transfer-Encoding: gzip\r\nContent-Length: 3\r\n", GZIPPED, b"gzip"),
    ],
    ids=["two-fields", "unknown-to-close", "empty-elements", "with-CL-to-close"],
)
def test_te_codings_are_passed_on_by_name(scripted, fields, body, label):
    proxy, backend = _te_backend(scripted, b"HTTP/1.1 200 OK\r\n%b\r\n" % fields, body)
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=2)
    [(head, got)] = split_responses(out)
    assert b" 200 " in head and not header(head, b"content-length"), out
    assert [v.replace(b" ", b"") for v in header(head, b"transfer-encoding")] == [
        label + b",chunked"
    ]
    assert got == GZIPPED


@pytest.mark.parametrize(
    "te, body",
    [
        (b"chunked, gzip", _chunks(b"hello")),  # chunked not final, yet applied
        (b"chunked, chunked", _chunks(_chunks(b"hello"))),  # chunked twice (RFC 9112 §7)
        (b"chunked;x=1", _chunks(b"hello")),  # chunked takes no parameters
    ],
)
def test_te_invalid_is_502(scripted, te, body):
    proxy, backend = _te_backend(
        scripted, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n" % te, body
    )
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=2)
    assert statuses(out) == [502], out
    assert b"hello" not in out


def test_te_coding_to_an_http10_client_is_502(scripted):
    """An HTTP/1.0 client cannot be sent a transfer coding (RFC 9112 §6.1)."""
    proxy, backend = _te_backend(
        scripted, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", _chunks(GZIPPED)
    )
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.0\r\nHost: t\r\n\r\n", timeout=2)
    assert statuses(out) == [502], out
    assert GZIPPED[:20] not in out


def test_te_and_cl_in_a_response_te_wins_and_connection_not_reused(scripted):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                + _chunks(b"hello")
            )
            await writer.drain()

    proxy, backend = scripted(script)
    for _ in range(2):
        out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=1)
        [(head, body)] = split_responses(out)
        assert b" 200 " in head and body == b"hello", out
        assert not header(head, b"content-length")
    assert backend.connections == 2  # the suspicious connection was not reused


# 12. Invalid bytes in the same read as a valid head are seen before anything is forwarded.

BAD_BODIES = {
    "SMG-20": b"Z\r\nZZ\r\nZZZ\r\n\r\n",
    "SMG-21": b"0x5\r\nhello\r\n0\r\n\r\n",
    "SMG-22": b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n",
    "SMG-23": b"f" * 21 + b"\r\nx\r\n0\r\n\r\n",
    "SMG-24": b"3\r\nxxx__1a\r\n0\r\n\r\n",
    "LIM-07": b"5;" + b"e" * 40_000 + b"\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_nothing_of_an_invalid_request_is_forwarded(capture, case):
    proxy, backend = capture
    marker = b"/hostile/%b/" % case.encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    try:
        # Warm up: a pooled upstream connection makes any early forward immediate.
        sock.sendall(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")
        assert statuses(sock.recv(65536)) == [200]
        sock.sendall(
            b"POST %bx HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n%b"
            % (marker, BAD_BODIES[case])
        )
        out = sock.recv(65536)
    finally:
        sock.close()
    assert statuses(out) and 400 <= statuses(out)[0] < 500, out
    time.sleep(0.1)
    assert not raw_seen(backend, marker), f"{case}: the head reached the backend"


def test_valid_pipelined_requests_before_garbage_are_answered(capture):
    proxy, backend = capture
    raw = (
        b"GET /hostile/pipe-ok/1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /hostile/pipe-ok/2 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /hostile/pipe-bad/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n"
    )
    out, closed = raw_exchange(proxy.port, raw, timeout=2)
    assert statuses(out) == [200, 200, 400] and closed
    assert not raw_seen(backend, b"/hostile/pipe-bad/")


# 7. Deep pipelining: bounded memory, every answer, in order.


def test_10000_pipelined_requests_all_answered_in_order_with_bounded_memory(capture):
    proxy, backend = capture
    count = 10_000
    payload = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    received = bytearray()
    with peak_rss(proxy.pid) as rss:
        sender.start()
        deadline = time.monotonic() + 120
        while received.count(b"HTTP/1.1 ") < count and time.monotonic() < deadline:
            chunk = sock.recv(262144)
            if not chunk:
                break
            received += chunk
        sender.join(5)
    sock.close()
    growth = rss["peak"] - rss["start"]
    print(f"\n10,000 pipelined: RSS start {rss['start'] / MB:.1f} MB, +{growth / MB:.1f} MB")
    numbers = [int(n) for n in re.findall(rb"GET /echo\?n=(\d+) ", bytes(received))]
    assert numbers == list(range(count)), (len(numbers), numbers[:5])
    assert growth < 8 * MB


def test_pipelined_requests_are_parsed_only_so_far_ahead(capture):
    """Twenty clients each have ~100 KB of tiny pipelined requests waiting in the kernel when
    redlb reads them (it is stopped while they are sent) and read no answers: redlb parses
    only a bounded number ahead of the one in flight, so memory stays small; then every
    request is still answered, in order."""
    proxy, backend = capture
    payload = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(3000))
    socks = []
    sent = []
    with peak_rss(proxy.pid) as rss:
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
                sock.setblocking(False)
                n = 0
                with contextlib.suppress(BlockingIOError):
                    while n < len(payload):
                        n += sock.send(payload[n : n + 65536])
                socks.append(sock)
                sent.append(payload[:n].count(b"\r\n\r\n"))
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        time.sleep(3)  # redlb reads, parses, answers until the unread answers fill up
    growth = rss["peak"] - rss["start"]
    print(f"\n20 x {min(sent)}+ pipelined, unread: RSS +{growth / MB:.1f} MB")
    for sock, count in zip(socks, sent, strict=True):
        sock.setblocking(True)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(262144):
            received += chunk
        sock.close()
        numbers = [int(n) for n in re.findall(rb"GET /echo\?n=(\d+) ", bytes(received))]
        assert numbers == list(range(count)), (count, len(numbers))
    assert growth < 12 * MB


def test_pipelined_uploads_split_across_parse_slices(capture):
    """Bodies (by length and chunked) cut anywhere by the parse slices and the backlog are
    forwarded whole, in order."""
    proxy, backend = capture
    parts = []
    for i in range(300):
        body = b"%d-" % i + b"b" * (i * 7 % 900)
        if i % 2:
            framed = b"Transfer-Encoding: chunked\r\n\r\n" + _chunks(body, 97)
        else:
            framed = b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        close = b"Connection: close\r\n" if i == 299 else b""
        parts.append(b"POST /echo?n=%d HTTP/1.1\r\nHost: t\r\n%b%b" % (i, close, framed))
    out, closed = raw_exchange(proxy.port, b"".join(parts), timeout=20)
    assert closed
    found = re.findall(rb"POST /echo\?n=(\d+) len=(\d+) ", out)
    assert [int(n) for n, _ in found] == list(range(300))
    assert [int(n) for _, n in found] == [len(b"%d-" % i) + i * 7 % 900 for i in range(300)]


def test_unfinished_head_behind_a_pipelined_request_times_out(capture):
    """Slowloris behind a complete request in the same read: the unfinished head is held to
    the header timeout (3 s here) like any other."""
    proxy, _ = capture
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nX-Slow: 1\r\n")
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    sock.close()
    assert statuses(out) == [200, 408], out


def test_garbage_deep_in_a_pipeline_is_refused_after_every_answer_before_it(capture):
    proxy, backend = capture
    raw = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(100))
    raw += (
        b"POST /hostile/deep-bad/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n"
    )
    out, closed = raw_exchange(proxy.port, raw, timeout=10)
    assert statuses(out) == [200] * 100 + [400] and closed
    numbers = [int(n) for n in re.findall(rb"GET /echo\?n=(\d+) ", out)]
    assert numbers == list(range(100))
    assert not raw_seen(backend, b"/hostile/deep-bad/")


def test_request_connection_cannot_strip_chunked_framing(capture):
    proxy, backend = capture
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: Transfer-Encoding, Forwarded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /hostile/after-chunked/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    out, closed = raw_exchange(proxy.port, raw, timeout=3)
    assert statuses(out) == [200, 200] and b"len=5" in out and closed
    got = [r for r in backend.received if r.url == b"/hostile/after-chunked/x"]
    assert len(got) == 1


# 10. HTTP/1.0 without Host gets one: the listener's own authority (RFC 9112 §3.3).


def test_http10_without_host_is_forwarded_with_the_listener_authority(capture):
    proxy, backend = capture
    out, closed = raw_exchange(proxy.port, b"GET /hostile/h10/x HTTP/1.0\r\n\r\n", timeout=2)
    assert statuses(out) == [200] and closed
    got = [r for r in backend.received if r.url == b"/hostile/h10/x"][-1]
    assert got.header(b"host") == [b"127.0.0.1:%d" % proxy.port]


def test_http10_keep_alive_and_body(capture):
    proxy, backend = capture
    raw = (
        b"POST /echo HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n"
        b"helloGET /hostile/h10b/x HTTP/1.0\r\nHost: t\r\n\r\n"
    )
    out, closed = raw_exchange(proxy.port, raw, timeout=2)
    assert statuses(out) == [200, 200] and closed  # keep-alive once, then 1.0's default close
    first = out.split(b"HTTP/1.1 ")[1]
    assert b"Connection: keep-alive" in first and b"len=5" in first
    assert b"HTTP/1.0 " not in out


def test_http10_expect_is_not_answered_with_100(capture):
    proxy, backend = capture
    raw = b"POST /echo HTTP/1.0\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    out, _ = raw_exchange(proxy.port, raw, timeout=2)
    assert statuses(out) == [200] and b" 100 " not in out


# 11. Forwarding fields: list-valued ones appended to, single-valued ones set by redlb.


def test_forwarding_fields_are_never_taken_from_the_client(capture):
    proxy, backend = capture
    raw = (
        b"GET /hostile/fwd/x HTTP/1.1\r\nHost: front.test:81\r\n"
        b"Forwarded: for=6.6.6.6;host=evil;proto=https\r\nX-Forwarded-Port: 1\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
        b"X-Real-IP: 6.6.6.6\r\n\r\n"
    )
    out, _ = raw_exchange(proxy.port, raw, timeout=2)
    assert statuses(out) == [200]
    got = [r for r in backend.received if r.url == b"/hostile/fwd/x"][-1]
    assert got.header(b"forwarded") == [
        b'for=6.6.6.6;host=evil;proto=https, for=127.0.0.1;host="front.test:81";proto=http'
    ]
    assert got.header(b"x-forwarded-for") == [b"6.6.6.6, 127.0.0.1"]
    assert got.header(b"x-forwarded-port") == [b"%d" % proxy.port]
    assert got.header(b"x-forwarded-proto") == [b"http"]
    assert got.header(b"x-forwarded-host") == [b"front.test:81"]
    assert got.header(b"x-real-ip") == [b"127.0.0.1"]


def test_forwarding_fields_without_client_values(capture):
    proxy, backend = capture
    out, _ = raw_exchange(proxy.port, b"GET /hostile/fwd2/x HTTP/1.1\r\nHost: t\r\n\r\n", 2)
    assert statuses(out) == [200]
    got = [r for r in backend.received if r.url == b"/hostile/fwd2/x"][-1]
    assert got.header(b"forwarded") == [b'for=127.0.0.1;host="t";proto=http']
    assert got.header(b"x-forwarded-port") == [b"%d" % proxy.port]


def test_forwarded_for_quotes_ipv6() -> None:
    from redlb.proxy.rules import forwarded_node

    assert forwarded_node(b"127.0.0.1") == b"127.0.0.1"
    assert forwarded_node(b"::1") == b'"[::1]"'
    assert forwarded_node(b"2001:db8::17") == b'"[2001:db8::17]"'
    assert forwarded_node(b"unknown") == b"unknown"


def test_connection_cannot_strip_forwarded(capture):
    proxy, backend = capture
    raw = (
        b"GET /hostile/fwd3/x HTTP/1.1\r\nHost: t\r\n"
        b"Connection: Forwarded, X-Forwarded-Port\r\nForwarded: for=1.1.1.1\r\n\r\n"
    )
    out, _ = raw_exchange(proxy.port, raw, timeout=2)
    assert statuses(out) == [200]
    got = [r for r in backend.received if r.url == b"/hostile/fwd3/x"][-1]
    assert got.header(b"forwarded")[-1].endswith(b'for=127.0.0.1;host="t";proto=http')
    assert got.header(b"x-forwarded-port") == [b"%d" % proxy.port]


# Limits name the limit and the flag that sets it.


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n",
         b"413 Content Too Large: request body over 10485760 bytes (--max-body)"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
         b"414 URI Too Long: request target over 8192 bytes (--max-request-line)"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n",
         b"431 Request Header Fields Too Large: request header fields over 16384 bytes"
         b" (--max-header-bytes)"),
        (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: 1\r\n" * 120 + b"\r\n",
         b"431 Request Header Fields Too Large: more than 100 header fields (--max-headers)"),
    ],
    ids=["413", "414", "431-bytes", "431-count"],
)  # fmt: skip
def test_limit_errors_name_the_limit_and_the_flag(capture, raw, expected):
    proxy, _ = capture
    out, closed = raw_exchange(proxy.port, raw, timeout=2)
    assert expected in out and closed, out[-200:]


# 7. Backend faults at every byte: a response that looks complete is complete.

CL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: b\r\n\r\n0123456789"
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"
)


def _exchange_seeing_reset(port: int, data: bytes, timeout: float) -> tuple[bytes, str]:
    """Like raw_exchange, but tells a clean close ("fin") from a reset ("rst")."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return out, "rst"
            except TimeoutError:
                return out, "timeout"
            if not chunk:
                return out, "fin"
            out += chunk
    finally:
        sock.close()


@pytest.mark.parametrize("response", [CL_RESPONSE, CHUNKED_RESPONSE], ids=["cl", "chunked"])
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_backend_closing_at_every_byte_offset(scripted, response, version):
    """Cut the response after each byte (FIN or RST): the client gets the whole response, a
    502, or a response that is visibly cut (short of its length, no last chunk, or a reset);
    never a shorter response that looks complete, never a hang."""
    cut = {"at": 0}

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(response[: cut["at"]])
        await writer.drain()
        await asyncio.sleep(0.02)
        if cut["at"] % 2:
            writer.transport.abort()
        else:
            writer.close()

    proxy, backend = scripted(script, "--eject-consecutive", "0")
    for at in range(len(response) + 1):
        cut["at"] = at
        request = b"GET / HTTP/%b\r\nHost: t\r\nConnection: close\r\n\r\n" % version
        out, end = _exchange_seeing_reset(proxy.port, request, timeout=5)
        assert end != "timeout", (at, out)
        got = statuses(out)
        if not got:
            assert end == "rst", (at, out)  # reset before the client read anything
            continue
        assert got in ([200], [502]), (at, out)
        if got == [502]:
            continue
        head, _, body = out.partition(b"\r\n\r\n")
        length = header(head, b"content-length")
        if header(head, b"transfer-encoding"):
            try:
                decoded, _ = dechunk(body)
            except ValueError:
                continue  # no last chunk: visibly cut
            assert decoded == b"0123456789", (at, out)
        elif length:
            assert len(body) <= int(length[0])
            if len(body) == int(length[0]):
                assert body == b"0123456789", (at, out)
        else:
            # Close-delimited (an HTTP/1.0 client): only a whole body may end in a clean close.
            assert end == "rst" or body == b"0123456789", (at, end, out)


def test_lying_content_length_shorter_than_the_body(scripted):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhelloHTTP/1.1 200 OK\r\n")
            await writer.drain()

    proxy, backend = scripted(script)
    for _ in range(3):
        out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=1)
        [(head, body)] = split_responses(out)
        assert body == b"hel" and out.count(b"HTTP/1.1") == 1, out
    assert backend.connections == 3  # the extra bytes poisoned each connection


def test_lying_content_length_longer_than_the_body(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        await writer.drain()
        writer.close()

    proxy, backend = scripted(script)
    out, closed = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=2)
    assert statuses(out) == [200] and closed
    assert out.endswith(b"\r\n\r\nhello")  # short of 100: the client knows it was cut


def test_backend_stalling_mid_head_then_closing_is_502(scripted):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    proxy, backend = scripted(script)
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=4)
    assert statuses(out) == [502], out


# 6. HOP-08: hop-by-hop fields of a response, and those its Connection names, stay behind.


def test_HOP_08_response_hop_by_hop_fields_are_dropped(scripted):
    async def script(reader, writer, n):
        while True:
            await backend.read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: secret\r\n"
                b"Keep-Alive: timeout=99\r\nX-End: 1\r\nContent-Length: 2\r\n\r\nok"
            )
            await writer.drain()

    proxy, backend = scripted(script)
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=1)
    [(head, body)] = split_responses(out)
    assert body == b"ok" and header(head, b"x-end") == [b"1"]
    assert b"secret" not in out and b"x-resp-hop" not in out.lower()
    assert not header(head, b"keep-alive")


# IPv6 client: Forwarded quotes the node, a synthesised Host brackets the address.


def test_ipv6_client_forwarded_and_host(redis_server, loop_thread, start_proxy):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")
    backend = HttpBackend(loop_thread, "v6front").start()
    redis_server.cli("RPUSH", "servers", backend.address)
    from redlb.store.embedded import free_port

    port = free_port()
    start_proxy(redis_server.url, "--listen", f"[::1]:{port}")
    sock = socket.create_connection(("::1", port), timeout=3)
    sock.sendall(b"GET /v6 HTTP/1.0\r\n\r\n")
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    backend.stop()
    assert statuses(out) == [200], out
    got = backend.received[-1]
    assert got.header(b"host") == [b"[::1]:%d" % port]
    assert got.header(b"forwarded") == [b'for="[::1]";host="[::1]:%d";proto=http' % port]
    assert got.header(b"x-forwarded-for") == [b"::1"]
