"""Adversarial review of session 3's merges: the repeated-read fast paths (rule 5 on both
sides), the compiled-by-default build, the access log formats, the strategy rewrites and the
CLI's exit codes.  Each test here failed before the fix its docstring names."""

from __future__ import annotations

import asyncio
import socket

from support import ScriptedBackend, read_response

GET = b"GET /same HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n"


def _ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_response(sock)


# Upstream rule 5: only a read that began a response may be replayed


def test_bytes_of_a_head_begun_after_an_interim_response_are_never_a_repeat(
    redis_server, loop_thread, start_proxy
):
    """A 103 and the start of the final head in one read, the rest of the head and the body
    in the next: that second read began mid-head, yet was kept as a whole response, and the
    next answer made of the same tail bytes (no status line: garbage, a 502 when parsed) was
    relayed as a 200 with the first response's fields."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        await backend.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)  # a read of its own
        writer.write(b"Content-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await backend.read_request(reader)
        writer.write(b"Content-Length: 5\r\n\r\nforge")  # not a response
        await writer.drain()
        await asyncio.sleep(1)

    backend = ScriptedBackend(loop_thread, script).start()
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            first = _ask(sock, GET)
            assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"first"), first
            second = _ask(sock, GET)
        assert second.startswith(b"HTTP/1.1 502"), second
    finally:
        backend.stop()
