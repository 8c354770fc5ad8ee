"""The data path end to end: streaming, framing, keep-alive, pipelining, proxy errors."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import socket

import pytest

from support import (
    HttpBackend,
    ScriptedBackend,
    peak_rss,
    raw_exchange,
    request,
    statuses,
    wait_for,
)

MB = 1024 * 1024


@pytest.fixture
def one(redis_server, backends, start_proxy):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    return start_proxy(redis_server.url, "--max-body", "0"), backends[0]


def _rss_growth(label: str, rss: dict[str, int]) -> int:
    print(f"{label}: proxy RSS start {rss['start'] / MB:.1f} MB, peak {rss['peak'] / MB:.1f} MB")
    return rss["peak"] - rss["start"]


def test_200mb_download_with_bounded_memory(one):
    proxy, backend = one
    size = 200 * MB
    with peak_rss(proxy.pid) as rss:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        conn.request("GET", f"/big/{size}")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == size
        got = 0
        while chunk := resp.read(1 << 20):
            got += len(chunk)
        conn.close()
    assert got == size
    assert _rss_growth("download 200 MB", rss) < 32 * MB


def test_200mb_upload_with_bounded_memory(one):
    proxy, backend = one
    size = 200 * MB
    block = b"u" * MB
    digest = hashlib.sha256()

    def body():
        for _ in range(size // MB):
            digest.update(block)
            yield block

    with peak_rss(proxy.pid) as rss:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        conn.request("POST", "/echo", body=body(), headers={"Content-Length": str(size)})
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
    assert resp.status == 200
    assert answer == b"POST /echo len=%d sha=%b\n" % (size, digest.hexdigest().encode())
    assert _rss_growth("upload 200 MB", rss) < 32 * MB


def test_chunked_both_ways(one):
    proxy, backend = one
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    out, _ = raw_exchange(proxy.port, raw, timeout=1)
    assert statuses(out) == [200]
    assert backend.received[-1].body == b"hello world"
    assert backend.received[-1].header(b"transfer-encoding") == [b"chunked"]

    status, data, resp = request(proxy.port, "GET", "/chunked/100000")
    assert status == 200 and len(data) == 100000
    assert resp.getheader("Transfer-Encoding") == "chunked"


def test_head_204_304_have_no_body_and_keep_alive(one):
    proxy, backend = one
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("HEAD", "/big/1000")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    assert resp.getheader("Content-Length") == "1000"
    for code in (204, 304):
        conn.request("GET", f"/status/{code}")
        resp = conn.getresponse()
        assert resp.status == code and resp.read() == b""
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"ok b0\n"
    conn.close()


def test_keepalive_reuse_both_sides(one):
    proxy, backend = one
    before = backend.connections
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for _ in range(20):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == b"ok b0\n"
    conn.close()
    assert backend.connections - before == 1  # one pooled upstream connection served all


def test_pipelined_requests_answered_in_order(one):
    proxy, backend = one
    raw = b"".join(b"GET /echo?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(10))
    out, closed = raw_exchange(proxy.port, raw, timeout=1)
    assert statuses(out) == [200] * 10
    positions = [out.index(b"GET /echo?n=%d " % i) for i in range(10)]
    assert positions == sorted(positions)
    assert not closed


def test_expect_100_continue(one):
    proxy, backend = one
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = sock.recv(100)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"hello")
    final = sock.recv(1000)
    sock.close()
    assert b" 200 " in final and b"len=5" in final
    assert not backend.received[-1].header(b"expect")


def test_forwarding_headers_and_hop_by_hop(one):
    proxy, backend = one
    status, _, resp = request(
        proxy.port, "GET", "/x",
        headers={"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "leak",
                 "Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive",
                 "Proxy-Authorization": "Basic Zm9vOmJhcg==", "TE": "trailers",
                 "X-Forwarded-For": "1.2.3.4", "X-Real-IP": "1.2.3.4",
                 "X-Forwarded-Proto": "https", "X-Keep": "yes", "Host": "front.test"},
    )  # fmt: skip
    assert status == 200
    got = backend.received[-1]
    for name in (
        b"x-hop-secret",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
    ):
        assert not got.header(name), name
    assert got.header(b"x-keep") == [b"yes"]
    assert got.header(b"x-forwarded-for") == [b"1.2.3.4, 127.0.0.1"]
    assert got.header(b"x-real-ip") == [b"127.0.0.1"]
    assert got.header(b"x-forwarded-proto") == [b"http"]
    assert got.header(b"x-forwarded-host") == [b"front.test"]
    assert got.header(b"host") == [b"front.test"]


def test_connection_cannot_strip_framing_or_forwarding(one):
    """Fields named in Connection are dropped, but never the framing redlb relies on."""
    proxy, backend = one
    out, _ = raw_exchange(
        proxy.port,
        b"POST /a HTTP/1.1\r\nHost: t\r\n"
        b"Connection: keep-alive, Content-Length, Host, X-Forwarded-For, X-Real-IP\r\n"
        b"Content-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n",
        timeout=1,
    )
    assert out.count(b"HTTP/1.1 200 ") == 2
    post, get = backend.received[-2:]
    assert (post.method, post.url, post.body) == (b"POST", b"/a", b"hello")
    assert post.header(b"content-length") == [b"5"] and post.header(b"host") == [b"t"]
    assert post.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert post.header(b"x-real-ip") == [b"127.0.0.1"]
    assert (get.method, get.url) == (b"GET", b"/b")


def test_method_path_query_and_body_verbatim(one):
    proxy, backend = one
    status, data, _ = request(proxy.port, "PATCH", "/a%20b/c?x=1&y=%2F", body=b"payload")
    assert status == 200
    got = backend.received[-1]
    assert got.method == b"PATCH" and got.url == b"/a%20b/c?x=1&y=%2F" and got.body == b"payload"


def test_http10_client_gets_no_chunked(one):
    proxy, backend = one
    out, closed = raw_exchange(
        proxy.port, b"GET /chunked/5000 HTTP/1.0\r\nHost: t\r\n\r\n", timeout=2
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert b" 200 " in head and b"transfer-encoding" not in head.lower()
    assert body == b"x" * 5000 and closed


def test_backend_refuses_is_502(redis_server, start_proxy):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    redis_server.cli("RPUSH", "servers", f"127.0.0.1:{port}")
    proxy = start_proxy(redis_server.url)
    status, body, _ = proxy.get("/")
    assert status == 502 and b"refused" in body
    assert proxy.alive()


def test_backend_resets_is_502(redis_server, loop_thread, start_proxy):
    async def reset(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    backend = ScriptedBackend(loop_thread, reset).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    status, body, _ = request(proxy.port, "GET", "/")
    assert status == 502
    assert proxy.alive()
    backend.stop()


def test_backend_hangs_is_504(redis_server, loop_thread, start_proxy):
    async def hang(reader, writer, n):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    backend = ScriptedBackend(loop_thread, hang).start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url, "--upstream-timeout", "1.5")
    status, body, _ = request(proxy.port, "GET", "/", timeout=10)
    assert status == 504 and b"did not answer in time" in body
    backend.stop()


def test_access_log_can_be_turned_off(redis_server, backends, start_proxy):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--no-access-log")
    assert proxy.get("/")[0] == 200
    assert wait_for(lambda: True, 0.3)
    assert "=>" not in proxy.access_log()


def test_ipv6_backend(redis_server, loop_thread, start_proxy):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")

    class V6(HttpBackend):
        @property
        def address(self) -> str:
            return f"[::1]:{self.port}"

        def start(self):
            async def go():
                self.server = await asyncio.start_server(self._serve, "::1", self.port)

            self.loop.run(go())
            return self

    backend = V6(loop_thread, "v6").start()
    redis_server.cli("RPUSH", "servers", backend.address)
    proxy = start_proxy(redis_server.url)
    assert proxy.get("/")[1] == b"ok v6\n"
    backend.stop()


def test_half_closed_client_still_gets_its_answer(one):
    proxy, backend = one
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    assert statuses(out) == [200]  # answered, then closed (recv returned b"")
