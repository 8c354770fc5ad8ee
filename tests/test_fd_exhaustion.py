"""Out of file descriptors is redlb's own shortage, never the backend's fault.

A worker that hits its descriptor limit cannot dial a backend (EMFILE).  Before, that was
answered 502 and counted as a backend failure, so a crowd of clients (or of long-lived
WebSocket tunnels) made redlb eject healthy backends fleet-wide.
"""

from __future__ import annotations

import asyncio
import resource
import socket

import psutil

from support import ScriptedBackend, open_fds, read_response, statuses, wait_for


def test_descriptor_exhaustion_answers_503_and_ejects_no_backend(
    redis_server, loop_thread, start_proxy
):
    async def slow(reader, writer, n):  # holds each backend connection busy for a while
        while True:
            await ScriptedBackend.read_request(backends[0], reader)
            await asyncio.sleep(1.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backends = [ScriptedBackend(loop_thread, slow).start() for _ in range(2)]
    for b in backends:
        redis_server.cli("RPUSH", "servers", b.address)
    proxy = start_proxy(redis_server.url, "--eject-consecutive", "2")
    children = psutil.Process(proxy.pid).children()
    worker = children[0].pid if children else proxy.pid  # one worker may be the process
    limit = open_fds(worker) + 31  # odd: an accepted client always finds no fd to dial with
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
    held: list[socket.socket] = []
    answers: list[int] = []
    try:
        for _ in range(25):  # each client in flight holds two descriptors in the worker
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            held.append(sock)
        for sock in held:
            try:
                answers += statuses(read_response(sock))
            except OSError:
                answers.append(0)  # accepted by the kernel, closed by a worker out of fds
        assert 503 in answers, answers
        assert 502 not in answers, answers
        for sock in held:
            sock.close()
        # The shortage over, both backends still serve: nothing was held against them.
        assert wait_for(lambda: _both_serve(proxy), timeout=15)
        assert "ejecting" not in proxy.log()
        assert not redis_server.cli("KEYS", "*eject*").strip()
    finally:
        for sock in held:
            sock.close()
        for b in backends:
            b.stop()


def _both_serve(proxy) -> bool:
    try:
        return [proxy.get("/", timeout=5)[0] for _ in range(2)] == [200, 200]
    except OSError:
        return False  # the worker may still be closing the crowd's descriptors
