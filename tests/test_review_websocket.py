"""Adversarial review of WebSocket tunnelling and streaming (issue 11, items 1 and 4).

Real `redlb serve`, real redis-server, scripted backends on loopback sockets, raw client
sockets: each test is a way a hostile client, a hostile backend or an operator could break
the tunnel, and the invariant that must hold.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from support import (
    WS_ACCEPT,
    ScriptedBackend,
    metric,
    open_fds,
    raw_exchange,
    statuses,
    wait_for,
    ws_handshake,
)

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + WS_ACCEPT + b"\r\n\r\n"
)


def _start(redis_server, loop_thread, start_proxy, script, *args: str):
    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    return start_proxy(redis_server.url, *args), backend


def _read_until(sock: socket.socket, marker: bytes, got: bytes = b"") -> bytes:
    try:
        while marker not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except TimeoutError:
        pass
    return got


def test_early_tunnel_bytes_of_a_handshake_pipelined_behind_a_request_reach_the_backend(
    redis_server, loop_thread, start_proxy
):
    """A plain GET, then a handshake and a first frame sent at once: the frame is the
    tunnel's, so the backend must get it after its 101, never parsed as HTTP by redlb."""

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
        await writer.drain()
        await backend.read_request(reader)
        await asyncio.sleep(0.5)  # the 101 comes late: the first answer is long sent
        writer.write(SWITCH)
        await writer.drain()
        early = await asyncio.wait_for(reader.readexactly(5), 10)
        writer.write(b"backend got " + early)
        await writer.drain()
        await asyncio.sleep(1)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + ws_handshake() + b"EARLY")
    got = _read_until(sock, b"backend got")
    sock.close()
    assert b"backend got EARLY" in got, got
    backend.stop()


def test_a_burst_sent_with_the_101_to_a_client_that_never_reads_keeps_flow_control(
    redis_server, loop_thread, start_proxy
):
    """The backend's 101 and a 1 MB burst in one write, then a stream; the client never
    reads.  redlb must stop reading from the backend (its writes block), not buffer all."""
    total = 256 * (1 << 20)
    sent = [0]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH + b"b" * (1 << 20))
        await writer.drain()
        piece = b"s" * (1 << 20)
        while sent[0] < total:
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 30)
            sent[0] += len(piece)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that stalls at once
    sock.settimeout(10)
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(ws_handshake())
    time.sleep(1)
    # Bounded: whatever the kernel buffers hold, the rest waits in the backend.
    wait_for(lambda: sent[0] >= total, 8)
    assert sent[0] < total, f"redlb took {sent[0] >> 20} MB the client never read"
    sock.close()
    backend.stop()


def test_interim_responses_before_the_101_are_skipped(redis_server, loop_thread, start_proxy):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(SWITCH + b"HELLO")
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(4), 10)
        writer.write(got)
        await writer.drain()
        await asyncio.sleep(1)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake())
    got = _read_until(sock, b"HELLO")
    assert got.startswith(b"HTTP/1.1 101 "), got
    assert got.endswith(b"\r\n\r\nHELLO"), got
    sock.sendall(b"ping")
    assert _read_until(sock, b"ping") == b"ping"
    sock.close()
    backend.stop()


def test_101_and_data_in_one_packet_reach_the_client_in_order(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH + b"".join(b"%06d" % i for i in range(20000)))
        await writer.drain()
        await asyncio.sleep(2)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake())
    expected = b"".join(b"%06d" % i for i in range(20000))
    got = _read_until(sock, expected[-12:])
    assert got.partition(b"\r\n\r\n")[2] == expected
    sock.close()
    backend.stop()


def _echo_after_101(backend_ref):
    """A raw backend: 101, then echo every byte until the client's EOF."""

    async def script(reader, writer, n):
        await backend_ref[0].read_request(reader)
        writer.write(SWITCH)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    return script


def test_connection_and_upgrade_field_variants_all_tunnel(redis_server, loop_thread, start_proxy):
    ref: list[ScriptedBackend] = []
    proxy, backend = _start(redis_server, loop_thread, start_proxy, _echo_after_101(ref))
    ref.append(backend)
    key = b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    for fields in (
        b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
        b"Connection: UPGRADE\r\nUpgrade: WebSocket\r\n",
        b"Connection: keep-alive\r\nConnection: upgrade\r\nUpgrade: websocket\r\n",
        b"Connection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: websocket\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket, h2c\r\n",
    ):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + key + b"\r\n")
        head = _read_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), (fields, head)
        sock.sendall(b"echo me")
        assert _read_until(sock, b"echo me", head.partition(b"\r\n\r\n")[2]) == b"echo me"
        sock.close()
    backend.stop()


def test_near_miss_tokens_are_not_tunnelled(redis_server, loop_thread, start_proxy):
    heads = []

    async def script(reader, writer, n):
        while True:
            heads.append(await backend.read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    for fields in (
        b"Connection: Upgradex\r\nUpgrade: websocket\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocketx\r\n",
        b"Upgrade: websocket\r\n",
    ):
        out, _ = raw_exchange(
            proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + key + b"\r\n", timeout=2
        )
        assert statuses(out) == [200], (fields, out)
        assert b"upgrade:" not in heads[-1].lower(), heads[-1]
    out, _ = raw_exchange(
        proxy.port,
        b"GET / HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        + key
        + b"\r\n",
        timeout=2,
    )
    assert statuses(out) == [400], out
    backend.stop()


def test_tunnel_timeout_counts_one_way_traffic_as_activity(redis_server, loop_thread, start_proxy):
    """A server pushing twice a second to a client that never sends is not idle."""

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH)
        for i in range(12):
            await asyncio.sleep(0.5)
            writer.write(b"tick%02d" % i)
            await writer.drain()
        await asyncio.sleep(30)

    proxy, backend = _start(
        redis_server, loop_thread, start_proxy, script, "--tunnel-timeout", "1.5"
    )
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake())
    got = _read_until(sock, b"tick11")
    assert b"tick11" in got, got
    # And once the server stops pushing, the idle tunnel is closed.
    sock.settimeout(20)
    assert sock.recv(100) == b""
    sock.close()
    backend.stop()


def test_ten_thousand_tiny_frames_each_way_at_once(redis_server, loop_thread, start_proxy):
    """Both peers write without reading first: no deadlock, every byte arrives in order."""
    count = 10_000

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH)

        async def send() -> None:
            for i in range(count):
                writer.write(b"\x82\x06%06d" % i)  # tiny unmasked server frames
            await writer.drain()

        sender = asyncio.ensure_future(send())
        got = await asyncio.wait_for(reader.readexactly(count * 12), 30)
        await sender
        ok = got == b"".join(b"\x82\x86\0\0\0\0%06d" % i for i in range(count))
        writer.write(b"OK" if ok else b"BAD")
        await writer.drain()
        await asyncio.sleep(1)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    sock.sendall(ws_handshake())
    head = _read_until(sock, b"\r\n\r\n")
    got = head.partition(b"\r\n\r\n")[2]
    sock.sendall(b"".join(b"\x82\x86\0\0\0\0%06d" % i for i in range(count)))
    expected = b"".join(b"\x82\x06%06d" % i for i in range(count))
    got = _read_until(sock, b"OK", got)
    assert got.endswith(b"OK") or got.endswith(b"BAD"), got[-40:]
    assert got == expected + b"OK"
    sock.close()
    backend.stop()


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_every_error_phase_leaves_no_fd_no_tunnel_and_no_traceback(
    redis_server, loop_thread, start_proxy
):
    phase = ["late 101"]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        kind = phase[0]
        if kind == "late 101":  # the client is gone before the answer
            await asyncio.sleep(0.3)
            writer.write(SWITCH)
        elif kind == "close before 101":
            writer.transport.abort()
            return
        elif kind == "bad 101":
            writer.write(SWITCH.replace(WS_ACCEPT, b"x" * 28))
        else:
            writer.write(SWITCH)
            await writer.drain()
            if kind == "backend resets":

                async def flood() -> None:
                    while await reader.read(65536):
                        pass

                task = asyncio.ensure_future(flood())
                await asyncio.sleep(0.05)
                task.cancel()
                writer.transport.abort()
                return
            for _ in range(100):  # stream to the client until it goes
                writer.write(b"s" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
        await writer.drain()
        await asyncio.sleep(1)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    # Its Redis connections are not counted: redis-py keeps one more whenever two loops
    # (the fleet publisher and the resync, both once a second) happened to overlap.
    baseline = _fds_after_warmup(proxy, redis_server.port)
    for kind in ("late 101", "close before 101", "bad 101", "client resets", "backend resets",
                 "both close"):  # fmt: skip
        phase[0] = kind
        for _ in range(40 if kind == "backend resets" else 10):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(ws_handshake())
            if kind == "late 101":
                _rst(sock)
                continue
            head = _read_until(sock, b"\r\n\r\n")
            if kind in ("close before 101", "bad 101"):
                assert statuses(head) == [502], (kind, head)
                sock.close()
                continue
            assert head.startswith(b"HTTP/1.1 101"), (kind, head)
            if kind == "client resets":
                sock.recv(65536)
                _rst(sock)
            elif kind == "backend resets":
                try:
                    for _ in range(200):
                        sock.sendall(b"c" * 65536)
                except OSError:
                    pass
                sock.close()
            else:
                sock.sendall(b"c" * 1000)
                sock.close()
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 20)
    assert wait_for(lambda: open_fds(proxy.pid, redis_server.port) <= baseline, 20), (
        open_fds(proxy.pid, redis_server.port),
        baseline,
    )
    for bad in ("Traceback", "Fatal error", "Exception"):
        assert bad not in proxy.log(), proxy.log()[-3000:]
    print(proxy.log()[-3000:])
    backend.stop()


def _fds_after_warmup(proxy, but_to_port: int) -> int:
    wait_for(lambda: metric(proxy, "redlb_open_tunnels") is not None, 10)
    time.sleep(0.5)
    return open_fds(proxy.pid, but_to_port)


def test_tunnel_start_keeps_the_pause_a_first_write_causes():
    """Tunnel.start, on real loopback sockets: when the 101 and the bytes after it fill the
    client's write buffer past its high-water mark, the backend must stay paused (the
    resulting pause_writing must not be undone by start's own resume_reading)."""
    import types

    import uvloop

    from redlb.proxy.context import Stats
    from redlb.proxy.tunnel import Tunnel

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.Transport] = []

        class Hold(asyncio.Protocol):
            def connection_made(self, transport):  # type: ignore[no-untyped-def]
                accepted.append(transport)

        server = await loop.create_server(Hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client_app = socket.socket()
        client_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client_app.setblocking(False)
        await loop.sock_connect(client_app, ("127.0.0.1", port))
        backend_transport, _ = await loop.create_connection(Hold, "127.0.0.1", port)
        await asyncio.sleep(0.1)
        client_transport = accepted[0]
        client_transport.set_write_buffer_limits(high=64 * 1024)
        ctx = types.SimpleNamespace(
            open_tunnels=0,
            stats=Stats(),
            config=types.SimpleNamespace(send_timeout=60, tunnel_timeout=3600),
            access_log=types.SimpleNamespace(enabled=False),
        )
        owner = types.SimpleNamespace(tunnel_ended=lambda: None)
        exchange = types.SimpleNamespace(
            req=types.SimpleNamespace(method=b"GET", target=b"/", route=None),
            reason=b"Switching Protocols",
            backend=None,
            started=0.0,
        )
        tunnel = Tunnel(ctx, owner, client_transport, backend_transport, None, exchange)  # type: ignore[arg-type]
        tunnel.start(SWITCH, b"b" * (16 << 20), b"")  # far more than the socket holds
        full = client_transport.get_write_buffer_size() > 64 * 1024
        reading = backend_transport.is_reading()
        tunnel.close(b"test")
        client_app.close()
        server.close()
        return full, reading

    full, backend_reading = uvloop.run(main())
    assert full
    assert not backend_reading, "the backend is read while the client's buffer is full"


def test_tunnels_hold_their_backend_connection_slot(redis_server, loop_thread, start_proxy):
    """--max-conns-per-backend protects a backend from too many connections; a tunnel is
    one for as long as it lives.  Past the cap a handshake waits in line like any request
    (here: no line, so 503), and a tunnel that ends gives its slot back."""
    live = [0]
    peak = [0]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            writer.write(SWITCH)
            await writer.drain()
            while await reader.read(65536):
                pass
        finally:
            live[0] -= 1

    proxy, backend = _start(
        redis_server, loop_thread, start_proxy, script,
        "--max-conns-per-backend", "2", "--max-queue-per-backend", "0",
    )  # fmt: skip
    tunnels = []
    answers = []
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
        sock.sendall(ws_handshake())
        head = _read_until(sock, b"\r\n\r\n")
        answers.append(int(head.split(b" ", 2)[1]) if head else 0)
        tunnels.append(sock)
    assert answers == [101, 101, 503, 503, 503, 503], answers
    assert peak[0] == 2
    tunnels[0].close()  # one tunnel ends: its slot is free again
    assert wait_for(lambda: live[0] == 1, 10)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake())
    assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
    for s in [*tunnels, sock]:
        s.close()
    backend.stop()


# Streaming (item 4)


def test_one_huge_chunk_to_a_client_that_never_reads_stays_bounded(
    redis_server, loop_thread, start_proxy
):
    total = 512 * (1 << 20)
    sent = [0]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % total)
        piece = b"h" * (1 << 20)
        while sent[0] < total:
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 30)
            sent[0] += len(piece)
        writer.write(b"\r\n0\r\n\r\n")

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: sent[0] >= total, 8)
    assert sent[0] < total, f"redlb took {sent[0] >> 20} MB the client never read"
    sock.close()
    backend.stop()


def test_server_sent_events_through_a_route_arrive_one_by_one(
    redis_server, loop_thread, start_proxy
):
    step = [asyncio.Event() for _ in range(3)]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(3):
            event = b"data: event %d\n\n" % i
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.wait_for(step[i].wait(), 10)  # the client saw it through redlb
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "events", backend.address)
    redis_server.cli("HSET", "redlb:routes", "/events", "events")
    proxy = start_proxy(redis_server.url)
    got = b""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    assert wait_for(lambda: proxy.ready(), 10)
    sock.sendall(b"GET /events/feed HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
    for i in range(3):
        got = _read_until(sock, b"data: event %d\n\n" % i, got)
        assert b"data: event %d\n\n" % i in got, got
        loop_thread.loop.call_soon_threadsafe(step[i].set)
    got = _read_until(sock, b"0\r\n\r\n", got)
    assert got.endswith(b"0\r\n\r\n")
    sock.close()
    backend.stop()


def test_sigterm_with_many_tunnels_one_of_them_stuck_still_exits(
    redis_server, loop_thread, start_proxy
):
    """Fifty open tunnels, one of them with a client that never reads a flood: after the
    drain timeout every client is closed and the worker exits."""
    import signal

    async def script(reader, writer, n):
        head = await backend.read_request(reader)
        writer.write(SWITCH)
        await writer.drain()
        if b"/flood" in head:
            for _ in range(256):
                writer.write(b"f" * (1 << 20))
                await asyncio.wait_for(writer.drain(), 60)
        while await reader.read(65536):
            pass

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script, "--drain-timeout", "2")
    socks = []
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
        sock.sendall(ws_handshake(b"/flood" if i == 0 else b"/quiet"))
        if i:
            assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        socks.append(sock)
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 50, 10)
    proxy.process.send_signal(signal.SIGTERM)
    for sock in socks[1:]:
        assert _read_until(sock, b"never") == b""  # a clean end of stream
    assert wait_for(lambda: not proxy.alive(), 30), "the worker did not exit"
    for sock in socks:
        sock.close()
    backend.stop()


def test_a_half_close_sent_before_the_101_reaches_the_backend_after_it(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        await backend.read_request(reader)
        await asyncio.sleep(0.5)  # the client's FIN is long there
        writer.write(SWITCH)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)  # to the EOF redlb passes on
        writer.write(b"EOF after %r" % rest)
        await writer.drain()

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake() + b"bye")
    sock.shutdown(socket.SHUT_WR)
    got = _read_until(sock, b"never")
    assert got.startswith(b"HTTP/1.1 101 ")
    assert got.endswith(b"EOF after b'bye'"), got
    sock.close()
    backend.stop()


def test_refused_handshakes_and_vanishing_clients_do_not_eject_a_healthy_backend(
    redis_server, loop_thread, start_proxy
):
    async def script(reader, writer, n):
        while True:
            head = await backend.read_request(reader)
            if b"/refuse" in head:
                writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
            elif b"/slow" in head:
                await asyncio.sleep(0.3)
                writer.write(SWITCH)
                await writer.drain()
                while await reader.read(65536):
                    pass
                return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    for _ in range(6):  # more than --eject-consecutive (5)
        out, _ = raw_exchange(proxy.port, ws_handshake(b"/refuse"), timeout=1)
        assert statuses(out) == [426], out
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(ws_handshake(b"/slow"))
        _rst(sock)  # gone before the 101
    time.sleep(1)
    out, _ = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", timeout=2)
    assert statuses(out) == [200], out
    assert "eject" not in proxy.log(), proxy.log()
    backend.stop()


def test_megabytes_sent_with_the_handshake_reach_the_backend_whole_and_in_order(
    redis_server, loop_thread, start_proxy
):
    payload = b"".join(b"%08d" % i for i in range(250_000))  # 2 MB

    async def script(reader, writer, n):
        await backend.read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(SWITCH)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        writer.write(b"WHOLE" if got == payload else b"MANGLED")
        await writer.drain()
        await asyncio.sleep(1)

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(ws_handshake() + payload)
    got = _read_until(sock, b"WHOLE")
    assert got.endswith(b"WHOLE"), got[-200:]
    sock.close()
    backend.stop()


def test_a_handshake_behind_a_deep_pipeline_keeps_its_early_bytes(
    redis_server, loop_thread, start_proxy
):
    """Forty requests, a handshake and a first frame in one send: more than the pipeline
    depth, so the handshake is parsed from the held-back bytes, and its frame still waits."""

    async def script(reader, writer, n):
        while True:
            head = await backend.read_request(reader)
            if b"upgrade" not in head.lower():
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk")
                await writer.drain()
                continue
            writer.write(SWITCH)
            await writer.drain()
            early = await asyncio.wait_for(reader.readexactly(5), 10)
            writer.write(b"backend got " + early)
            await writer.drain()
            await asyncio.sleep(1)
            return

    proxy, backend = _start(redis_server, loop_thread, start_proxy, script)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 40 + ws_handshake() + b"EARLY")
    got = _read_until(sock, b"backend got")
    got = _read_until(sock, b"EARLY", got)
    sock.close()
    assert statuses(got.partition(b"HTTP/1.1 101")[0]) == [200] * 40
    assert got.endswith(b"backend got EARLY"), got[-300:]
    backend.stop()


def test_bad_sec_websocket_keys_get_a_clear_answer(redis_server, loop_thread, start_proxy):
    """Repeated key: redlb's 400.  Invalid base64 or wrong length: the backend's refusal,
    relayed; the connection stays HTTP and a plain request follows on it."""
    from support import WsEchoBackend

    echo = WsEchoBackend(loop_thread, {"/page": b"page"}).start()
    redis_server.cli("RPUSH", "servers", echo.address)
    proxy = start_proxy(redis_server.url)
    twice = ws_handshake().replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n"
    )
    out, closed = raw_exchange(proxy.port, twice, timeout=3)
    assert statuses(out) == [400] and closed, out
    for key in (b"not base64!!", b"c2hvcnQ=", b"x" * 200):
        out, _ = raw_exchange(
            proxy.port, ws_handshake(key=key) + b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n", timeout=3
        )
        assert statuses(out) == [400, 200], (key, out)
        assert out.endswith(b"page")
    assert echo.open == 0
    echo.stop()


def test_a_tunnel_where_neither_peer_reads_is_ended_by_the_timeouts(
    redis_server, loop_thread, start_proxy
):
    """Both peers flood and never read: every buffer fills, nothing moves.  The idle
    timeout closes the tunnel, the send timeout then cuts what cannot be flushed."""
    ended = asyncio.Event()

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH)
        try:
            while True:
                writer.write(b"b" * (1 << 20))
                await asyncio.wait_for(writer.drain(), 60)
        except (ConnectionError, OSError):
            ended.set()

    proxy, backend = _start(
        redis_server, loop_thread, start_proxy, script,
        "--tunnel-timeout", "1", "--send-timeout", "1",
    )  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=8)
    sock.sendall(ws_handshake())
    sock.setblocking(False)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # flood until our own sends block
        try:
            sock.send(b"c" * 65536)
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:
            break
    assert wait_for(ended.is_set, 20), "the backend connection was never ended"
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 10)
    sock.close()
    backend.stop()


# WebSocket to an https:// backend (the tunnel over a TLS transport)


def test_websocket_to_an_https_backend_echoes_and_stays_bounded(
    redis_server, loop_thread, start_proxy, tmp_path
):
    import ssl

    import trustme
    from websockets.asyncio.server import serve
    from websockets.sync.client import connect

    from support import assert_flood_held_back, free_port, ws_tunnel

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    port = free_port()
    servers = []
    closes = []

    async def echo(ws):  # type: ignore[no-untyped-def]
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            closes.append(ws.close_code)

    async def go() -> None:
        servers.append(await serve(echo, "127.0.0.1", port, ssl=server_context, max_size=None))

    loop_thread.run(go())
    redis_server.cli("RPUSH", "servers", f"https://127.0.0.1:{port}")
    proxy = start_proxy(redis_server.url, "--upstream-ca", str(ca_file))
    with connect(f"ws://127.0.0.1:{proxy.port}/tls", open_timeout=10, max_size=None) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=10) == "over tls"
        big = b"\x01" * (8 << 20)
        ws.send(big)
        assert ws.recv(timeout=30) == big
        ws.close(4001, "done")
    assert wait_for(lambda: closes == [4001], 10), closes
    # A client that floods and never reads an echo: bounded through the TLS side too.
    sock, _ = ws_tunnel(proxy.port)
    assert_flood_held_back(sock, proxy.pid)
    sock.close()
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 15)
    assert "Traceback" not in proxy.log() and "Fatal error" not in proxy.log(), proxy.log()

    async def stop() -> None:
        servers[0].close()

    loop_thread.run(stop())


def test_wss_over_the_tls_listener_keeps_flow_control_and_closes_cleanly(
    redis_server, loop_thread, start_proxy, tmp_path
):
    """The client side of the tunnel is a TLS transport: a client that never reads a flood
    stops redlb reading the backend, and a client that goes leaves no tunnel behind."""
    import trustme

    from certs import Pair, client_context
    from support import free_port

    total = 512 * (1 << 20)
    sent = [0]

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(SWITCH)
        piece = b"f" * (1 << 20)
        while sent[0] < total:
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 30)
            sent[0] += len(piece)

    ca = trustme.CA()
    pair = Pair(ca, tmp_path, "site", "localhost", "127.0.0.1")
    tls_port = free_port()
    proxy, backend = _start(
        redis_server, loop_thread, start_proxy, script,
        "--tls-listen", f"127.0.0.1:{tls_port}", *pair.args,
    )  # fmt: skip
    raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    sock = client_context(ca).wrap_socket(raw, server_hostname="localhost")
    sock.sendall(ws_handshake())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 "), head
    wait_for(lambda: sent[0] >= total, 8)  # the client reads nothing more
    assert sent[0] < total, f"redlb took {sent[0] >> 20} MB the client never read"
    sock.close()
    assert wait_for(lambda: metric(proxy, "redlb_open_tunnels") == 0, 15)
    assert "Traceback" not in proxy.log() and "Fatal error" not in proxy.log(), proxy.log()
    backend.stop()
