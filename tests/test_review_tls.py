"""Adversarial review of TLS termination and TLS to backends (issue 11, items 2 and 3).

Real `redlb serve` processes, real TLS backends on loopback sockets (asyncio servers with a
trustme certificate, each with a script of what it sends), real TLS clients.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trustme

from redlb.store.embedded import free_port
from support import LoopThread, request


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def good_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


# A TLS backend that follows a script

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedTlsBackend:
    """An HTTPS server on 127.0.0.1: after the handshake, ``script`` does what it likes."""

    def __init__(self, loop: LoopThread, cert: trustme.LeafCert, script: Script) -> None:
        self.loop = loop
        self.script = script
        self.port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.accepts = 0
        self.requests: list[bytes] = []

    @property
    def entry(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> ScriptedTlsBackend:
        async def go() -> None:
            self.server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, ssl=self.context
            )

        self.loop.run(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                for writer in list(self.writers):
                    writer.transport.abort()
                self.server = None

        self.loop.run(go())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        self.writers.add(writer)
        try:
            await self.script(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
def scripted(loop_thread: LoopThread, good_cert) -> Iterator[Callable[[Script], ScriptedTlsBackend]]:  # type: ignore[no-untyped-def]
    started: list[ScriptedTlsBackend] = []

    def make(script: Script) -> ScriptedTlsBackend:
        backend = ScriptedTlsBackend(loop_thread, good_cert, script).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


def raw_get(port: int, path: str = "/", timeout: float = 10) -> tuple[bytes, bool]:
    """A GET on a fresh connection; everything read until the proxy closes, and whether the
    connection ended with a reset (an aborted response) rather than a clean close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    chunks = []
    reset = False
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks), reset


# TLS to backends: a body that ends at the close must end with close_notify


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def close_delimited(with_close_notify: bool) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.2)
        if with_close_notify:
            writer.close()  # close_notify, then the TCP close: the body is whole
            await writer.wait_closed()
        else:
            writer.transport.abort()  # TCP FIN/RST with no close_notify: a truncation

    return script


def test_close_delimited_body_cut_without_close_notify_is_not_relayed_as_complete(
    redis_server, scripted, ca_file, start_proxy
):
    backend = scripted(close_delimited(with_close_notify=False))
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    data, _ = raw_get(proxy.port)
    assert data.startswith(b"HTTP/1.1 200")
    # Re-chunked for the client: a whole body would end with the last chunk.
    assert b"Transfer-Encoding: chunked" in data
    assert not data.endswith(b"0\r\n\r\n"), data[-40:]


def test_close_delimited_body_ended_by_close_notify_is_complete(
    redis_server, scripted, ca_file, start_proxy
):
    backend = scripted(close_delimited(with_close_notify=True))
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    status, body, _ = request(proxy.port, "GET", "/")
    assert (status, body) == (200, b"x" * 1000)
