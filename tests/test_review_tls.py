"""Adversarial review of TLS termination and TLS to backends (issue 11, items 2 and 3).

Real `redlb serve` processes, real TLS backends on loopback sockets (asyncio servers with a
trustme certificate, each with a script of what it sends), real TLS clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from certs import Pair, client_context, handshake, served_der, write_atomically
from redlb.store.embedded import free_port
from support import LoopbackServer, LoopThread, raw_exchange, request, wait_for


def grep(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


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


class ScriptedTlsBackend(LoopbackServer):
    """An HTTPS server on 127.0.0.1: after the handshake, ``script`` does what it likes."""

    def __init__(self, loop: LoopThread, cert: trustme.LeafCert, script: Script) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        super().__init__(loop, ssl=context)
        self.script = script
        self.accepts = 0
        self.requests: list[bytes] = []

    @property
    def entry(self) -> str:
        return f"https://127.0.0.1:{self.port}"

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
def scripted(
    loop_thread: LoopThread, good_cert
) -> Iterator[Callable[[Script], ScriptedTlsBackend]]:  # type: ignore[no-untyped-def]
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


# TLS termination


@pytest.fixture
def pairs(ca, tmp_path):  # type: ignore[no-untyped-def]
    directory = tmp_path / "certs"
    directory.mkdir()
    return (
        Pair(ca, directory, "a", "127.0.0.1", "a.example"),
        Pair(ca, directory, "b", "b.example", "*.wild.example"),
    )


@pytest.fixture
def tls(redis_server, backends, start_proxy, pairs):  # type: ignore[no-untyped-def]
    redis_server.cli("RPUSH", "servers", backends[0].address)
    port = free_port()
    args = ["--tls-listen", f"127.0.0.1:{port}", "--header-timeout", "3"]
    proxy = start_proxy(redis_server.url, *args, *pairs[0].args, *pairs[1].args)
    return proxy, port, backends[0]


def _flip(directory: Path, version: str, pem: bytes, key: bytes) -> None:
    """What kubelet does for a Secret volume: a new timestamped directory, then the
    ``..data`` symlink swapped to it by a rename; ``tls.crt`` -> ``..data/tls.crt`` stays."""
    target = directory / version
    target.mkdir()
    (target / "tls.crt").write_bytes(pem)
    (target / "tls.key").write_bytes(key)
    link = directory / "..data_tmp"
    link.symlink_to(version)
    os.replace(link, directory / "..data")


def test_kubernetes_style_symlink_flip_is_noticed(
    redis_server, backends, start_proxy, ca, tmp_path
):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    secret = tmp_path / "secret"
    secret.mkdir()
    first = ca.issue_cert("127.0.0.1", "a.example")
    _flip(secret, "..v1", first.cert_chain_pems[0].bytes(), first.private_key_pem.bytes())
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(f"..data/{name}")
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--tls-listen", f"127.0.0.1:{port}",
        "--tls-cert", str(secret / "tls.crt"), "--tls-key", str(secret / "tls.key"),
    )  # fmt: skip
    old = served_der(port, "a.example", ca)
    second = ca.issue_cert("127.0.0.1", "a.example")
    _flip(secret, "..v2", second.cert_chain_pems[0].bytes(), second.private_key_pem.bytes())
    shutil.rmtree(secret / "..v1")
    new = ssl.PEM_cert_to_DER_cert(second.cert_chain_pems[0].bytes().decode())
    assert new != old
    assert wait_for(lambda: served_der(port, "a.example", ca) == new, 15), proxy.log()
    assert "not reloaded" not in proxy.log()


def test_deleted_certificate_keeps_serving_then_a_restored_one_is_taken(tls, ca, pairs):
    proxy, port, _ = tls
    a = pairs[0]
    old = a.der
    a.cert.unlink()
    assert wait_for(lambda: "not reloaded" in proxy.log(), 10), proxy.log()
    time.sleep(2)
    assert len(grep(proxy.log(), "not reloaded")) == 1
    assert served_der(port, "a.example", ca) == old
    new = a.issue()
    assert wait_for(lambda: served_der(port, "a.example", ca) == new, 15), proxy.log()


def test_key_replaced_before_the_certificate_ends_on_the_new_pair(tls, ca, pairs):
    proxy, port, _ = tls
    a = pairs[0]
    leaf = ca.issue_cert("127.0.0.1", "a.example")
    write_atomically(a.key, leaf.private_key_pem.bytes())
    time.sleep(2.5)  # several sweeps see a key that does not match
    assert served_der(port, "a.example", ca) == a.der  # the mismatched pair is never served
    write_atomically(a.cert, leaf.cert_chain_pems[0].bytes())
    new = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert wait_for(lambda: served_der(port, "a.example", ca) == new, 15), proxy.log()
    time.sleep(2)
    assert len(grep(proxy.log(), "not reloaded")) <= 1, proxy.log()


@pytest.mark.parametrize(
    "name, which",
    [("A.EXAMPLE", 0), ("a.example.", 0), ("B.example.", 1), ("X.Wild.Example", 1),
     ("a.b.wild.example", 0)],
)  # fmt: skip
def test_sni_spellings(tls, pairs, name, which):
    _, port, _ = tls
    assert served_der_unverified(port, name) == pairs[which].der


def served_der_unverified(port: int, server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(sock, server_hostname=server_name) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_forwarded_proto_from_the_client_is_never_believed(tls, ca):
    proxy, port, backend = tls
    spoof = {"X-Forwarded-Proto": "https", "X-Forwarded-Port": "443", "X-Real-IP": "1.2.3.4"}
    assert request(proxy.port, "GET", "/", headers=spoof)[0] == 200
    got = backend.received[-1]
    assert got.header(b"x-forwarded-proto") == [b"http"]
    assert got.header(b"x-real-ip") == [b"127.0.0.1"]
    tls_sock = handshake(port, "a.example", ca)
    tls_sock.sendall(
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
    )
    answer = _read_all(tls_sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    got = backend.received[-1]
    assert got.header(b"x-forwarded-proto") == [b"https"]
    assert got.header(b"forwarded")[-1].endswith(b"proto=https")


def _read_all(tls_sock: ssl.SSLSocket) -> bytes:
    chunks = []
    try:
        while chunk := tls_sock.recv(65536):
            chunks.append(chunk)
    except (ssl.SSLError, ConnectionResetError, TimeoutError):
        pass
    finally:
        tls_sock.close()
    return b"".join(chunks)


# TLS to backends: cut, garbage, alerts


def _raw_socket(writer: asyncio.StreamWriter) -> socket.socket:
    sock = writer.get_extra_info("socket")
    assert sock is not None
    return socket.socket(fileno=os.dup(sock.fileno()))


def cut_body(kind: str) -> Script:
    """Half a body, then: ``abort`` (no close_notify), ``notify`` (a clean TLS close, still
    short of the framing), ``alert`` (a cleartext alert record), ``garbage`` (bytes that are
    no TLS record)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"y" * 1000)
        await writer.drain()
        await asyncio.sleep(0.2)
        if kind == "notify":
            writer.close()
            await writer.wait_closed()
            return
        if kind in ("alert", "garbage"):
            raw = _raw_socket(writer)
            record = b"\x15\x03\x03\x00\x02\x02\x28" if kind == "alert" else b"\xde\xad" * 50
            raw.sendall(record)
            raw.close()
            await asyncio.sleep(1)
        writer.transport.abort()

    return script


@pytest.mark.parametrize("kind", ["abort", "notify", "alert", "garbage"])
def test_body_cut_over_tls_is_never_a_complete_response(
    redis_server, scripted, ca_file, start_proxy, kind
):
    backend = scripted(cut_body(kind))
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    data, _ = raw_get(proxy.port)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 2000" in head
    assert len(body) < 2000  # the client sees the framing unmet: a truncation, not success
    assert proxy.alive()


def test_backend_speaking_garbage_after_the_handshake_is_a_502(
    redis_server, scripted, ca_file, start_proxy
):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"\x00\x01SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    backend = scripted(script)
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    assert request(proxy.port, "GET", "/")[0] == 502


def test_post_is_never_resent_after_a_tls_backend_reset_it(
    redis_server, scripted, ca_file, start_proxy
):
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend_a.requests.append(await _read_head(reader))
        writer.transport.abort()

    async def fine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(reader)
            await reader.readexactly(1)
            backend_b.requests.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend_a = scripted(reset)
    backend_b = scripted(fine)
    redis_server.cli("RPUSH", "servers", backend_a.entry, backend_b.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    answers = [request(proxy.port, "POST", "/", body=b"x")[0] for _ in range(6)]
    assert set(answers) <= {200, 502}
    # Every POST reached exactly one backend once: never a second copy elsewhere.
    assert len(backend_a.requests) + len(backend_b.requests) == 6
    assert answers.count(200) == len(backend_b.requests)


def test_upstream_ca_that_is_no_ca_bundle_stops_serve(tmp_path, ca):
    directory = tmp_path / "dir"
    directory.mkdir()
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    key = tmp_path / "key.pem"
    key.write_bytes(ca.issue_cert("x.test").private_key_pem.bytes())
    for bad in (directory, empty, key):
        done = subprocess.run(
            [sys.executable, "-m", "redlb", "serve", "--upstream-ca", str(bad),
             "--redis", "redis://127.0.0.1:1", "--listen", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 2, (bad, done.stderr[-500:])
        assert "--upstream-ca" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_restarted_worker_never_serves_the_startup_certificate(
    redis_server, backends, start_proxy, ca, pairs
):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    a = pairs[0]
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--workers", "2", "--tls-listen", f"127.0.0.1:{port}", *a.args
    )
    startup = a.der
    renewed = a.issue()
    assert wait_for(
        lambda: all(served_der(port, "a.example", ca) == renewed for _ in range(20)), 15
    )
    workers = _children(proxy.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    seen: list[bytes] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(set(_children(proxy.pid)) - set(workers)) < 1:
        time.sleep(0.01)
    restart_at = time.monotonic()
    while time.monotonic() < restart_at + 3:
        with contextlib.suppress(OSError):
            seen.append(served_der(port, "a.example", ca))
    assert seen and startup not in seen, f"{seen.count(startup)} of {len(seen)} got the old one"


# TLS to backends: a route's Host override the backend's certificate does not name


def test_a_routes_wrong_host_override_does_not_eject_the_backend_for_other_routes(
    redis_server, scripted, ca_file, start_proxy
):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend = scripted(serve)  # its certificate names localhost and 127.0.0.1 only
    redis_server.cli("RPUSH", "api", backend.entry)
    redis_server.cli("HSET", "redlb:routes", "front.test/wrong", "api host=other.test")
    redis_server.cli("HSET", "redlb:routes", "front.test/", "api")
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    front = {"Host": "front.test"}
    assert request(proxy.port, "GET", "/", headers=front)[0] == 200
    status, body, _ = request(proxy.port, "GET", "/wrong", headers=front)
    assert status == 502 and b"certificate was refused" in body
    # The certificate is fine for the backend's own name: the other route still gets it,
    # here and in every redlb sharing the pool (an ejection goes through Redis).
    for _ in range(5):
        assert request(proxy.port, "GET", "/", headers=front)[0] == 200
    assert "ejecting" not in proxy.log(), proxy.log()
    assert redis_server.cli("KEYS", "*eject*").strip() == ""


def test_reloads_while_a_hundred_handshakes_are_in_flight_fail_none(tls, ca, pairs):
    _, port, _ = tls
    a = pairs[0]
    failures: list[str] = []
    done = [0]
    barrier = threading.Barrier(100)

    def client() -> None:
        context = client_context(ca)
        barrier.wait(30)
        for _ in range(4):
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
                conn.request("GET", "/", headers={"Host": "a.example"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status != 200:
                    failures.append(str(resp.status))
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
            done[0] += 1

    threads = [threading.Thread(target=client) for _ in range(100)]
    for thread in threads:
        thread.start()
    ders = {a.der}
    for _ in range(3):
        time.sleep(0.4)
        ders.add(a.issue())
    for thread in threads:
        thread.join(120)
    assert done[0] == 400
    assert failures == []
    assert wait_for(lambda: served_der(port, "a.example", ca) == a.der, 15)


# --redirect-https


@pytest.fixture
def redirecting(redis_server, backends, start_proxy, pairs):  # type: ignore[no-untyped-def]
    redis_server.cli("RPUSH", "servers", backends[0].address)
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--tls-listen", f"127.0.0.1:{port}", "--redirect-https",
        "--header-timeout", "3", *pairs[0].args,
    )  # fmt: skip
    return proxy, port


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n", b"414"),
        (b"GET / HTTP/2.0\r\nHost: a.example\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nHost: a.example:443@evil.com\r\n\r\n", b"400"),
        (b"GET @evil.com HTTP/1.1\r\nHost: a.example\r\n\r\n", b"400"),
    ],
)
def test_redirect_listener_keeps_the_proxys_limits(redirecting, head, status):
    """The redirect answers what the proxy listener would refuse with the same refusal: a
    target over --max-request-line is no Location to hand out, nor is HTTP/2.0 a request."""
    proxy, _ = redirecting
    answer, closed = raw_exchange(proxy.port, head, timeout=10)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:120]
    assert closed


def test_redirect_goes_to_the_requests_own_host_and_path(redirecting):
    proxy, port = redirecting
    for target, location in [
        (b"//evil.example/x", b"https://a.example:%d//evil.example/x" % port),
        (b"http://a.example/p?q", b"https://a.example:%d/p?q" % port),
    ]:
        answer, _ = raw_exchange(
            proxy.port, b"GET %b HTTP/1.1\r\nHost: a.example\r\n\r\n" % target, timeout=10
        )
        assert b"\r\nLocation: %b\r\n" % location in answer, answer


def _tls_over_bio(port: int, ca: trustme.CA) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO]:
    """A finished handshake driven by hand, so the test decides when close_notify goes."""
    context = client_context(ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="a.example")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data
            incoming.write(data)
    sock.sendall(outgoing.read())
    obj.outgoing = outgoing  # type: ignore[attr-defined]
    return sock, obj, incoming


def test_close_notify_with_requests_in_flight_logs_nothing_per_connection(tls, ca):
    """A client can end its side with close_notify while its request is in flight; that
    is no reason for a log line per connection (a flood a client controls)."""
    proxy, port, _ = tls
    for _ in range(20):
        sock, obj, _ = _tls_over_bio(port, ca)
        obj.write(b"GET /slow HTTP/1.1\r\nHost: a.example\r\n\r\n")
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.unwrap()
        sock.sendall(obj.outgoing.read())  # type: ignore[attr-defined]
        time.sleep(0.05)
        sock.close()
    time.sleep(1)
    assert "eof_received" not in proxy.log(), grep(proxy.log(), "eof_received")[:3]


def test_wss_client_ending_with_close_notify_logs_nothing_per_tunnel(
    redis_server, loop_thread, start_proxy, ca, pairs
):
    from support import WsEchoBackend, ws_handshake

    echo = WsEchoBackend(loop_thread).start()
    try:
        redis_server.cli("RPUSH", "servers", echo.address)
        port = free_port()
        proxy = start_proxy(redis_server.url, "--tls-listen", f"127.0.0.1:{port}", *pairs[0].args)
        for _ in range(10):
            sock, obj, incoming = _tls_over_bio(port, ca)
            obj.write(ws_handshake(b"/chat", b"a.example"))
            sock.sendall(obj.outgoing.read())  # type: ignore[attr-defined]
            answer = b""
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                assert data, answer
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer += obj.read(65536)
            assert answer.startswith(b"HTTP/1.1 101"), answer
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.unwrap()  # close_notify, the tunnel open
            sock.sendall(obj.outgoing.read())  # type: ignore[attr-defined]
            time.sleep(0.1)
            sock.close()
        time.sleep(1)
        assert "eof_received" not in proxy.log(), grep(proxy.log(), "eof_received")[:3]
    finally:
        echo.stop()


def test_backend_certificate_turning_bad_keeps_pooled_connections_refuses_new_ones(
    redis_server, scripted, ca, ca_file, start_proxy
):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(reader)
            if b"/slow" in head:
                await asyncio.sleep(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend = scripted(serve)
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    assert request(proxy.port, "GET", "/")[:2] == (200, b"ok")
    ca.issue_cert("elsewhere.test").configure_cert(backend.ssl)  # new handshakes only
    assert request(proxy.port, "GET", "/")[:2] == (200, b"ok")  # the verified pooled one
    assert backend.accepts == 1
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(request(proxy.port, "GET", "/slow")[0]))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [200, 502]  # the pooled connection, and a refused new one
    assert wait_for(lambda: "IP address mismatch" in proxy.log(), 5), proxy.log()


@pytest.mark.parametrize(
    "override, name",
    [(b"[::1]", "::1"), (b"[::1]:8443", "::1"), (b"api.test", "api.test"),
     (b"api.test:8443", "api.test")],
)  # fmt: skip
def test_server_name_of_an_ipv6_host_override_is_the_address(override, name):
    from redlb.address import parse_backend
    from redlb.backend_tls import server_name

    assert server_name(parse_backend("https://127.0.0.1:8443"), override) == name
