"""TLS termination end to end: real redlb processes, certificates from a test CA (trustme)."""

from __future__ import annotations

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
from pathlib import Path

import pytest
import trustme

from certs import Pair, client_context, handshake, served_der
from support import free_port, metric, open_fds, raw_exchange, request, wait_for


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pairs(ca, tmp_path):
    """a: the default (127.0.0.1 and a.example); b: b.example and the *.wild.example wildcard."""
    directory = tmp_path / "certs"
    directory.mkdir()
    return (
        Pair(ca, directory, "a", "127.0.0.1", "a.example"),
        Pair(ca, directory, "b", "b.example", "*.wild.example"),
    )


@pytest.fixture
def tls(redis_server, backends, start_proxy, pairs):
    """redlb with a plain and a TLS listener; returns (proxy, tls port, backend)."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    port = free_port()
    args = ["--tls-listen", f"127.0.0.1:{port}", "--header-timeout", "2"]
    proxy = start_proxy(redis_server.url, *args, *pairs[0].args, *pairs[1].args)
    return proxy, port, backends[0]


def https_get(port: int, ca: trustme.CA, path: str = "/", server_name: str | None = None):
    """One GET over TLS; returns (status, body, response)."""
    tls_sock = handshake(port, server_name or "127.0.0.1", ca)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = tls_sock
    try:
        conn.request("GET", path, headers={"Host": server_name or "127.0.0.1"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def grep(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


# The https listener


def test_https_request_reaches_the_backend_marked_https(tls, ca):
    proxy, port, backend = tls
    status, body, _ = https_get(port, ca, "/hello")
    assert (status, body) == (200, b"ok b0\n")
    received = backend.received[-1]
    assert received.header(b"x-forwarded-proto") == [b"https"]
    assert received.header(b"x-forwarded-port") == [str(port).encode()]
    assert received.header(b"forwarded")[-1].endswith(b"proto=https")
    # The plain listener still says http.
    status, _, _ = request(proxy.port, "GET", "/plain")
    assert status == 200
    assert backend.received[-1].header(b"x-forwarded-proto") == [b"http"]


def test_sni_picks_the_certificate_by_exact_and_wildcard_name(tls, ca, pairs):
    _, port, _ = tls
    a, b = pairs
    assert served_der(port, "a.example", ca) == a.der
    assert served_der(port, "b.example", ca) == b.der
    assert served_der(port, "B.Example", ca) == b.der  # names are case-insensitive
    assert served_der(port, "x.wild.example", ca) == b.der
    # A wildcard covers one label: deeper names and the bare parent get the default.
    assert served_der_unverified(port, "deep.x.wild.example") == a.der
    assert served_der_unverified(port, "wild.example") == a.der
    assert served_der_unverified(port, "unknown.example") == a.der
    assert served_der(port, None, ca) == a.der  # no SNI: the default, the first pair


def served_der_unverified(port: int, server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize("server_name", ["a.example", "b.example"])  # default, switched to
def test_alpn_offers_http11_only(tls, ca, server_name):
    _, port, _ = tls
    context = client_context(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls_sock,
    ):
        assert tls_sock.selected_alpn_protocol() == "http/1.1"
        assert tls_sock.version() == "TLSv1.3"


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_10_and_11_are_refused(tls, version):
    _, port, _ = tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer the old protocols at all
    with pytest.warns(DeprecationWarning):
        context.minimum_version = getattr(ssl.TLSVersion, version)
        context.maximum_version = getattr(ssl.TLSVersion, version)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname="a.example")


def test_tls12_with_intermediate_ciphers_only(tls):
    _, port, _ = tls

    def connect(ciphers: str) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname="a.example") as tls_sock,
        ):
            return tls_sock.cipher()[0]

    # trustme's keys are ECDSA.
    assert connect("ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    with pytest.raises(ssl.SSLError):
        connect("ECDHE-ECDSA-AES128-SHA")  # CBC: not in the intermediate list


# Timeouts and hostile clients


def test_stalled_handshakes_are_closed_by_the_header_timeout(tls, ca):
    _, port, _ = tls  # --header-timeout 2
    hello = _client_hello()

    def closed_within(sock: socket.socket, seconds: float) -> bool:
        sock.settimeout(seconds)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    silent = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(hello[:40])  # a ClientHello cut short, then nothing
    done = handshake(port, "a.example", ca)  # handshake complete, then no request
    try:
        for sock in (silent, half, done):
            assert closed_within(sock, 15), "a stalled TLS client was kept open"
    finally:
        for sock in (silent, half, done):
            sock.close()
    assert https_get(port, ca)[0] == 200


def _client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="a.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_plain_http_to_the_tls_port_is_closed_and_counted(tls, ca):
    _, port, _ = tls
    answer, closed = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=10)
    assert closed
    assert b"HTTP/1.1" not in answer  # no response in clear text on the TLS port
    assert https_get(port, ca)[0] == 200


def test_failed_handshakes_are_counted_not_logged_and_hold_no_descriptor(tls, ca):
    proxy, port, _ = tls
    wait_for(lambda: metric(proxy, "redlb_tls_handshake_failures") is not None)
    assert metric(proxy, "redlb_tls_handshake_failures") == 0
    fds_before = open_fds(proxy.pid)
    hostile = [b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", _client_hello()[:60] + b"x" * 64]
    attempts = 300
    for i in range(attempts):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(hostile[i % len(hostile)])
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    assert wait_for(lambda: metric(proxy, "redlb_tls_handshake_failures") == attempts, 15), metric(
        proxy, "redlb_tls_handshake_failures"
    )
    assert https_get(port, ca)[0] == 200
    assert metric(proxy, "redlb_tls_handshake_failures") == attempts  # a success is not one
    assert wait_for(lambda: open_fds(proxy.pid) <= fds_before + 2, 10), open_fds(proxy.pid)
    # One summary line (the failures straddle at most one sweep; the next waits a minute).
    assert wait_for(lambda: grep(proxy.log(), "TLS handshake"), 5)
    time.sleep(1.5)
    lines = grep(proxy.log(), "(?i)handshake|ssl")
    assert len(lines) == 1, lines
    assert re.search(r"\b\d+ TLS handshake\(s\) failed since", lines[0]), lines


# Certificates replaced while serving


def test_changed_files_are_reloaded_during_traffic_without_a_failed_request(tls, ca, pairs):
    proxy, port, _ = tls
    a = pairs[0]
    old = a.der
    failures: list[str] = []
    sent = [0]
    stop = threading.Event()

    def client(fresh_connections: bool) -> None:
        context = client_context(ca)
        conn: http.client.HTTPSConnection | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(
                        "127.0.0.1", port, context=context, timeout=10
                    )
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(f"status {resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                conn = None
            sent[0] += 1
            if fresh_connections and conn is not None:
                conn.close()
                conn = None
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        new = a.issue()
        assert new != old
        assert wait_for(lambda: served_der(port, "a.example", ca) == new, 15)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert sent[0] > 20
    assert failures == []
    assert len(grep(proxy.log(), "TLS certificate reloaded")) <= 1  # info, logged once at most


def test_a_bad_new_file_is_refused_once_and_the_old_one_keeps_serving(tls, ca, pairs):
    proxy, port, _ = tls
    a = pairs[0]
    old = a.der
    good_key = a.key.read_bytes()
    # Half a certificate written in place, as a slow copy would leave it.
    text = a.cert.read_bytes()
    a.cert.write_bytes(text[: len(text) // 2])
    assert wait_for(lambda: "not reloaded" in proxy.log(), 10), proxy.log()
    time.sleep(2)  # several more checks: still one line
    assert len(grep(proxy.log(), "not reloaded")) == 1
    assert "not a complete PEM" in grep(proxy.log(), "not reloaded")[0]
    assert served_der(port, "a.example", ca) == old
    assert https_get(port, ca)[0] == 200
    # A key that does not match the certificate: refused the same way.
    a.issue()
    fresh_der = a.der
    a.key.write_bytes(good_key)
    assert wait_for(lambda: len(grep(proxy.log(), "not reloaded")) == 2, 10), proxy.log()
    assert "does not match" in grep(proxy.log(), "not reloaded")[1]
    assert served_der(port, "a.example", ca) == old
    # Then a good pair is taken.
    a.issue()
    assert wait_for(lambda: served_der(port, "a.example", ca) == a.der, 10)
    assert a.der != fresh_der


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reloads_every_worker(redis_server, backends, start_proxy, ca, pairs, workers):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    a = pairs[0]
    size = 8192
    old = a.issue(pad_to=size)
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--workers", workers, "--tls-listen", f"127.0.0.1:{port}", *a.args
    )
    # New files with the same size, inode and mtime: no watcher can see them, SIGHUP must.
    stats = {p: os.stat(p) for p in (a.cert, a.key)}
    leaf = ca.issue_cert(*a.names)
    chain = leaf.cert_chain_pems[0].bytes()
    for path, data in ((a.cert, chain), (a.key, leaf.private_key_pem.bytes())):
        with open(path, "r+b") as file:
            file.write(data + b"\n" * (size - len(data)))
        os.utime(path, ns=(stats[path].st_atime_ns, stats[path].st_mtime_ns))
    new = ssl.PEM_cert_to_DER_cert(chain.decode())
    time.sleep(1.5)
    assert {served_der(port, "a.example", ca) for _ in range(10)} == {old}
    os.kill(proxy.pid, signal.SIGHUP)

    def all_new() -> bool:
        return {served_der(port, "a.example", ca) for _ in range(20)} == {new}

    assert wait_for(all_new, 10)
    assert proxy.alive()
    assert len(grep(proxy.log(), "SIGHUP: reloading")) == 1  # worker 0 speaks for all


def test_sighup_without_tls_still_ends_redlb(redis_server, backends, start_proxy):
    """Unchanged behaviour: SIGHUP's meaning only changes when there is something to reload."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    # A suite run under nohup ignores SIGHUP, and so would every redlb it starts (an ignored
    # signal stays ignored across exec, as the user of `nohup redlb serve` asks): the default
    # is what this test is about.
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        proxy = start_proxy(redis_server.url)
    finally:
        signal.signal(signal.SIGHUP, inherited)
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_for(lambda: not proxy.alive(), 10)


# Listeners and startup


def test_https_only_with_listen_off(redis_server, backends, start_proxy, ca, pairs):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--listen", "off", "--tls-listen", f"127.0.0.1:{port}", *pairs[0].args
    )
    assert https_get(port, ca)[0] == 200
    assert not proxy.listening()  # nothing on the plain port
    assert f"listening on https://127.0.0.1:{port}" in proxy.log()


def test_redirect_https(redis_server, backends, start_proxy, pairs):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    port = free_port()
    proxy = start_proxy(
        redis_server.url, "--tls-listen", f"127.0.0.1:{port}", "--redirect-https",
        "--host", "a.example", *pairs[0].args,
    )  # fmt: skip
    status, _, resp = request(proxy.port, "GET", "/p?q=1", headers={"Host": "a.example:80"})
    assert status == 301
    assert resp.getheader("Location") == f"https://a.example:{port}/p?q=1"
    status, _, resp = request(
        proxy.port, "POST", "/form", body=b"x=1", headers={"Host": "a.example"}
    )
    assert status == 308
    assert resp.getheader("Location") == f"https://a.example:{port}/form"
    assert request(proxy.port, "GET", "/", headers={"Host": "evil.example"})[0] == 421
    answer, closed = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and closed
    answer, closed = raw_exchange(proxy.port, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and closed
    assert backends[0].count() == 0  # nothing was proxied in clear text


def _serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redlb", "serve", "--status-listen", "off", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd,
    )  # fmt: skip


def test_a_key_that_does_not_match_is_refused_at_startup(pairs, tmp_path):
    a, b = pairs
    port = free_port()
    result = _serve(
        "--tls-listen", f"127.0.0.1:{port}", "--tls-cert", str(a.cert), "--tls-key", str(b.key),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the key does not match the certificate" in lines[0]
    assert str(a.cert) in lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tls-listen", "127.0.0.1:1"], "needs a certificate"),
        (["--listen", "off"], "--listen off needs --tls-listen"),
        (["--redirect-https"], "--redirect-https needs both"),
        (["--tls-listen", "127.0.0.1:1", "--tls-cert", "x.crt"], "give them in pairs"),
        (["--tls-listen", "127.0.0.1:1", "--tls-cert", "no.crt", "--tls-key", "no.key"], "no.crt"),
    ],
)
def test_bad_tls_options_are_usage_errors(args, says, tmp_path):
    result = _serve(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_client_renegotiation_is_refused(tls, ca, tmp_path):
    """TLS 1.2 renegotiation (a CPU lever for a client) is refused; the server carries on."""
    _, port, _ = tls
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    result = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-servername", "a.example"],
        input=b"R\n", capture_output=True, timeout=30,
    )  # fmt: skip
    out = (result.stdout + result.stderr).decode(errors="replace")
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out
    assert https_get(port, ca)[0] == 200


def test_a_server_name_that_is_not_ascii_fails_quietly(tls, ca):
    """CPython cannot decode such an SNI and prints a traceback per handshake: not in our log."""
    proxy, port, _ = tls
    hello = _client_hello_for("cafx.example")
    assert hello.count(b"cafx.example") == 1
    hostile = hello.replace(b"cafx.example", b"caf\xe9.example")  # same length: still framed
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(hostile)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    assert wait_for(lambda: metric(proxy, "redlb_tls_handshake_failures") == 20, 10)
    assert "Traceback" not in proxy.log(), proxy.log()[-2000:]
    assert https_get(port, ca)[0] == 200


def _client_hello_for(server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_large_bodies_both_ways_over_tls(tls, ca):
    _, port, backend = tls
    size = 20 * 1024 * 1024
    status, body, _ = https_get(port, ca, f"/big/{size}")
    assert status == 200 and len(body) == size
    upload = os.urandom(3 * 1024 * 1024)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca), timeout=30)
    try:
        conn.request("POST", "/upload", body=upload)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert backend.received[-1].body_len == len(upload)


def test_sigterm_drains_a_tls_request_in_flight(tls, ca):
    proxy, port, backend = tls
    backend.behaviour.delay = 1.5
    result: list[object] = []

    def slow() -> None:
        try:
            result.append(https_get(port, ca, "/slow")[:2])
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    assert wait_for(lambda: metric(proxy, "redlb_active_requests") == 1, 10)
    proxy.process.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result == [(200, b"ok b0\n")]
    assert proxy.process.wait(20) == 0


# The store's choice, without a network


def test_store_choice_rules(ca, tmp_path):
    from redlb.tls.certificates import load
    from redlb.tls.store import CertificateStore

    first = Pair(ca, tmp_path, "first", "a.example", "*.x.example", "10.0.0.1")
    second = Pair(ca, tmp_path, "second", "b.example", "a.example", "*.x.example", "*.y.example")
    store = CertificateStore.load([(str(first.cert), str(first.key)),
                                   (str(second.cert), str(second.key))])  # fmt: skip
    one, two = (c.context for c in store.certificates)
    assert store.certificates[0].names == ("a.example", "*.x.example", "10.0.0.1")
    assert store.context_for("a.example") is one  # named by both: the first given wins
    assert store.context_for("b.example.") is two  # a trailing dot is the same name
    assert store.context_for("q.x.example") is one
    assert store.context_for("q.y.example") is two
    assert store.context_for("y.example") is one  # the default
    assert store.context_for("p.q.y.example") is one
    assert store.context_for(None) is one
    # A reload swaps one pair's context; the listener's context stays the same object.
    listener = store.listener_context
    second.issue()
    store.replace(1, load(str(second.cert), str(second.key)))
    assert store.context_for("b.example") is not two
    assert store.listener_context is listener


def test_a_certificate_for_an_ip_address_only_serves(redis_server, backends, start_proxy, ca,
                                                      tmp_path):  # fmt: skip
    redis_server.cli("RPUSH", "servers", backends[0].address)
    ip_only = Pair(ca, tmp_path, "ip", "127.0.0.1")
    port = free_port()
    start_proxy(redis_server.url, "--tls-listen", f"127.0.0.1:{port}", *ip_only.args)
    assert https_get(port, ca)[0] == 200


def test_a_crowd_of_stalled_handshakes_is_let_go(tls, ca):
    """Descriptors held by clients that never finish a handshake come back after the timeout."""
    proxy, port, _ = tls  # --header-timeout 2
    fds_before = open_fds(proxy.pid)
    hello = _client_hello()
    crowd = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            if i % 2:
                sock.sendall(hello[: 10 + i % 50])
            crowd.append(sock)
        assert wait_for(lambda: open_fds(proxy.pid) >= fds_before + 150, 10)
        assert https_get(port, ca)[0] == 200  # served meanwhile
        for sock in crowd:
            try:
                assert sock.recv(65536) == b""
            except ConnectionResetError:
                pass
        assert wait_for(lambda: open_fds(proxy.pid) <= fds_before + 2, 10), open_fds(proxy.pid)
    finally:
        for sock in crowd:
            sock.close()
    assert wait_for(lambda: metric(proxy, "redlb_tls_handshake_failures") == 200, 10)


def test_sighup_with_a_bad_file_says_so_once(tls, ca, pairs):
    proxy, port, _ = tls
    a = pairs[0]
    old = a.der
    text = a.cert.read_bytes()
    a.cert.write_bytes(text[: len(text) // 2])
    assert wait_for(lambda: len(grep(proxy.log(), "not reloaded")) == 1, 10), proxy.log()
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_for(lambda: len(grep(proxy.log(), "not reloaded")) == 2, 10), proxy.log()
    time.sleep(2)  # four more checks of the same files: nothing more to say
    assert len(grep(proxy.log(), "not reloaded")) == 2, proxy.log()
    assert served_der(port, "a.example", ca) == old


def test_websocket_over_tls(redis_server, loop_thread, start_proxy, ca, pairs):
    """wss:// through the TLS listener: the tunnel runs over the TLS transport both ways."""
    from websockets.sync.client import connect

    from support import WsEchoBackend

    echo = WsEchoBackend(loop_thread).start()
    try:
        redis_server.cli("RPUSH", "servers", echo.address)
        port = free_port()
        start_proxy(redis_server.url, "--tls-listen", f"127.0.0.1:{port}", *pairs[0].args)
        big = os.urandom(4 * 1024 * 1024)
        with connect(
            f"wss://a.example:{port}/chat", ssl=client_context(ca), open_timeout=10,
            max_size=None, server_hostname="a.example",
            sock=socket.create_connection(("127.0.0.1", port)),
        ) as ws:  # fmt: skip
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            ws.send(big)
            assert ws.recv(timeout=30) == big
        assert echo.headers[-1]["x-forwarded-proto"] == "https"
    finally:
        echo.stop()
