"""WebSocket tunnelling (issue 11): a real `websockets` server behind a real `redlb serve`,
real `websockets` clients, and raw sockets for the hostile side."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support import (
    WS_ACCEPT,
    HttpBackend,
    ScriptedBackend,
    assert_flood_held_back,
    metric,
    open_fds,
    raw_exchange,
    read_response,
    statuses,
    wait_for,
    ws_frame,
    ws_handshake,
    ws_tunnel,
)


@pytest.fixture
def ws_proxy(redis_server, echo, start_proxy):
    def make(*args: str):
        redis_server.cli("RPUSH", "servers", echo.address)
        return start_proxy(redis_server.url, *args)

    return make


def url(proxy, path: str = "/") -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


def test_text_and_binary_messages_are_echoed(ws_proxy, echo):
    proxy = ws_proxy()
    with connect(url(proxy, "/chat"), open_timeout=10) as ws:
        ws.send("hello ✓")
        assert ws.recv(timeout=10) == "hello ✓"
        ws.send(b"\x00\xffbinary")
        assert ws.recv(timeout=10) == b"\x00\xffbinary"
    assert echo.paths == ["/chat"]
    # The backend got the handshake with redlb's forwarding fields.
    assert echo.headers[0]["x-forwarded-for"] == "127.0.0.1"
    assert wait_for(lambda: echo.closes == [1000], 10)


def test_a_16_mb_message_both_ways(ws_proxy):
    proxy = ws_proxy()
    big = hashlib.sha256(b"seed").digest() * (16 * 1024 * 1024 // 32)
    with connect(url(proxy), open_timeout=10, max_size=None) as ws:
        ws.send(big)
        got = ws.recv(timeout=60)
    assert len(got) == len(big) and got == big


def test_ping_pong(ws_proxy):
    proxy = ws_proxy()
    with connect(url(proxy), open_timeout=10) as ws:
        pong = ws.ping(b"are you there")
        assert pong.wait(10)


def test_close_codes_both_ways(ws_proxy, echo):
    proxy = ws_proxy()
    with (
        connect(url(proxy, "/close/4001"), open_timeout=10) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "bye"
    ws = connect(url(proxy), open_timeout=10)
    ws.close(4002, "client leaves")
    assert wait_for(lambda: 4002 in echo.closes, 10)


def test_tunnel_gauge_and_connections_count_the_tunnel(ws_proxy, echo):
    proxy = ws_proxy()
    with connect(url(proxy), open_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 1, 10)
        assert (metric(proxy, "redlb_open_connections") or 0) >= 1
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 10)
    assert metric(proxy, "redlb_tunnels_total") == 1


def test_routed_websocket_goes_to_its_routes_pool(redis_server, loop_thread, start_proxy, echo):
    other = HttpBackend(loop_thread, "plain").start()
    try:
        redis_server.cli("RPUSH", "servers", other.address)
        redis_server.cli("RPUSH", "live", echo.address)
        redis_server.cli("HSET", "redlb:routes", "/ws", "live")
        redis_server.cli("HSET", "redlb:routes", "/", "servers")
        proxy = start_proxy(redis_server.url)
        assert wait_for(lambda: proxy.get("/")[1] == b"ok plain\n", 10)
        with connect(url(proxy, "/ws/room"), open_timeout=10) as ws:
            ws.send("routed")
            assert ws.recv(timeout=10) == "routed"
        assert echo.paths == ["/ws/room"]
    finally:
        other.stop()


def test_non_websocket_upgrade_tokens_are_not_tunnelled(ws_proxy, redis_server, loop_thread):
    plain = HttpBackend(loop_thread, "plain").start()
    try:
        redis_server.cli("DEL", "servers")
        proxy = ws_proxy()
        redis_server.cli("DEL", "servers")
        redis_server.cli("RPUSH", "servers", plain.address)
        raw = b"GET /u HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: foo/2\r\n\r\n"
        assert wait_for(lambda: b"ok plain" in raw_exchange(proxy.port, raw, timeout=2)[0], 10)
        got = [r for r in plain.received if r.url == b"/u"][-1]
        assert not got.header(b"upgrade")
    finally:
        plain.stop()


# Answers that must not make a tunnel


def _scripted(redis_server, loop_thread, start_proxy, reply: bytes):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.5)

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    return start_proxy(redis_server.url), backend


@pytest.mark.parametrize(
    "case, reply",
    [
        (
            "wrong accept",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\nRAW",
        ),
        (
            "no accept",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW",
        ),
        (
            "no upgrade",
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\nRAW",
        ),
        (
            "another protocol",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\nRAW",
        ),
    ],
)
def test_a_101_that_does_not_complete_the_handshake_is_502(
    redis_server, loop_thread, start_proxy, case, reply
):
    proxy, backend = _scripted(redis_server, loop_thread, start_proxy, reply)
    out, _ = raw_exchange(proxy.port, ws_handshake(), timeout=3)
    assert statuses(out) == [502], out
    assert b"RAW" not in out
    backend.stop()


def test_a_101_to_a_plain_get_is_502(redis_server, loop_thread, start_proxy):
    reply = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\nRAW"
    )
    proxy, backend = _scripted(redis_server, loop_thread, start_proxy, reply)
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=3)
    assert statuses(out) == [502] and b"RAW" not in out
    backend.stop()


def test_a_refused_handshake_is_relayed_and_the_connection_stays_http(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        while True:
            head = await backend.read_request(reader)
            if b"upgrade" in head.lower():
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            await writer.drain()

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    # The handshake and a plain request pipelined behind it, on one connection.
    out, _ = raw_exchange(
        proxy.port, ws_handshake() + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n", timeout=3
    )
    assert statuses(out) == [403, 200], out
    assert out.endswith(b"plain")
    with pytest.raises(InvalidStatus):
        connect(url(proxy), open_timeout=10)
    backend.stop()


def test_handshake_problems_get_a_clear_400(ws_proxy):
    proxy = ws_proxy()
    no_key = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    post = (
        b"POST / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: " + base64.b64encode(b"k" * 16) + b"\r\n\r\n"
    )
    for raw in (no_key, post):
        out, _ = raw_exchange(proxy.port, raw, timeout=3)
        assert statuses(out) == [400], out


# Faults


def test_backend_killed_mid_message(redis_server, loop_thread, start_proxy):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
        )
        # A frame announcing 1 MB, cut after 1000 bytes: the backend dies mid-message.
        writer.write(bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big") + b"m" * 1000)
        await writer.drain()
        writer.transport.abort()

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    baseline = open_fds(proxy.pid)
    sock, got = ws_tunnel(proxy.port)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    sock.close()
    assert got.startswith(bytes([0x82, 127])) and len(got) == 10 + 1000
    assert wait_for(lambda: open_fds(proxy.pid) <= baseline, 10)
    backend.stop()


def test_backend_killed_mid_stream_websockets_client(ws_proxy, echo):
    proxy = ws_proxy()
    ws = connect(url(proxy), open_timeout=10)
    ws.send("before")
    assert ws.recv(timeout=10) == "before"

    async def cut() -> None:  # the backend dies: no close frame, a reset
        for conn in list(echo.server.connections):
            conn.transport.abort()

    echo.loop.run(cut())
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is None  # no close frame: the cut shows as one (1006)
    ws.close()


def test_client_vanishing_closes_the_backend_connection(ws_proxy, echo):
    proxy = ws_proxy()
    baseline = open_fds(proxy.pid)
    sock, _ = ws_tunnel(proxy.port)
    sock.sendall(ws_frame(b"hi", opcode=1))
    assert wait_for(lambda: echo.open == 1, 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()  # a reset: the client is gone
    assert wait_for(lambda: echo.open == 0, 10)
    assert wait_for(lambda: open_fds(proxy.pid) <= baseline, 10)
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 10)


def test_idle_tunnel_is_closed_on_both_sides(ws_proxy, echo):
    proxy = ws_proxy("--tunnel-timeout", "1")
    ws = connect(url(proxy), open_timeout=10, ping_interval=None)
    ws.send("x")
    assert ws.recv(timeout=10) == "x"
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=15)
    assert wait_for(lambda: echo.open == 0, 10)


def test_client_that_never_reads_stays_bounded(ws_proxy, echo):
    """The client sends 1 MB frames to the echo and never reads an echo: redlb must stop
    reading from it (flow control both ways), so its memory stays bounded."""
    proxy = ws_proxy()
    sock, _ = ws_tunnel(proxy.port)
    assert_flood_held_back(sock, proxy.pid)
    sock.close()


def test_backend_that_never_reads_stays_bounded(redis_server, loop_thread, start_proxy):
    stop = asyncio.Event()

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
        )
        await writer.drain()
        await asyncio.wait_for(stop.wait(), 60)

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    sock, _ = ws_tunnel(proxy.port)
    assert_flood_held_back(sock, proxy.pid)
    sock.close()
    loop_thread.loop.call_soon_threadsafe(stop.set)
    backend.stop()


def test_drain_closes_tunnels_after_the_drain_timeout_while_requests_finish(
    redis_server, loop_thread, start_proxy, echo
):
    slow = HttpBackend(loop_thread, "slow").start()
    slow.behaviour.delay = 2.0
    try:
        redis_server.cli("RPUSH", "plain", slow.address)
        redis_server.cli("RPUSH", "servers", echo.address)
        redis_server.cli("HSET", "redlb:routes", "/slow", "plain")
        redis_server.cli("HSET", "redlb:routes", "/", "servers")
        proxy = start_proxy(redis_server.url, "--drain-timeout", "4")
        ws = connect(url(proxy), open_timeout=10)
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        assert wait_for(lambda: slow.count() == 1, 10)
        proxy.process.send_signal(__import__("signal").SIGTERM)
        # The plain request in flight finishes; the tunnel still carries messages meanwhile.
        assert statuses(read_response(sock)) == [200]
        sock.close()
        ws.send("still")
        assert ws.recv(timeout=10) == "still"
        # Then, once the drain timeout is over, the tunnel is closed (not reset) and redlb exits.
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert wait_for(lambda: not proxy.alive(), 30)
        assert wait_for(lambda: echo.open == 0, 10)
    finally:
        slow.stop()


def test_tunnel_survives_longer_than_the_upstream_timeout(ws_proxy):
    proxy = ws_proxy("--upstream-timeout", "1")
    with connect(url(proxy), open_timeout=10, ping_interval=None) as ws:
        time.sleep(2.5)  # quiet for longer than the (request) upstream timeout
        ws.send("late")
        assert ws.recv(timeout=10) == "late"


def test_a_handshake_sent_is_never_resent_to_another_backend(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.transport.abort()  # took the handshake, then died without an answer

    backend = ScriptedBackend(loop_thread, script).start()
    other = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address, other.address)
    proxy = start_proxy(redis_server.url, "--eject-consecutive", "0")
    out, _ = raw_exchange(proxy.port, ws_handshake(), timeout=5)
    assert statuses(out) == [502]
    assert len(backend.requests) + len(other.requests) == 1
    backend.stop()
    other.stop()


def test_handshake_rules_without_sockets():
    from redlb.proxy.errors import Reject
    from redlb.proxy.rules import asks_websocket, completes_websocket, websocket_accept

    key = [(b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")]
    assert websocket_accept(b"GET", False, key) == WS_ACCEPT  # RFC 6455 §1.3
    for method, http10, headers in ((b"POST", False, key), (b"GET", True, key),
                                    (b"GET", False, []), (b"GET", False, key * 2)):  # fmt: skip
        with pytest.raises(Reject):
            websocket_accept(method, http10, headers)
    assert asks_websocket([b"WebSocket"]) and asks_websocket([b"h2c, websocket"])
    assert not asks_websocket([b"h2c"]) and not asks_websocket([b"websocketx"])
    line = b"Sec-WebSocket-Accept: %b\r\n" % WS_ACCEPT
    assert completes_websocket(b"websocket", [line], WS_ACCEPT)
    assert not completes_websocket(None, [line], WS_ACCEPT)
    assert not completes_websocket(b"h2c", [line], WS_ACCEPT)
    assert not completes_websocket(b"websocket", [], WS_ACCEPT)
    assert not completes_websocket(b"websocket", [b"Sec-WebSocket-Accept: x\r\n"], WS_ACCEPT)


def test_half_close_is_passed_on_and_the_other_way_keeps_flowing(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
        )
        got = await reader.read()  # up to the client's EOF, passed on by redlb
        writer.write(b"after your EOF: %d bytes" % len(got))
        await writer.drain()

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    sock, got = ws_tunnel(proxy.port)
    sock.sendall(b"x" * 100_000)
    sock.shutdown(socket.SHUT_WR)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    sock.close()
    assert got == b"after your EOF: 100000 bytes"
    backend.stop()


def test_a_101_after_a_whole_response_is_junk_not_a_tunnel(redis_server, loop_thread, start_proxy):
    reply = (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\nRAW"
    )
    proxy, backend = _scripted(redis_server, loop_thread, start_proxy, reply)
    out, _ = raw_exchange(proxy.port, ws_handshake(), timeout=3)
    assert statuses(out) == [403] and out.endswith(b"\r\n\r\nno"), out
    backend.stop()


def test_many_tunnels_open_and_close_without_leaking(ws_proxy, echo, loop_thread):
    from websockets.asyncio.client import connect as aconnect

    proxy = ws_proxy()
    baseline = open_fds(proxy.pid)

    async def one(i: int) -> str:
        async with aconnect(url(proxy, f"/m{i}"), open_timeout=20) as ws:
            await ws.send(f"n{i}")
            return await asyncio.wait_for(ws.recv(), 20)

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(100)))

    assert loop_thread.run(all_of_them(), timeout=60) == [f"n{i}" for i in range(100)]
    assert wait_for(lambda: echo.open == 0, 10)
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 10)
    assert wait_for(lambda: open_fds(proxy.pid) <= baseline, 10)
    assert metric(proxy, "redlb_tunnels_total") == 100
