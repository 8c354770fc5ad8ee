"""Flow control and deadlines from the attacker's side: slow, silent, greedy and vanishing peers.

Every connection must end by a deadline, memory and descriptors stay bounded, a retried body
reaches a backend whole or not at all, and /-/live answers throughout.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time

import pytest

from redlb.address import Backend
from redlb.proxy import deadlines
from redlb.proxy.replay import ReplayBuffer
from redlb.proxy.retry import may_retry
from support import (
    HttpBackend,
    ScriptedBackend,
    open_fds,
    peak_rss,
    raw_exchange,
    request,
    rss_bytes,
    statuses,
    wait_for,
)

MB = 1024 * 1024
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


def _unread_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so the proxy sees a full pipe at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _drained_until_closed(sock: socket.socket, limit: int, timeout: float = 10) -> tuple[int, bool]:
    """Read everything; return (bytes read, whether the proxy ended the connection)."""
    sock.settimeout(timeout)
    total = 0
    try:
        while total < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return total, True
            total += len(chunk)
    except ConnectionResetError:
        return total, True
    except TimeoutError:
        return total, False
    return total, False


def _client_sockets(proxy) -> int:  # type: ignore[no-untyped-def]
    """The proxy's sockets accepted from clients (not its listeners, not its backends)."""
    import psutil

    conns = psutil.Process(proxy.pid).net_connections("tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == proxy.port and c.raddr)


def _live(proxy) -> bool:  # type: ignore[no-untyped-def]
    return proxy.status("/-/live")[0] == 200


@pytest.fixture
def two(redis_server, backends, start_proxy):  # type: ignore[no-untyped-def]
    def make(*args: str):  # type: ignore[no-untyped-def]
        redis_server.cli("RPUSH", "servers", backends[0].address, backends[1].address)
        return start_proxy(redis_server.url, *args)

    return make


# Defect 1: a retry resends the whole body or nothing


def _chunked_put(port: int, body: bytes, piece: int, pause: float) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), piece):
            part = body[start : start + piece]
            sock.sendall(b"%x\r\n%b\r\n" % (len(part), part))
            time.sleep(pause)
        sock.sendall(b"0\r\n\r\n")
        out = b""
        while b"\r\n\r\n" not in out or not out.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        sock.close()


def test_retried_put_waiting_for_a_connection_is_resent_whole(
    redis_server, loop_thread, start_proxy
):  # type: ignore[no-untyped-def]
    """First backend answers 503 after 30 KB; the retry waits for the second backend's only
    connection while the rest of the body arrives: the second backend gets all of it."""

    async def overloaded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"PUT"):
                seen = 0
                while seen < 30_000:
                    seen += len(await reader.read(65536))
                writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA\n")

    first = ScriptedBackend(loop_thread, overloaded).start()
    second = HttpBackend(loop_thread, "second").start()
    try:
        redis_server.cli("RPUSH", "servers", first.address, second.address)
        proxy = start_proxy(
            redis_server.url, "--max-conns-per-backend", "1", "--queue-timeout", "10"
        )
        # Find the rotation's phase: the request after one answered by `first` goes to `second`.
        for _ in range(4):
            _, body, _ = proxy.get("/")
            if body == b"A\n":
                break
        else:
            pytest.fail("the first backend was never picked")
        second.behaviour.delay = 2.0
        holder = threading.Thread(target=proxy.get, args=("/hold",), daemon=True)
        holder.start()  # takes the second backend's only connection for 2 s
        assert wait_for(lambda: second.connections >= 1 and len(second.writers) >= 1, 5)
        time.sleep(0.3)
        body = bytes(range(256)) * 390 + b"tail"  # 99,844 bytes
        out = _chunked_put(proxy.port, body, 10_000, 0.1)
        holder.join(10)
        puts = [r for r in second.received if r.method == b"PUT"]
        for received in puts:  # never a partial or duplicated body at a backend
            assert received.body_len == len(body), received.body_len
            assert received.body_sha == hashlib.sha256(body).hexdigest()
        assert statuses(out) == [200], out[:200]
        assert len(puts) == 1
    finally:
        first.stop()
        second.stop()


def test_post_answered_503_mid_body_is_never_sent_twice(redis_server, loop_thread, start_proxy):  # type: ignore[no-untyped-def]
    async def overloaded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int):
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1000)
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()

    first = ScriptedBackend(loop_thread, overloaded).start()
    second = HttpBackend(loop_thread, "second").start()
    try:
        redis_server.cli("RPUSH", "servers", first.address, second.address)
        proxy = start_proxy(redis_server.url)
        results = []
        for _ in range(4):
            status, _, _ = request(proxy.port, "POST", "/echo", body=b"p" * 50_000)
            results.append(status)
        assert set(results) <= {200, 503}, results
        assert first.connections + second.count() == 4  # each POST reached one backend once
        for received in second.received:
            assert received.body_len == 50_000
    finally:
        first.stop()
        second.stop()


# Defect 2: a slow upload is the client's time, not the backend's


def test_slow_uploads_are_not_backend_timeouts(two, redis_server):  # type: ignore[no-untyped-def]
    proxy = two("--upstream-timeout", "2")
    body = b"u" * 40_000
    results: list[int] = []

    def upload() -> None:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
        out = b""
        try:
            sock.sendall(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
            for start in range(0, len(body), 1000):  # 10 kB/s: four seconds
                sock.sendall(body[start : start + 1000])
                time.sleep(0.1)
            while not out.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:  # cut off early (a 504 closes the connection mid-upload)
            pass
        finally:
            sock.close()
        results.extend(statuses(out) or [0])

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [200] * 4, results
    assert redis_server.cli("KEYS", "redlb:servers:ejected:*").strip() == ""


# Defect 3: a client that stops reading is cut off by the send deadline


def test_client_that_never_reads_is_aborted_and_frees_the_backend(
    redis_server, backends, start_proxy
):  # type: ignore[no-untyped-def]
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(
        redis_server.url, "--max-conns-per-backend", "2", "--send-timeout", "2",
        "--upstream-timeout", "2", "--queue-timeout", "1",
    )  # fmt: skip
    fds = open_fds(proxy.pid)
    stalled = [_unread_socket(proxy.port) for _ in range(2)]  # every backend connection
    with peak_rss(proxy.pid) as rss:
        for sock in stalled:
            sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (64 * MB))
        time.sleep(0.5)
        assert _live(proxy)
        time.sleep(3.5)  # send deadline 2 s + sweep + slack
        for _ in range(3):  # the backend connections are free again
            assert proxy.get("/")[0] == 200
    for sock in stalled:
        read, ended = _drained_until_closed(sock, 64 * MB, timeout=3)
        assert ended and read < 64 * MB, (read, ended)
        sock.close()
    assert rss["peak"] - rss["start"] < 32 * MB
    assert wait_for(lambda: open_fds(proxy.pid) <= fds + 2, 5), open_fds(proxy.pid)


def test_client_reading_one_byte_a_second_is_cut_off(one_proxy):  # type: ignore[no-untyped-def]
    proxy = one_proxy("--send-timeout", "2")
    sock = _unread_socket(proxy.port)
    sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (8 * MB))
    deadline = time.monotonic() + 4  # send deadline 2 s + sweep + slack
    while time.monotonic() < deadline and sock.recv(1):
        time.sleep(0.5)
    # Whatever the kernel still holds can be read; then the connection is gone.
    read, ended = _drained_until_closed(sock, 8 * MB, timeout=3)
    sock.close()
    assert ended and read < 4 * MB, (read, ended)
    assert proxy.get("/")[0] == 200


@pytest.fixture
def one_proxy(redis_server, backends, start_proxy):  # type: ignore[no-untyped-def]
    def make(*args: str):  # type: ignore[no-untyped-def]
        redis_server.cli("RPUSH", "servers", backends[0].address)
        return start_proxy(redis_server.url, *args)

    return make


# Defect 4: backpressure holds for every pipelined response


def test_unread_pipelined_responses_hold_bounded_memory(one_proxy, backends):  # type: ignore[no-untyped-def]
    proxy = one_proxy("--send-timeout", "30")
    backends[0].behaviour.close_after = True  # each answer needs a new backend connection
    sock = _unread_socket(proxy.port)
    with peak_rss(proxy.pid) as rss:
        small = b"GET /big/60000 HTTP/1.1\r\nHost: t\r\n\r\n"
        sock.sendall(small * 50 + b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (32 * MB))
        time.sleep(3)
        assert _live(proxy)
        assert proxy.get("/")[0] == 200
    sock.close()
    assert rss["peak"] - rss["start"] < 8 * MB, rss["peak"] - rss["start"]


# Defect 5: the header deadline holds for every request on a connection


def test_slowloris_after_a_complete_request(one_proxy):  # type: ignore[no-untyped-def]
    proxy = one_proxy("--header-timeout", "1", "--keepalive-timeout", "30")
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(GET + b"GET /x HTTP/1.1\r\n")
    out = b""
    ended = False
    deadline = time.monotonic() + 6  # header timeout 1 s + sweep + slack
    sock.settimeout(0.5)
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"X")  # one byte now and then: never a full header line
                continue
            if not chunk:
                ended = True
                break
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        ended = True
    sock.close()
    assert ended, out
    assert statuses(out) in ([200, 408], [200])


# Defect 8: drain delivers what is already buffered


def test_drain_delivers_a_response_buffered_for_a_slow_reader(one_proxy):  # type: ignore[no-untyped-def]
    # The drain deadline is a bound, not a speed: a loaded machine reads 4 MB slowly.
    proxy = one_proxy("--drain-timeout", "60")
    size = 4_000_000
    sock = _unread_socket(proxy.port)
    sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
    data = sock.recv(65536)
    proxy.process.send_signal(15)  # SIGTERM: the response in flight must still arrive whole
    sock.settimeout(10)
    try:
        while True:
            chunk = sock.recv(16384)
            if not chunk:
                break
            data += chunk
            # About 800 kB/s whatever size recv returns (a fixed sleep per recv read 200 kB/s
            # here, past the drain timeout): the tail is still buffered when the backend is done.
            time.sleep(len(chunk) / 800_000)
    except ConnectionResetError:
        pass
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert len(body) == size, len(body)
    assert proxy.process.wait(15) == 0


# Beyond the list: peers that vanish at every phase


def test_disconnects_at_every_phase_leave_nothing_behind(redis_server, backends, start_proxy):  # type: ignore[no-untyped-def]
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(
        redis_server.url, "--max-conns-per-backend", "1", "--queue-timeout", "5",
        "--send-timeout", "2",
    )  # fmt: skip
    assert proxy.get("/")[0] == 200
    fds = open_fds(proxy.pid)
    rss = rss_bytes(proxy.pid)
    backends[0].behaviour.delay = 1.0
    holder = threading.Thread(target=proxy.get, args=("/hold",), daemon=True)
    holder.start()  # the only backend connection is busy: the next request queues
    time.sleep(0.2)
    phases = [
        b"GET /x HTTP/1.1\r\nHost",  # mid-head
        b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000,
        GET,  # queued for the busy connection
    ]
    for _ in range(5):
        for data in phases:
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(data)
            time.sleep(0.05)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # RST
    holder.join(10)
    backends[0].behaviour.delay = 0.0
    for _ in range(5):  # mid-response
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (16 * MB))
        sock.recv(65536)
        sock.close()
    # Half-close: the answer still arrives, then the connection ends.
    out, closed = raw_exchange(proxy.port, GET, timeout=3)
    assert statuses(out) == [200]
    assert _live(proxy)
    assert wait_for(lambda: proxy.get("/")[0] == 200, 5)
    assert wait_for(lambda: open_fds(proxy.pid) <= fds + 2, 8), open_fds(proxy.pid)
    assert rss_bytes(proxy.pid) - rss < 32 * MB


def test_half_closed_client_with_a_big_answer_gets_all_of_it(one_proxy):  # type: ignore[no-untyped-def]
    proxy = one_proxy()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (4 * MB))
    sock.shutdown(socket.SHUT_WR)
    read, ended = _drained_until_closed(sock, 8 * MB)
    sock.close()
    assert ended and read > 4 * MB


def test_every_connection_ends_by_a_deadline(redis_server, backends, start_proxy):  # type: ignore[no-untyped-def]
    """Peers that stop at every phase and never close: the proxy ends each connection."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(
        redis_server.url, "--header-timeout", "1", "--keepalive-timeout", "1",
        "--send-timeout", "1", "--body-rate-grace", "1", "--body-min-rate", "1000",
        "--upstream-timeout", "2",
    )  # fmt: skip
    assert proxy.get("/")[0] == 200
    fds = open_fds(proxy.pid)
    openers = [
        b"",  # silent
        b"GET /x HTTP/1.1\r\nHo",  # mid-head
        b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nabc",  # mid-body
        GET,  # answered, then idle keep-alive
        GET + b"GET /x HTTP/1.1\r\n",  # answered, then a pipelined head that never ends
        b"GET /big/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (32 * MB),  # never reads
    ]
    peers = []
    for data in openers * 3:
        sock = _unread_socket(proxy.port)
        if data:
            sock.sendall(data)
        peers.append(sock)
    time.sleep(0.5)
    assert _client_sockets(proxy) == len(peers)
    assert _live(proxy)
    # The longest bar: body grace 1 s + rate, send 1 s; two sweeps and slack.
    assert wait_for(lambda: _client_sockets(proxy) == 0, 8), _client_sockets(proxy)
    # Beyond those: listeners, Redis, and the backend connections pooled by the answers.
    assert open_fds(proxy.pid) <= fds + len(openers) * 3
    assert _live(proxy) and proxy.get("/")[0] == 200
    for sock in peers:
        sock.close()


def test_backend_that_stops_reading_the_body_is_a_backend_timeout(
    redis_server, loop_thread, start_proxy
):  # type: ignore[no-untyped-def]
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)  # never reads the body

    backend = ScriptedBackend(loop_thread, deaf).start()
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url, "--upstream-timeout", "2", "--max-body", "0")
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (256 * MB))
        out = b""
        sock.settimeout(0.05)
        deadline = time.monotonic() + 8  # upstream timeout 2 s + sweep + slack
        piece = b"b" * MB  # fast enough to fill every buffer on the way within a second
        while time.monotonic() < deadline and b"\r\n\r\n" not in out:
            try:
                sock.send(piece)
            except TimeoutError:
                pass
            except OSError:
                break
            try:
                out += sock.recv(65536)
            except TimeoutError:
                pass
            except OSError:
                break
        cut = time.monotonic() < deadline
        sock.close()
        # The 504 may be lost to the reset of closing on an unread upload (no lingering
        # close yet); either way the exchange ended on the backend's deadline.
        proxy.stop()  # flushes the access log
        assert statuses(out) == [504] or (cut and "POST /x => 504" in proxy.access_log())
    finally:
        backend.stop()


def _recording_backend(loop_thread, fail_first: bool):  # type: ignore[no-untyped-def]
    """Reads whole Content-Length requests and records each body's sha256; with
    ``fail_first``, resets its first connection after reading the whole request."""
    bodies: list[str] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            bodies.append(hashlib.sha256(body).hexdigest())
            if fail_first and n == 1:
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return ScriptedBackend(loop_thread, script).start(), bodies


@pytest.mark.parametrize(
    "method, size, resent",
    [
        ("PUT", 50_000, True),  # idempotent and kept whole: resent once, whole
        ("PUT", 200_000, False),  # too big to keep: 502, sent once
        ("POST", 50_000, False),  # not idempotent: 502, sent once
    ],
)
def test_reset_after_the_body_resends_whole_or_not_at_all(
    redis_server, loop_thread, start_proxy, method, size, resent
):  # type: ignore[no-untyped-def]
    backend, bodies = _recording_backend(loop_thread, fail_first=True)
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        body = hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)
        status, _, _ = request(proxy.port, method, "/r", body=body)
        digest = hashlib.sha256(body).hexdigest()
        assert bodies.count(digest) == len(bodies)  # never a partial body
        if resent:
            assert status == 200 and len(bodies) == 2
        else:
            assert status == 502 and len(bodies) == 1
    finally:
        backend.stop()


# The pure pieces, without sockets


def test_replay_buffer_is_whole_or_gone():
    replay = ReplayBuffer(limit=10)
    replay.add(b"abcd")
    replay.add(b"efgh")
    assert replay.whole and replay.copy() == [b"abcd", b"efgh"] and replay.size == 8
    copy = replay.copy()
    copy.append(b"x")  # a retry's pending list is its own
    assert replay.copy() == [b"abcd", b"efgh"]
    replay.add(b"ijk")  # 11 > 10: the copy is gone, not trimmed
    assert not replay.whole
    replay.add(b"l")
    assert not replay.whole
    with pytest.raises(AssertionError):
        replay.copy()


def test_replay_buffer_exactly_at_the_limit_is_kept():
    replay = ReplayBuffer(limit=4)
    replay.add(b"abcd")
    assert replay.whole and replay.copy() == [b"abcd"]


A, B = Backend("10.0.0.1", 80), Backend("10.0.0.2", 80)


@pytest.mark.parametrize(
    "sent, idempotent, whole, replayed, attempts, tried, elsewhere, expected",
    [
        (False, False, False, False, 1, [A], False, True),  # connect failure: any method
        (True, False, True, False, 1, [A], False, False),  # POST already sent: never again
        (True, True, True, False, 1, [A], False, True),  # GET, keep-alive race
        (True, True, False, False, 1, [A], False, False),  # body copy gone
        (True, True, True, True, 2, [A, B], False, False),  # resent once already
        (True, True, True, False, 3, [A], False, False),  # attempts used up
        (True, True, True, False, 1, [A, B], True, False),  # 503 everywhere tried
        (True, True, True, False, 1, [A], True, True),  # 503: B not tried yet
    ],
)
def test_may_retry(sent, idempotent, whole, replayed, attempts, tried, elsewhere, expected):
    healthy = (A, B)
    args = (sent, idempotent, whole, replayed, attempts, 3, healthy, tried, elsewhere)
    assert may_retry(*args) is expected


def test_may_retry_without_a_healthy_backend():
    assert not may_retry(False, True, True, False, 1, 3, (), [A], False)


@pytest.mark.parametrize(
    "header, idle, send, expected",
    [
        (0.0, 0.0, 0.0, deadlines.KEEP),
        (11.0, 0.0, 0.0, deadlines.KEEP),
        (9.0, 0.0, 0.0, deadlines.REFUSE),
        (0.0, 9.0, 0.0, deadlines.CLOSE),
        (0.0, 9.0, 11.0, deadlines.CLOSE),  # the close flushes; the send deadline still holds
        (9.0, 9.0, 9.0, deadlines.ABORT),  # a 408 cannot reach a client that does not read
        (9.0, 0.0, 11.0, deadlines.REFUSE),
    ],
)
def test_deadline_verdict(header, idle, send, expected):
    assert deadlines.verdict(10.0, header, idle, send) == expected
