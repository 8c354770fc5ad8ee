"""Streaming responses stay unbuffered (issue 11, item 4): SSE, long-poll, chunked streams.

Each backend sends a first part, then waits until the test says the client has received it
through redlb, then ends the response.  A proxy that buffered the response would deadlock
here: the client's read times out and the test fails.  No wall-clock assertion.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from support import ScriptedBackend

HEADS = {
    "sse": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "long-poll": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
}
FIRST = {
    "sse": b"d\r\ndata: first\n\n\r\n",
    "chunked": b"6\r\nfirst\x00\r\n",
    "long-poll": b'{"event": "first", ',
    "close-delimited": b"first line\n",
}
REST = {
    "sse": b"c\r\ndata: last\n\n\r\n0\r\n\r\n",
    "chunked": b"5\r\nlast\x00\r\n0\r\n\r\n",
    "long-poll": b'"then": "the last"}\n',
    "close-delimited": b"last line\n",
}
# What the client must see of the first part (redlb may re-frame the body).
SEEN_FIRST = {
    "sse": b"data: first\n\n",
    "chunked": b"first\x00",
    "long-poll": b'{"event": "first", ',
    "close-delimited": b"first line\n",
}
SEEN_LAST = {
    "sse": b"data: last\n\n",
    "chunked": b"last\x00",
    "long-poll": b'"the last"}\n',
    "close-delimited": b"last line\n",
}


@pytest.mark.parametrize("kind", ["sse", "chunked", "long-poll", "close-delimited"])
def test_first_part_reaches_the_client_before_the_backend_ends(
    redis_server, loop_thread, start_proxy, kind
):
    got_first = asyncio.Event()
    ended = []

    async def script(reader, writer, n):
        await backend.read_request(reader)
        writer.write(HEADS[kind] + FIRST[kind])
        await writer.drain()
        await asyncio.wait_for(got_first.wait(), 30)  # the client has the first part
        writer.write(REST[kind])
        await writer.drain()
        ended.append(True)
        if kind == "close-delimited":
            writer.close()

    backend = ScriptedBackend(loop_thread, script).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url, "--upstream-timeout", "30")
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        accept = b"Accept: text/event-stream\r\n" if kind == "sse" else b""
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n%b\r\n" % accept)
        seen = b""
        while SEEN_FIRST[kind] not in seen:
            chunk = sock.recv(65536)  # times out (fails) if redlb holds the first part
            assert chunk, seen
            seen += chunk
        assert not ended  # the backend is still waiting: nothing was buffered to the end
        assert seen.startswith(b"HTTP/1.1 200 ")
        loop_thread.loop.call_soon_threadsafe(got_first.set)
        while SEEN_LAST[kind] not in seen:
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk
        if kind in ("sse", "chunked", "close-delimited"):
            # Chunked to the client (close-delimited is re-chunked): the end is marked.
            while not seen.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, seen
                seen += chunk
        if kind == "sse":
            assert b"text/event-stream" in seen.partition(b"\r\n\r\n")[0]
    finally:
        sock.close()
        loop_thread.loop.call_soon_threadsafe(got_first.set)
        backend.stop()
