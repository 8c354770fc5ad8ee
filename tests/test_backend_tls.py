"""TLS to https:// backends: verification, SNI, keep-alive, failures, health, identity.

Every certificate is made here (trustme: a CA and its leaves; an expired one through
trustme's validity dates, checked with cryptography), every backend is a real TLS server on
a loopback socket that counts its TCP accepts and finished handshakes, and every redlb is a
real `redlb serve`.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trustme
from cryptography import x509

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.backend_tls import FailureLog, server_name
from redlb.store.embedded import free_port
from redlb.store.keys import Keys
from support import (
    HttpBackend,
    LoopbackServer,
    LoopThread,
    admin_call,
    metric,
    request,
    wait_for,
)

# Certificates


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
    return ca.issue_cert("localhost", "127.0.0.1", "::1", "api.test")


@pytest.fixture(scope="module")
def expired_cert(ca: trustme.CA) -> trustme.LeafCert:
    now = datetime.datetime.now(datetime.UTC)
    cert = ca.issue_cert(
        "localhost",
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    parsed = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    assert parsed.not_valid_after_utc < now  # really expired, not merely "old"
    return cert


@pytest.fixture(scope="module")
def other_name_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("elsewhere.test")  # valid, trusted, but for another name


# A TLS backend that counts what happens to it


class TlsBackend(LoopbackServer):
    """An HTTPS/1.1 server on 127.0.0.1 that keeps connections alive and records, per
    connection, the TCP accept, the finished handshake and the SNI name the client sent.

    mode: ``serve``; ``stall`` (accept, never answer the ClientHello); ``close`` (read the
    start of the ClientHello, then reset the connection).  The server listens in plain TCP
    and starts TLS itself, so that an accept is counted before (or without) a handshake.
    """

    def __init__(
        self,
        loop: LoopThread,
        name: str,
        cert: trustme.LeafCert,
        mode: str = "serve",
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(loop, host=host)
        self.name = name
        self.mode = mode
        self.accepts = 0
        self.closed = 0  # connections the backend saw end (the peer's close, or its own)
        self.handshakes = 0
        self.sni: list[str | None] = []
        self.hosts: list[bytes] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.context.sni_callback = self._sni

    @property
    def entry(self) -> str:
        return (
            f"https://[{self.host}]:{self.port}"
            if ":" in self.host
            else f"https://{self.host}:{self.port}"
        )

    @property
    def backend(self) -> Backend:
        return parse_backend(self.entry)

    def _sni(self, _obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        self.writers.add(writer)
        try:
            if self.mode == "stall":
                while await reader.read(65536):
                    pass  # the ClientHello, never answered
            if self.mode == "close":
                await reader.read(16)
                writer.transport.abort()
                return
            await writer.start_tls(self.context)
            self.handshakes += 1
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                fields = dict(
                    (n.strip().lower(), v.strip())
                    for n, _, v in (line.partition(b":") for line in lines[1:] if line)
                )
                self.hosts.append(fields.get(b"host", b""))
                length = int(fields.get(b"content-length", b"0"))
                digest = hashlib.sha256()
                while length:
                    chunk = await reader.read(min(length, 1 << 16))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", length)
                    digest.update(chunk)
                    length -= len(chunk)
                path = lines[0].split(b" ")[1]
                status = int(path[8:11]) if path.startswith(b"/status/") else 200
                if path.startswith(b"/big/"):
                    await self._send_big(writer, int(path[5:]))
                    continue
                body = b"ok " + self.name.encode()
                if path == b"/sha":
                    body = digest.hexdigest().encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%b" % (status, len(body), body)
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.closed += 1
            self.writers.discard(writer)
            writer.transport.abort()

    @staticmethod
    async def _send_big(writer: asyncio.StreamWriter, size: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for offset in range(0, size, len(BLOCK)):
            writer.write(BLOCK[: size - offset])
            await writer.drain()


BLOCK = bytes(range(256)) * 256  # 64 KiB


@pytest.fixture
def tls_backends(loop_thread: LoopThread) -> Iterator[list[TlsBackend]]:
    """Backends a test starts are registered here and always stopped."""
    started: list[TlsBackend] = []
    yield started
    for backend in started:
        backend.stop()


@pytest.fixture
def tls_backend(loop_thread, tls_backends):  # type: ignore[no-untyped-def]
    def make(
        name: str, cert: trustme.LeafCert, mode: str = "serve", host: str = "127.0.0.1"
    ) -> TlsBackend:
        backend = TlsBackend(loop_thread, name, cert, mode, host).start()
        tls_backends.append(backend)
        return backend

    return make


def tls_lines(proxy, backend: TlsBackend | str) -> list[str]:  # type: ignore[no-untyped-def]
    """The lines of redlb's TLS log that say why TLS to this backend failed."""
    entry = backend if isinstance(backend, str) else backend.entry
    return [
        line
        for line in proxy.log().splitlines()
        if "redlb.backend_tls" in line and f"backend {entry}" in line
    ]


def logged(proxy, text: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the log says it, given the time the writer thread takes."""
    return wait_for(lambda: text in proxy.log(), 5)


# Addresses: the https:// identity (pure)


@pytest.mark.parametrize(
    "raw, key",
    [
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("HTTPS://Api.Example:8443/", "https://api.example:8443"),
        ("https://backend.example", "https://backend.example:443"),
        ("https://[::1]:9443", "https://[::1]:9443"),
        (b"https://[::1]", "https://[::1]:443"),
    ],
)
def test_https_entries_keep_their_scheme_in_the_key(raw, key):
    backend = parse_backend(raw)
    assert backend.tls
    assert backend.key == key
    assert parse_backend(backend.key) == backend  # a key parses back to the same backend


def test_same_host_port_in_clear_and_in_tls_are_two_backends():
    plain, tls = parse_backend("http://127.0.0.1:8443"), parse_backend("https://127.0.0.1:8443")
    assert plain != tls and hash(plain) != hash(tls)
    assert len({plain, tls, parse_backend("127.0.0.1:8443")}) == 2
    assert plain.authority == tls.authority == "127.0.0.1:8443"
    keys = Keys("servers")
    assert keys.health(plain) != keys.health(tls)
    assert keys.ejected(plain) != keys.ejected(tls)
    assert Backend("::1", 443, True).key == "https://[::1]:443"


@pytest.mark.parametrize("raw", ["https://", "https://h:0", "https://user@h:443", "tls://h:1"])
def test_bad_https_entries_are_refused(raw):
    with pytest.raises(InvalidAddress):
        parse_backend(raw)


def test_server_name_is_the_entry_host_or_the_route_override():
    backend = parse_backend("https://10.0.0.7:8443")
    assert server_name(backend, None) == "10.0.0.7"  # an IP: no SNI, checked against IP SANs
    assert server_name(backend, b"api.test:8443") == "api.test"
    assert server_name(parse_backend("https://svc.internal"), None) == "svc.internal"


def test_failure_log_says_it_once_then_counts(caplog):
    backend = parse_backend("https://127.0.0.1:1")
    failures = FailureLog(every=3600)
    with caplog.at_level("WARNING", logger="redlb.backend_tls"):
        for _ in range(50):
            failures.report(backend, "certificate refused: certificate has expired")
        failures.report(backend, "TLS handshake failed: reset")
    assert len(caplog.records) == 2
    assert "https://127.0.0.1:1" in caplog.records[0].getMessage()


# Through redlb


def test_https_backend_works_through_redlb(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("secure", good_cert)
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    status, body, _ = request(
        proxy.port, "POST", "/x", body=b"hello", headers={"Host": "front.test"}
    )
    assert (status, body) == (200, b"ok secure")
    assert backend.sni == [None]  # an IP-literal entry: no SNI, verified against the IP SAN
    assert backend.hosts == [b"front.test"]
    # The access log names it by its key.
    assert wait_for(lambda: f"{backend.entry} " in proxy.access_log()), proxy.access_log()


def test_ipv6_https_backend_is_verified_by_its_ip_address(
    redis_server, tls_backend, good_cert, other_name_cert, ca_file, start_proxy
):
    good = tls_backend("v6", good_cert, host="::1")
    bad = tls_backend("v6-other", other_name_cert, host="::1")
    redis_server.cli("RPUSH", "servers", good.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    assert proxy.get("/")[:2] == (200, b"ok v6")
    assert good.sni == [None]
    redis_server.cli("RPUSH", "other", bad.entry)
    redis_server.cli("HSET", "redlb:routes", "/other", "other")
    redis_server.cli("HSET", "redlb:routes", "/", "servers")
    assert wait_for(lambda: proxy.get("/other")[0] == 502)
    assert logged(proxy, "IP address mismatch, certificate is not valid for '::1'")


def test_sni_is_the_entry_host_name(redis_server, tls_backend, good_cert, ca_file, start_proxy):
    backend = tls_backend("named", good_cert)
    redis_server.cli("RPUSH", "servers", f"https://localhost:{backend.port}")
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    assert proxy.get("/")[:2] == (200, b"ok named")
    assert backend.sni == ["localhost"]


def test_sni_follows_the_routes_host_override(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("routed", good_cert)
    redis_server.cli("RPUSH", "api", backend.entry)
    redis_server.cli("HSET", "redlb:routes", "front.test/api", "api host=api.test")
    redis_server.cli("HSET", "redlb:routes", "front.test/", "api")
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    for _ in range(3):
        status, body, _ = request(proxy.port, "GET", "/api/x", headers={"Host": "front.test"})
        assert (status, body) == (200, b"ok routed")
        status, body, _ = request(proxy.port, "GET", "/other", headers={"Host": "front.test"})
        assert (status, body) == (200, b"ok routed")
    # One connection per server name, each reused: a connection made for one name never
    # carries a request for the other.
    assert sorted(backend.sni, key=str) == [None, "api.test"]
    assert backend.handshakes == 2
    assert backend.hosts == [b"api.test", b"front.test"] * 3


def test_host_override_that_is_no_tls_name_is_a_502_not_a_hang(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("routed", good_cert)
    redis_server.cli("RPUSH", "api", backend.entry)
    redis_server.cli("HSET", "redlb:routes", "front.test/", "api host=a..b")  # a valid Host field
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    status, body, _ = request(proxy.port, "GET", "/", headers={"Host": "front.test"}, timeout=10)
    assert status == 502 and b"TLS handshake with the backend failed" in body
    for _ in range(3):  # held off: not dialled again, the same answer at once
        assert proxy.get("/", headers={"Host": "front.test"})[0] == 502
    assert backend.accepts <= 1 and backend.handshakes == 0
    assert logged(proxy, "not a name TLS can check")
    assert len(tls_lines(proxy, backend)) == 1
    assert "ejecting" not in proxy.log()  # the route's fault, not the backend's


def test_large_bodies_stream_both_ways_over_tls(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("big", good_cert)
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file, "--max-body", "0")
    size = 16 * 1024 * 1024
    status, body, _ = request(proxy.port, "GET", f"/big/{size}", timeout=60)
    expected = (BLOCK * (size // len(BLOCK)))[:size]
    assert status == 200 and len(body) == size and body == expected
    upload = bytes(range(251)) * (size // 251)
    status, body, _ = request(proxy.port, "POST", "/sha", body=upload, timeout=60)
    assert (status, body) == (200, hashlib.sha256(upload).hexdigest().encode())
    assert backend.handshakes == 1  # and the same connection served both


def test_tls_connections_are_kept_alive_and_reused(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("kept", good_cert)
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    for _ in range(20):  # each on a new client connection: the upstream side is what is reused
        assert proxy.get("/")[:2] == (200, b"ok kept")
    assert backend.accepts == backend.handshakes == 1


@pytest.mark.parametrize(
    "cert_name, entry_host, reason",
    [
        ("expired", "127.0.0.1", "certificate has expired"),
        ("other_name", "127.0.0.1", "IP address mismatch"),
        ("other_name", "localhost", "Hostname mismatch"),
    ],
)
def test_bad_certificate_is_a_502_with_one_log_line(
    request_fixture, redis_server, tls_backend, ca_file, start_proxy, cert_name, entry_host, reason
):
    backend = tls_backend("bad", request_fixture(f"{cert_name}_cert"))
    entry = f"https://{entry_host}:{backend.port}"
    redis_server.cli("RPUSH", "servers", entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    status, body, _ = proxy.get("/")
    assert status == 502
    assert b"certificate was refused" in body
    assert backend.handshakes == 0  # nothing was sent to it
    for _ in range(5):
        # The only backend: the ejection cap keeps it in rotation, but it is not dialled
        # again for a while (REFUSAL_HOLD), and each request gets the same answer at once.
        status, body, _ = proxy.get("/")
        assert status == 502 and b"certificate was refused" in body
    assert backend.accepts == 1
    assert logged(proxy, reason)
    lines = tls_lines(proxy, entry)
    assert len(lines) == 1 and reason in lines[0], proxy.log()
    assert proxy.log().count(f"ejecting {entry}") == 1
    assert metric(proxy, "redlb_upstream_tls_failures") == 1  # handshakes, not held-off requests


@pytest.fixture
def request_fixture(request):  # type: ignore[no-untyped-def]
    return request.getfixturevalue


def test_bad_certificate_backend_is_ejected_not_hammered(
    redis_server, tls_backend, good_cert, expired_cert, ca_file, start_proxy
):
    good = tls_backend("good", good_cert)
    bad = tls_backend("bad", expired_cert)
    redis_server.cli("RPUSH", "servers", bad.entry, good.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    for _ in range(30):  # retried on the good backend: no client sees the bad certificate
        status, body, _ = request(proxy.port, "POST", "/", body=b"not idempotent, never sent")
        assert (status, body) == (200, b"ok good")
    answers = [proxy.get("/")[:2] for _ in range(10)]
    assert answers == [(200, b"ok good")] * 10
    assert bad.accepts == 1  # one handshake, then ejected fleet-wide
    assert wait_for(lambda: redis_server.client().exists(Keys("servers").ejected(bad.backend)))
    assert logged(proxy, "certificate has expired")
    assert len(tls_lines(proxy, bad)) == 1, proxy.log()
    assert metric(proxy, "redlb_upstream_tls_failures") == 1


def test_upstream_insecure_accepts_any_certificate(
    redis_server, tls_backend, expired_cert, other_name_cert, start_proxy
):
    expired = tls_backend("expired", expired_cert)
    mismatched = tls_backend("mismatched", other_name_cert)
    redis_server.cli("RPUSH", "servers", expired.entry, f"https://localhost:{mismatched.port}")
    proxy = start_proxy(redis_server.url, "--upstream-insecure")
    bodies = {proxy.get("/")[1] for _ in range(6)}
    assert bodies == {b"ok expired", b"ok mismatched"}
    assert "certificates of https:// backends are NOT verified" in proxy.log()


def test_system_store_and_a_wrong_ca_refuse_a_private_ca(
    redis_server, tls_backend, good_cert, start_proxy, tmp_path
):
    backend = tls_backend("private", good_cert)
    redis_server.cli("RPUSH", "servers", backend.entry)
    default = start_proxy(redis_server.url)  # the system store knows nothing of our CA
    assert default.get("/")[0] == 502
    wrong = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong))
    redis_server.cli("DEL", Keys("servers").ejected(parse_backend(backend.entry)))
    other = start_proxy(redis_server.url, "--upstream-ca", str(wrong))
    status, body, _ = other.get("/")
    assert status == 502 and b"certificate was refused" in body
    assert logged(other, "unable to get local issuer certificate")
    assert backend.handshakes == 0


def test_unreadable_upstream_ca_or_both_flags_stop_serve(tmp_path, ca_file):
    base = [sys.executable, "-m", "redlb", "serve", "--redis", "redis://127.0.0.1:1/0"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for args, words in [
        (["--upstream-ca", str(tmp_path / "missing.pem")], "--upstream-ca"),
        (["--upstream-ca", str(junk)], "--upstream-ca"),
        (["--upstream-ca", ca_file, "--upstream-insecure"], "cannot take --upstream-ca"),
    ]:
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=20)
        assert out.returncode == 2, out
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_config_file_takes_the_upstream_tls_keys(tmp_path, ca_file):
    good = tmp_path / "good.toml"
    good.write_text(f'upstream-ca = "{ca_file}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "redlb", "config", "show", "--config", str(good)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0 and f'upstream_ca = "{ca_file}"' in out.stdout, out
    bad = tmp_path / "bad.toml"
    bad.write_text('upstream-ca = "missing.pem"\n')
    out = subprocess.run(
        [sys.executable, "-m", "redlb", "config", "check", str(bad)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 2 and "cannot load 'missing.pem'" in out.stderr, out


def test_stalled_handshake_is_bounded_by_the_connect_timeout(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("stall", good_cert, mode="stall")
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file, "--connect-timeout", "0.5")
    status, body, _ = request(proxy.port, "GET", "/", timeout=10)
    assert status == 504 and b"connecting to the backend timed out" in body
    assert 1 <= backend.accepts <= 3  # the connect attempts a request may make
    assert wait_for(lambda: backend.closed == backend.accepts)  # each abandoned, none left open


def test_client_leaving_during_a_stalled_handshake_closes_the_backend_socket(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("stall", good_cert, mode="stall")
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file, "--connect-timeout", "60")
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: backend.accepts > backend.closed)
        # A reset, not a FIN: a FIN after a whole request is a half-close that still waits
        # for its answer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # The handshake in progress is abandoned with its socket: nothing is left open.
        assert wait_for(lambda: backend.closed == backend.accepts), (
            backend.accepts,
            backend.closed,
        )
    assert proxy.alive()


def test_backend_closing_mid_handshake_is_a_502_and_logged(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    backend = tls_backend("rude", good_cert, mode="close")
    redis_server.cli("RPUSH", "servers", backend.entry)
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
    status, body, _ = proxy.get("/")
    assert status == 502 and b"TLS handshake with the backend failed" in body
    assert backend.accepts >= 1
    assert logged(proxy, "TLS handshake failed")
    lines = tls_lines(proxy, backend)
    assert len(lines) == 1, proxy.log()
    assert proxy.alive()


def test_health_probes_over_tls_mark_a_bad_certificate_down(
    redis_server, tls_backend, good_cert, expired_cert, ca_file, start_proxy
):
    good = tls_backend("good", good_cert)
    bad = tls_backend("bad", expired_cert)
    redis_server.cli("RPUSH", "servers", good.entry, bad.entry)
    proxy = start_proxy(
        redis_server.url, "--upstream-ca", ca_file, "--health-path", "/status/200",
        "--health-interval", "0.2", "--health-fall", "1", "--eject-consecutive", "0",
    )  # fmt: skip
    client = redis_server.client()
    keys = Keys("servers")
    assert wait_for(lambda: client.get(keys.health(bad.backend)) == b"down", 15), proxy.log()
    assert client.get(keys.health(good.backend)) == b"up"
    assert good.handshakes >= 1  # the good one is really probed over TLS
    assert bad.handshakes == 0
    assert wait_for(lambda: all(proxy.get("/")[1] == b"ok good" for _ in range(6)))
    assert logged(proxy, "certificate has expired")
    assert len(tls_lines(proxy, bad)) == 1, proxy.log()  # probe after probe: one line


def test_mixed_pool_of_http_and_https_rotates(
    redis_server, backends, tls_backend, good_cert, ca_file, start_proxy
):
    secure = tls_backend("secure", good_cert)
    plain: HttpBackend = backends[0]
    redis_server.cli("RPUSH", "servers", plain.address, secure.entry)
    # Strict: one counter value a request, so the alternation is exact (a lease may jump).
    proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file, "--rotation", "strict")
    bodies = [proxy.get("/")[1] for _ in range(10)]
    assert sorted(set(bodies)) == [b"ok b0\n", b"ok secure"]
    assert bodies[0::2] == [bodies[0]] * 5 and bodies[1::2] == [bodies[1]] * 5, bodies
    assert secure.handshakes == 1


def test_http_and_https_on_one_port_stay_two_backends(
    redis_server, tls_backend, good_cert, ca_file, start_proxy
):
    secure = tls_backend("secure", good_cert)
    clear = f"127.0.0.1:{secure.port}"  # the same port spoken in clear: a broken backend
    redis_server.cli("RPUSH", "servers", clear, secure.entry)
    proxy = start_proxy(
        redis_server.url, "--upstream-ca", ca_file, "--health-path", "/status/200",
        "--health-interval", "0.2", "--health-fall", "1",
    )  # fmt: skip
    client = redis_server.client()
    keys = Keys("servers")
    assert wait_for(lambda: client.get(keys.health(parse_backend(clear))) == b"down", 15)
    assert client.get(keys.health(secure.backend)) == b"up"
    answers = [proxy.get("/")[:2] for _ in range(6)]
    assert answers == [(200, b"ok secure")] * 6

    # The CLI names, weighs and lists each on its own.
    cli = [sys.executable, "-m", "redlb", "backend"]
    common = ["--redis", redis_server.url]
    out = subprocess.run([*cli, "ls", *common], capture_output=True, text=True, timeout=20)
    listed = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert set(listed) == {clear, secure.entry}
    assert "down" in listed[clear] and "up" in listed[secure.entry], out.stdout
    out = subprocess.run(
        [*cli, "weight", secure.entry, "3", *common], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    assert client.hget(keys.weights, secure.entry) == b"3"
    assert client.hget(keys.weights, clear) is None


def test_admin_api_takes_https_addresses(redis_server, tls_backend, good_cert, start_proxy):
    secure = tls_backend("secure", good_cert)
    admin_port = free_port()
    start_proxy(redis_server.url, "--admin-listen", f"127.0.0.1:{admin_port}")
    status, body, _ = admin_call(
        admin_port, "POST", "/api/v1/pools/servers/backends", {"address": secure.entry}
    )
    assert (status, body["address"]) == (201, secure.entry), body
    status, body, _ = admin_call(
        admin_port, "POST", "/api/v1/pools/servers/backends",
        {"address": f"127.0.0.1:{secure.port}"},
    )  # fmt: skip
    assert status == 201, body  # the same port in clear is another backend
    quoted = secure.entry.replace(":", "%3A").replace("/", "%2F")
    status, body, _ = admin_call(admin_port, "DELETE", f"/api/v1/pools/servers/backends/{quoted}")
    assert (status, body["removed"]) == (200, True), body
    assert redis_server.client().lrange("servers", 0, -1) == [f"127.0.0.1:{secure.port}".encode()]


def test_websocket_tunnel_to_an_https_backend(
    redis_server, loop_thread, good_cert, ca_file, start_proxy
):
    from websockets.asyncio.server import serve
    from websockets.sync.client import connect

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good_cert.configure_cert(context)
    port = free_port()
    closes: list[int | None] = []

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            closes.append(ws.close_code)

    async def start():  # type: ignore[no-untyped-def]
        return await serve(echo, "127.0.0.1", port, ssl=context, max_size=None)

    server = loop_thread.run(start())
    try:
        redis_server.cli("RPUSH", "servers", f"https://127.0.0.1:{port}")
        proxy = start_proxy(redis_server.url, "--upstream-ca", ca_file)
        big = hashlib.sha256(b"tls").digest() * (1024 * 1024 // 32)
        with connect(f"ws://127.0.0.1:{proxy.port}/", open_timeout=10, max_size=None) as ws:
            ws.send("over TLS")
            assert ws.recv(timeout=10) == "over TLS"
            ws.send(big)
            assert ws.recv(timeout=30) == big
        assert wait_for(lambda: closes == [1000])
    finally:

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        loop_thread.run(stop())
