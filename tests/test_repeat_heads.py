"""A keep-alive client's repeated request head is built once (downstream.py rule 4): a route
or a pool setting changed between two equal heads on one connection still applies to the
second, and a head that differs in any field is built anew."""

from __future__ import annotations

import socket

from support import read_response, wait_for


def _ask(sock: socket.socket, head: bytes) -> bytes:
    sock.sendall(head)
    return read_response(sock)


def test_a_repeated_head_follows_route_and_setting_changes(redis_server, backends, start_proxy):
    a, b, _ = backends
    redis_server.cli("RPUSH", "api", a.address)
    redis_server.cli("RPUSH", "web", b.address)
    redis_server.cli("HSET", "redlb:routes", "/x", "api")
    proxy = start_proxy(redis_server.url)
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 20\r\n\r\n" + b"y" * 20
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert _answer(_ask(sock, head)) == b"b0"

        def changed_everywhere(expected: bytes) -> bool:
            """The repeated head, asked again and again on the kept connection, answers as a
            new connection does from the moment a new connection sees the change."""
            kept = _ask(sock, head)  # also keeps the connection busy (never swept as idle)
            assert not first_seen or _answer(kept) == expected, kept[:200]
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as fresh:
                if _answer(_ask(fresh, head)) == expected:
                    first_seen.append(True)
            return len(first_seen) > 1

        first_seen: list[bool] = []
        redis_server.cli("HSET", "redlb:routes", "/x", "web")
        assert wait_for(lambda: changed_everywhere(b"b1"), 10.0, interval=0)
        first_seen.clear()
        redis_server.cli("HSET", "redlb:web:settings", "max_body", "10")

        def refused_everywhere() -> bool:
            """Once a new connection gets the 413, the repeated head is refused too: a 413,
            or the connection cut with the body unread (the refusal closes it)."""
            try:
                kept = _ask(sock, head)
            except ConnectionError:
                kept = b""
            if first_seen:
                assert not kept.startswith(b"HTTP/1.1 200"), kept[:200]
                return True
            assert _answer(kept) in (b"b1", b"413"), kept[:200]
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as fresh:
                if _answer(_ask(fresh, head)) == b"413":
                    first_seen.append(True)
            return False

        assert wait_for(refused_everywhere, 10.0, interval=0)


def _answer(response: bytes) -> bytes:
    """``b0`` (the backend that served it), or the status code of a refusal."""
    body = response.partition(b"\r\n\r\n")[2]
    return body.split()[1] if body.startswith(b"ok ") else response[9:12]


def test_a_head_differing_in_one_field_is_not_taken_for_the_last(
    redis_server, backends, start_proxy
):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert _ask(sock, b"GET /a HTTP/1.1\r\nHost: h\r\nX-N: 1\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
        assert _ask(sock, b"GET /a HTTP/1.1\r\nHost: h\r\nX-N: 2\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
        # The same fields but a bad Host now: refused, not forwarded as the last head was.
        answer = _ask(sock, b"GET /a HTTP/1.1\r\nHost: a@b\r\nX-N: 2\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    seen = [r.header(b"x-n") for r in backends[0].received]
    assert seen == [[b"1"], [b"2"]], seen
