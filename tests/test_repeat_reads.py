"""A read that repeats the last one byte for byte is not parsed again (downstream.py and
upstream.py, rule 5): what the client and the backend see must stay what parsing gives."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time

from support import ScriptedBackend, read_response, statuses, wait_for

GET = b"GET /same HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n"


def _ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_response(sock)


def _body(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def test_a_repeated_get_follows_a_route_change(redis_server, backends, start_proxy):
    a, b, _ = backends
    redis_server.cli("RPUSH", "api", a.address)
    redis_server.cli("RPUSH", "web", b.address)
    redis_server.cli("HSET", "redlb:routes", "/same", "api")
    redis_server.cli("HSET", "redlb:routes", "/other", "web")  # routes stay configured
    proxy = start_proxy(redis_server.url)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for _ in range(3):
            assert _body(_ask(sock, GET)).split()[1] == b"b0"
        redis_server.cli("HSET", "redlb:routes", "/same", "web")
        # The table is replaced once the worker sees the change: from then on, every repeat
        # of the same bytes goes to the new pool.
        assert wait_for(lambda: _body(_ask(sock, GET)).split()[1] == b"b1", 10.0, interval=0.05)
        for _ in range(3):
            assert _body(_ask(sock, GET)).split()[1] == b"b1"
        redis_server.cli("HDEL", "redlb:routes", "/same")
        assert wait_for(lambda: _ask(sock, GET).startswith(b"HTTP/1.1 404"), 10.0, interval=0.05)
        assert _ask(sock, GET).startswith(b"HTTP/1.1 404")
    assert len(a.received) >= 3 and len(b.received) >= 4


def test_repeated_bytes_split_or_pipelined_are_each_one_request(
    redis_server, backends, start_proxy
):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
        assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
        sock.sendall(GET[:20])
        time.sleep(0.2)  # two reads: the first is not the whole request
        assert _ask(sock, GET[20:]).startswith(b"HTTP/1.1 200")
        sock.sendall(GET * 2)  # one read holding two requests: both answered, in order
        both = b""
        while len(statuses(both)) < 2 or not both.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, both
            both += chunk
        assert statuses(both) == [200, 200], both
        assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
        # The same bytes with a body after them are another request (a POST's body, say).
        post = b"POST /same HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz"
        assert _ask(sock, post).startswith(b"HTTP/1.1 200")
        assert _ask(sock, post).startswith(b"HTTP/1.1 200")
        assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
    received = backends[0].received
    assert wait_for(lambda: len(received) == 9), len(received)
    assert [r.method for r in received] == [b"GET"] * 6 + [b"POST"] * 2 + [b"GET"]
    assert [r.body for r in received[6:8]] == [b"xyz", b"xyz"]


def test_a_repeated_request_after_a_bad_one_is_refused_with_it(redis_server, backends, start_proxy):
    """Bytes after a refused request are never taken for the last good one."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
        answer = _ask(sock, b"GET /same HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\x01\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
        try:
            sock.sendall(GET)
            after = sock.recv(65536)
        except ConnectionError:
            after = b""
        assert after == b""  # closed after the refusal: nothing more is answered
    assert len(backends[0].received) == 1


def _same_head_backend(loop_thread, junk_after: int = 0) -> ScriptedBackend:  # type: ignore[no-untyped-def]
    """Answers every request with one head (Content-Length: 5) and the body ``nNNNN``; after
    request number ``junk_after`` on a connection, a few bytes no request asked for."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        n = 0
        while True:
            head = await backend.read_request(reader)
            n += 1
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Same: 1\r\n\r\n")
            else:
                body = b"n%04d" % len(backend.requests)
                junk = b"HTTP/1.1 200 OK\r\n" if n == junk_after else b""  # in the same read
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Same: 1\r\n\r\n" + body + junk
                )
            await writer.drain()

    backend = ScriptedBackend(loop_thread, script).start()
    return backend


def test_a_backend_repeating_its_head_gets_each_body_through(
    redis_server, loop_thread, start_proxy
):
    backend = _same_head_backend(loop_thread)
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        seen = []
        for method in ("GET", "GET", "GET", "HEAD", "GET", "GET"):
            conn.request(method, "/same")
            resp = conn.getresponse()
            seen.append((resp.status, resp.getheader("X-Same"), resp.read()))
        conn.close()
        assert seen == [
            (200, "1", b"n0001"),
            (200, "1", b"n0002"),
            (200, "1", b"n0003"),
            (200, "1", b""),
            (200, "1", b"n0005"),
            (200, "1", b"n0006"),
        ], seen
        assert backend.connections == 1  # every answer was whole: the connection was reused
    finally:
        backend.stop()


def test_junk_after_a_repeated_response_still_poisons_the_connection(
    redis_server, loop_thread, start_proxy
):
    backend = _same_head_backend(loop_thread, junk_after=3)
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            bodies = [_body(_ask(sock, GET)) for _ in range(5)]
        assert bodies == [b"n0001", b"n0002", b"n0003", b"n0004", b"n0005"], bodies
        # The third answer came with bytes after it (upstream rule 3): that connection is
        # never used again, the fourth request is sent on a new one.
        assert backend.connections == 2
    finally:
        backend.stop()
