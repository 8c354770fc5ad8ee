"""An independent review of the Trust fixes: defects reproduced against real processes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from support import ScriptedBackend


@pytest.fixture
def scripted(redis_server, loop_thread, start_proxy):  # type: ignore[no-untyped-def]
    def make(script, *args: str):  # type: ignore[no-untyped-def]
        backend = ScriptedBackend(loop_thread, script).start()
        redis_server.cli("RPUSH", "servers", backend.address)
        return start_proxy(redis_server.url, "--upstream-timeout", "3", *args), backend

    return make


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, "closed"
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        return data, "open"


@pytest.mark.parametrize("trailing", [b"GARBAGE\r\n\r\n", b"\x00", b"HTTP/1.1 2OO"])
def test_bytes_after_a_complete_response_poison_the_backend_not_the_client(scripted, trailing):  # type: ignore[no-untyped-def]
    """A backend that writes junk after a whole response loses that connection (upstream rule
    3); the client already has its complete answer and its pipelined request is still served,
    not reset (observed: the first answer, then a TCP reset, the second request lost)."""

    async def junk_after_answer(reader: asyncio.StreamReader, writer, n: int) -> None:  # type: ignore[no-untyped-def]
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + trailing)
        await writer.drain()
        await asyncio.sleep(5)

    proxy, backend = scripted(junk_after_answer)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
        data, ending = _read_until_closed(sock, timeout=3)
    finally:
        sock.close()
    assert ending != "reset", data
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2, data
    assert data.count(b"\r\n\r\nhello") == 2, data
    assert backend.connections == 2  # the poisoned connection was not reused
