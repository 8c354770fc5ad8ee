"""The raw-bytes corpus of ../shared/http-robustness-cases.md, sections 1-6 and 8.

Every case: raw request bytes in; out: the status, whether the connection closed, and what
the capture backend received.  Expectation kinds as in the cases file:
  forward  - must reach the backend and succeed;
  reject   - a 4xx from redlb, nothing with the case marker reaches the backend;
  rn       - reject, or forward exactly one strictly framed message (no smuggled request).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httptools
import pytest

from support import (
    HttpBackend,
    LoopThread,
    Proxy,
    RedisProcess,
    peak_rss,
    raw_exchange,
    read_response,
    statuses,
)

H = b"adv.test"


def smug(case: str) -> bytes:
    return b"GET /adv/%b/SMUGGLED HTTP/1.1\r\nHost: %b\r\n\r\n" % (case.encode(), H)


def post(case: str, headers: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /adv/%b/x %b\r\nHost: %b\r\n%b\r\n%b" % (case.encode(), version, H, headers, body)


def get(
    case: str, headers: bytes = b"", path: bytes = b"/x", version: bytes = b"HTTP/1.1"
) -> bytes:
    return b"GET /adv/%b%b %b\r\nHost: %b\r\n%b\r\n" % (case.encode(), path, version, H, headers)


def cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


@dataclass
class Env:
    proxy: Proxy
    backend: HttpBackend
    canary: socket.socket
    canary_port: int
    redis: RedisProcess

    def seen(self, case: str) -> list[bytes]:
        """Request targets the backend parsed (strictly) that carry this case's marker."""
        marker = b"/adv/%b/" % case.encode()
        return [r.url for r in self.backend.received if marker in r.url]

    def raw_with(self, case: str) -> bytes:
        marker = b"/adv/%b/" % case.encode()
        return b"".join(r for r in self.backend.raw if marker in r)

    def canary_contacted(self) -> bool:
        self.canary.setblocking(False)
        try:
            conn, _ = self.canary.accept()
            conn.close()
            return True
        except BlockingIOError:
            return False


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, loop_thread: LoopThread):
    base: Path = tmp_path_factory.mktemp("corpus")
    redis = RedisProcess(base / "redis").start()
    backend = HttpBackend(loop_thread, "capture").start()
    redis.cli("RPUSH", "servers", backend.address)
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(16)
    proxy = Proxy(
        redis.url,
        "--header-timeout", "2", "--body-rate-grace", "2", "--keepalive-timeout", "3",
        "--upstream-timeout", "5",
        workdir=base / "proxy",
    ).start()  # fmt: skip
    # Preflight: "400 everything" must not pass this suite.
    out, _ = raw_exchange(proxy.port, get("PREFLIGHT"), timeout=2)
    assert statuses(out) == [200], out
    yield Env(proxy, backend, canary, canary.getsockname()[1], redis)
    proxy.stop()
    backend.stop()
    canary.close()
    redis.kill()


def strict_messages(raw: bytes) -> list[tuple[bytes, list[tuple[bytes, bytes]], bytes]]:
    """Parse what the backend got with a strict parser: (target, headers, body) each."""
    messages: list[tuple[bytes, list[tuple[bytes, bytes]], bytes]] = []
    state: dict[str, object] = {"url": b"", "headers": [], "body": b""}

    class Callbacks:
        def on_url(self, url: bytes) -> None:
            state["url"] = state["url"] + url  # type: ignore[operator]

        def on_header(self, n: bytes, v: bytes) -> None:
            state["headers"].append((n, v))  # type: ignore[attr-defined]

        def on_body(self, b: bytes) -> None:
            state["body"] = state["body"] + b  # type: ignore[operator]

        def on_message_complete(self) -> None:
            messages.append((state["url"], state["headers"], state["body"]))  # type: ignore[arg-type]
            state.update(url=b"", headers=[], body=b"")

    httptools.HttpRequestParser(Callbacks()).feed_data(raw)
    return messages


def assert_reject(env: Env, case: str, out: bytes, closed: bool, close: bool = True,
                  codes: tuple[int, ...] = ()) -> None:  # fmt: skip
    got = statuses(out)
    assert got, f"{case}: no response at all (closed={closed})"
    assert 400 <= got[0] < 500 or got[0] in (501, 505), f"{case}: status {got}"
    if codes:
        assert got[0] in codes, f"{case}: status {got[0]} not in {codes}"
    assert not env.seen(case), f"{case}: reached the backend"
    assert not env.raw_with(case), f"{case}: bytes of it reached the backend"  # even partly
    if close:
        assert closed, f"{case}: connection left open after a framing error"


def assert_rn(env: Env, case: str, out: bytes, closed: bool, close_on_accept: bool = False) -> None:
    got = statuses(out)
    assert got, f"{case}: no response"
    assert got[0] != 500
    if got[0] >= 400 and got[0] != 502:
        assert not env.seen(case), f"{case}: rejected yet forwarded"
        return
    raw = env.raw_with(case)
    messages = strict_messages(raw)
    marked = [m for m in messages if b"/adv/%b/" % case.encode() in m[0]]
    assert len(marked) == 1, f"{case}: backend saw {len(marked)} messages"
    assert all(b"SMUGGLED" not in m[0] for m in messages), f"{case}: smuggled request"
    headers = [(n.lower(), v) for n, v in marked[0][1]]
    framing = [n for n, _ in headers if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, f"{case}: ambiguous framing forwarded: {framing}"
    assert all(b"\x00" not in v and b"\r" not in v and b"\n" not in v for _, v in headers)
    assert [n for n, _ in headers].count(b"host") == 1
    if close_on_accept:
        assert closed, f"{case}: TE+CL accepted but the connection stayed open"


@dataclass
class Case:
    id: str
    raw: bytes
    kind: str  # forward | reject | rn
    close: bool = True  # reject: closed after; rn: close-on-accept
    codes: tuple[int, ...] = ()
    check: Callable[[Env, bytes], None] | None = None


def _body_is(expected: bytes) -> Callable[[Env, bytes], None]:
    def check(env: Env, out: bytes) -> None:
        assert env.backend.received[-1].body == expected

    return check


SMG01_BODY = b"0\r\n\r\n" + smug("SMG-01")
SMG02_SMUG = b"GET /adv/SMG-02/SMUGGLED HTTP/1.1\r\nHost: adv.test\r\nContent-Length: 15\r\n\r\nx=1"
SMG02_BODY = b"%x\r\n" % len(SMG02_SMUG) + SMG02_SMUG + b"\r\n0\r\n\r\n"

CASES = [
    # 1. Positive controls
    Case("CTL-02", post("CTL-02", cl(b"hello world"), b"hello world"), "forward",
         check=_body_is(b"hello world")),
    Case("CTL-03", post("CTL-03", b"Transfer-Encoding: chunked\r\n",
                        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
         "forward", check=_body_is(b"hello world")),
    Case("CTL-06", get("CTL-06", b"Cookie: c=" + b"a" * 6000 + b"\r\n"), "forward"),
    # 2. Framing / smuggling
    Case("SMG-01", post("SMG-01", cl(SMG01_BODY) + b"Transfer-Encoding: chunked\r\n", SMG01_BODY), "rn"),
    Case("SMG-02", post("SMG-02", b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", SMG02_BODY), "rn"),
    Case("SMG-03", post("SMG-03", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                        b"1\r\nZ\r\n0\r\n\r\n"), "reject"),
    Case("SMG-04", post("SMG-04", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"
                        + cl(SMG01_BODY), b"0\r\n\r\n" + smug("SMG-04")), "reject"),
    Case("SMG-05", post("SMG-05", cl(SMG01_BODY) + b"Transfer-Encoding : chunked\r\n", SMG01_BODY),
         "reject", codes=(400,)),
    Case("SMG-06", post("SMG-06", b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n", b"hello"), "rn"),
    Case("SMG-07", post("SMG-07", b"Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n",
                        b"0\r\n\r\n"), "rn"),
    Case("SMG-08", post("SMG-08", b"Content-Length: 5\r\nTransfer-Encoding: \x0bchunked\r\n",
                        b"0\r\n\r\n"), "reject"),
    Case("SMG-10", post("SMG-10", b"Transfer-Encoding: chunked, chunked\r\n", b"1\r\nZ\r\n0\r\n\r\n"),
         "reject", codes=(400,)),
    Case("SMG-11", post("SMG-11", b"Transfer-Encoding: ,chunked\r\n" + cl(SMG01_BODY),
                        b"0\r\n\r\n" + smug("SMG-11")), "rn"),
    Case("SMG-12", post("SMG-12", b"Content-Length: 0\r\n" + cl(smug("SMG-12")), smug("SMG-12")),
         "reject", codes=(400,)),
    Case("SMG-13", post("SMG-13", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), "rn"),
    Case("SMG-14", post("SMG-14", b"Content-Length: 5, 5\r\n", b"hello"), "reject"),
    Case("SMG-15", post("SMG-15", b"Content-Length: +5\r\n", b"hello"), "reject"),
    Case("SMG-16", post("SMG-16", b"Content-Length: 0x10\r\n", b"0123456789abcdef"), "reject"),
    Case("SMG-17", post("SMG-17", b"Content-Length: -1\r\n", b"x"), "reject"),
    Case("SMG-18", post("SMG-18", b"Content-Length: \r\n" + cl(smug("SMG-18")), smug("SMG-18")), "reject"),
    Case("SMG-19", post("SMG-19", b"Content-Length: " + b"9" * 30 + b"\r\n", b"x"), "reject"),
    Case("SMG-20", post("SMG-20", b"Transfer-Encoding: chunked\r\n", b"Z\r\nZZ\r\nZZZ\r\n\r\n"), "reject"),
    Case("SMG-21", post("SMG-21", b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"), "reject"),
    Case("SMG-22", post("SMG-22", b"Transfer-Encoding: chunked\r\n",
                        b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"), "reject"),
    Case("SMG-23", post("SMG-23", b"Transfer-Encoding: chunked\r\n", b"f" * 21 + b"\r\nx\r\n0\r\n\r\n"),
         "reject"),
    Case("SMG-24", post("SMG-24", b"Transfer-Encoding: chunked\r\n", b"3\r\nxxx__1a\r\n0\r\n\r\n"), "reject"),
    Case("SMG-26", post("SMG-26", b"Transfer-Encoding: chunked\r\n", b"a\r\n0123456789\n0\r\n\r\n"), "rn"),
    Case("SMG-27", post("SMG-27", b"Transfer-Encoding: chunked\r\n", b"5;\nhello\r\n0\r\n\r\n"), "rn"),
    Case("SMG-29", post("SMG-29", b"Transfer-Encoding: chunked\r\n" + cl(SMG01_BODY),
                        b"0\r\n\r\n" + smug("SMG-29"), version=b"HTTP/1.0"), "rn"),
    Case("SMG-29b", post("SMG-29b", b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n",
                         version=b"HTTP/1.0"), "reject"),
    Case("SMG-30", b"GET /adv/SMG-30/x HTTP/1.1\r\nHost: adv.test\r\n" + cl(smug("SMG-30")) + b"\r\n"
         + smug("SMG-30"), "rn", close=False, check=_body_is(smug("SMG-30"))),
    Case("SMG-32", post("SMG-32", b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n", b"hello"), "rn"),
    Case("SMG-33", post("SMG-33", b"Transfer-Encoding: chunked;ext=val\r\nContent-Length: 5\r\n",
                        b"hello"), "rn"),
    Case("SMG-34", post("SMG-34", b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), "rn"),
    # 3. Header and request-line hygiene
    Case("PRS-01", get("PRS-01", b"X-Test: v\x00alue\r\n"), "rn"),
    Case("PRS-02", get("PRS-02", b"Visible: :/\rSmuggled: :)\r\n"), "rn"),
    Case("PRS-03", get("PRS-03").replace(b"\r\n", b"\n"), "rn"),
    Case("PRS-05", get("PRS-05", b"X-Folded: a\r\n b\r\n"), "rn"),
    Case("PRS-06", b"GET /adv/PRS-06/x HTTP/1.1\r\n X-Evil: 1\r\nHost: adv.test\r\n\r\n", "rn"),
    Case("PRS-07", post("PRS-07", b"Content-Length : %d\r\n" % len(smug("PRS-07")), smug("PRS-07")),
         "reject", codes=(400,)),
    Case("PRS-08", get("PRS-08", b"Foo Bar: x\r\n"), "reject"),
    Case("PRS-09", get("PRS-09", b": ignored\r\n"), "reject"),
    Case("PRS-10", post("PRS-10", b"Content-Length 10\r\n", b"0123456789"), "reject"),
    Case("PRS-11", post("PRS-11", b"Content-Length\x85: 10\r\n", b"0123456789"), "rn"),
    Case("PRS-12", get("PRS-12", b"Foo\x01: x\r\n"), "reject"),
    Case("PRS-13", b'G=":<>(e),[T];?" /adv/PRS-13/x HTTP/1.1\r\nHost: adv.test\r\n\r\n', "reject"),
    Case("PRS-14", get("PRS-14", version=b"HTTP/1.32"), "reject"),
    Case("PRS-15", get("PRS-15", version=b"HTTP/2.0"), "rn"),
    Case("PRS-16", b"GET /adv/PRS-16/x\r\n\r\n", "reject"),
    Case("PRS-17", b"GET /adv/PRS-17/x x HTTP/1.1\r\nHost: adv.test\r\n\r\n", "reject"),
    Case("PRS-18", b"GET /adv/PRS-18/x\nHTTP/1.1\r\nHost: adv.test\r\n\r\n", "reject"),
    Case("PRS-20", get("PRS-20", path=b"/\xff\xfe"), "rn"),
    Case("PRS-21", get("PRS-21", path=b"/x#frag"), "rn"),
    Case("PRS-22", get("PRS-22", version=b"http/1.1"), "reject"),
    # 4. Request target, Host, open proxy (canary cases are tested below)
    Case("TGT-01", b"GET /adv/TGT-01/x HTTP/1.1\r\n\r\n", "reject", codes=(400,)),
    Case("TGT-02", get("TGT-02", b"Host: other.invalid\r\n"), "reject", codes=(400,)),
    Case("TGT-03", b"GET /adv/TGT-03/x HTTP/1.1\r\nHost: adv.test@evil/x y\r\n\r\n", "reject",
         codes=(400,)),
    Case("TGT-08", b"GET * HTTP/1.1\r\nHost: adv.test\r\n\r\n", "reject", codes=(400,)),
    Case("TGT-09", b"GET adv/TGT-09/admin HTTP/1.1\r\nHost: adv.test\r\n\r\n", "reject", codes=(400,)),
    # 5. Size limits
    Case("LIM-01", b"GET /adv/LIM-01/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: adv.test\r\n\r\n",
         "reject", codes=(414, 400, 431)),
    Case("LIM-02", get("LIM-02", b"X-Big: " + b"a" * 100_000 + b"\r\n"), "reject", codes=(431, 400)),
    Case("LIM-03", get("LIM-03", b"".join(b"X-H%d: v\r\n" % i for i in range(200))), "reject",
         codes=(431, 400)),
    Case("LIM-04", get("LIM-04", b"".join(b"X-%d: v\r\n" % i for i in range(10_000))), "reject",
         codes=(431, 400)),
    Case("LIM-07", post("LIM-07", b"Transfer-Encoding: chunked\r\n",
                        b"5;" + b"e" * 100_000 + b"\r\nhello\r\n0\r\n\r\n"), "reject", codes=(400, 413)),
    # 6. Hop-by-hop, forwarding, injection
    Case("HOP-06", get("HOP-06", b"X_Forwarded_For: 6.6.6.6\r\nContent_Length: 0\r\n"), "rn", close=False),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(env: Env, case: Case) -> None:
    out, closed = raw_exchange(env.proxy.port, case.raw, timeout=1.5)
    if case.kind == "forward":
        assert statuses(out)[:1] == [200], (case.id, out[:300])
        assert env.seen(case.id)
    elif case.kind == "reject":
        assert_reject(env, case.id, out, closed, case.close, case.codes)
    else:
        assert_rn(env, case.id, out, closed, close_on_accept=case.close and b"Transfer-Encoding" in case.raw
                  and b"Content-Length" in case.raw)  # fmt: skip
    if case.check is not None and statuses(out)[:1] == [200]:
        case.check(env, out)
    assert env.proxy.alive()


def test_CTL_01_exact_bytes_at_the_backend(env: Env) -> None:
    out, closed = raw_exchange(env.proxy.port, get("CTL-01"), timeout=1)
    assert statuses(out) == [200] and not closed
    raw = env.raw_with("CTL-01")
    assert raw.endswith(
        b"GET /adv/CTL-01/x HTTP/1.1\r\nHost: adv.test\r\nX-Forwarded-Host: adv.test\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\n"
        b'Forwarded: for=127.0.0.1;host="adv.test";proto=http\r\n'
        b"X-Real-IP: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Port: %d\r\n\r\n" % env.proxy.port
    )


def test_CTL_04_two_requests_one_write(env: Env) -> None:
    raw = get("CTL-04", path=b"/one") + get("CTL-04", path=b"/two")
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    assert statuses(out) == [200, 200]
    assert env.seen("CTL-04")[-2:] == [b"/adv/CTL-04/one", b"/adv/CTL-04/two"]


def test_CTL_05_head(env: Env) -> None:
    out, _ = raw_exchange(
        env.proxy.port, b"HEAD /adv/CTL-05/x HTTP/1.1\r\nHost: adv.test\r\n\r\n", 1
    )
    assert statuses(out) == [200] and out.endswith(b"\r\n\r\n")


def test_CTL_07_expect_continue_body_after_a_second(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5)
    sock.sendall(post("CTL-07", b"Content-Length: 22\r\nExpect: 100-continue\r\n"))
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    time.sleep(1)
    sock.sendall(b"0123456789012345678901")
    out = sock.recv(1000)
    sock.close()
    assert statuses(out) == [200]
    assert env.backend.received[-1].body == b"0123456789012345678901"


def test_CTL_08_sequential_requests_reuse_the_connection(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5)
    for path in (b"/a", b"/b"):
        sock.sendall(get("CTL-08", path=path))
        got = read_response(sock)
        assert statuses(got) == [200], got
    sock.close()


def test_CTL_09_host_case_and_port(env: Env) -> None:
    raw = b"GET /adv/CTL-09/x HTTP/1.1\r\nHost: ADV.TEST:%d\r\n\r\n" % env.proxy.port
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    assert statuses(out) == [200]


def test_SMG_28_missing_last_chunk_is_never_complete(env: Env) -> None:
    raw = post("SMG-28", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")
    out, closed = raw_exchange(env.proxy.port, raw, timeout=6)
    assert not any(200 <= s < 300 for s in statuses(out))
    assert closed
    assert all(r.body != b"hello" for r in env.backend.received if b"SMG-28" in r.url)


def test_TGT_04_05_absolute_form_never_dials(env: Env) -> None:
    c = env.canary_port
    raw = b"GET http://127.0.0.1:%d/adv/TGT-04/OPENPROXY HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (
        c,
        c,
    )
    raw_exchange(env.proxy.port, raw, timeout=1)
    raw = b"GET http://adv.test/adv/TGT-05/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % c
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    if statuses(out)[:1] == [200]:
        got = [r for r in env.backend.received if b"TGT-05" in r.url][-1]
        assert got.url == b"/adv/TGT-05/x" and got.header(b"host") == [b"adv.test"]
    assert not env.canary_contacted()


def test_TGT_06_connect_is_refused(env: Env) -> None:
    raw = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % ((env.canary_port,) * 2)
    out, closed = raw_exchange(env.proxy.port, raw, timeout=1)
    assert statuses(out)[:1] == [405] and closed
    assert not env.canary_contacted()


def test_TGT_07_unknown_host_with_host_allow_list(env: Env, start_proxy) -> None:
    proxy = start_proxy(env.redis.url, "--host", "adv.test")
    raw = b"GET /adv/TGT-07/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % env.canary_port
    out, _ = raw_exchange(proxy.port, raw, timeout=1)
    assert statuses(out)[:1] == [421]
    assert not env.seen("TGT-07") and not env.canary_contacted()
    out, _ = raw_exchange(proxy.port, get("TGT-07b"), timeout=1)
    assert statuses(out) == [200]


def test_LIM_05_huge_content_length_is_413_at_once(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=3)
    sock.sendall(post("LIM-05", b"Content-Length: 10737418240\r\n", b"x" * 1024))
    sock.settimeout(1.5)  # answered at once, without waiting for the body
    out = sock.recv(1000)
    sock.close()
    assert statuses(out) == [413]
    assert not env.seen("LIM-05")


def test_LIM_06_chunked_upload_past_the_limit(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5)
    sock.sendall(post("LIM-06", b"Transfer-Encoding: chunked\r\n"))
    chunk = b"%x\r\n%b\r\n" % (65536, b"z" * 65536)
    sent = 0
    try:
        while sent < 20 * 1024 * 1024:
            sock.sendall(chunk)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 20 * 1024 * 1024  # stopped before twice the 10 MiB limit
    try:
        out = sock.recv(1000)
    except ConnectionResetError:
        out = b""
    sock.close()
    assert statuses(out)[:1] in ([413], [])


def test_HOP_01_03_04_headers(env: Env) -> None:
    raw = get("HOP-01", b"Connection: keep-alive, X-Hop-Secret, X-Forwarded-For\r\nX-Hop-Secret: leak\r\n"
              b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
              b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Forwarded-For: 1.2.3.4\r\n"
              b"X-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\n")  # fmt: skip
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    assert statuses(out) == [200]
    got = [r for r in env.backend.received if b"HOP-01" in r.url][-1]
    for name in (b"x-hop-secret", b"keep-alive", b"proxy-connection", b"proxy-authorization"):
        assert not got.header(name)
    assert all(b"x-hop-secret" not in v.lower() for v in got.header(b"connection"))
    assert got.header(b"x-forwarded-for")[-1].split(b",")[-1].strip() == b"127.0.0.1"
    assert got.header(b"x-real-ip") == [b"127.0.0.1"]


def test_HOP_02_h2c_upgrade_is_not_tunnelled(env: Env) -> None:
    raw = get(
        "HOP-02",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    )
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    assert 101 not in statuses(out) and b" 101 " not in out
    got = [r for r in env.backend.received if b"HOP-02" in r.url][-1]
    assert not got.header(b"upgrade") and not got.header(b"http2-settings")


def test_HOP_05_crlf_in_path_stays_encoded(env: Env) -> None:
    out, _ = raw_exchange(
        env.proxy.port, get("HOP-05", path=b"/x%0d%0aX-Injected:%20yes"), timeout=1
    )
    assert statuses(out) == [200]
    got = [r for r in env.backend.received if b"HOP-05" in r.url][-1]
    assert not got.header(b"x-injected")


def test_HOP_06_underscore_headers_dropped(env: Env) -> None:
    out, _ = raw_exchange(
        env.proxy.port, get("HOP-06b", b"X_Forwarded_For: 6.6.6.6\r\n"), timeout=1
    )
    got = [r for r in env.backend.received if b"HOP-06b" in r.url][-1]
    assert not got.header(b"x_forwarded_for")
    assert b"6.6.6.6" not in b"".join(got.header(b"x-forwarded-for"))


def test_HOP_07_error_page_does_not_reflect(env: Env) -> None:
    raw = get("HOP-07", b"X-Bad: \x00\r\n", path=b"/<script>alert(1)</script>")
    out, _ = raw_exchange(env.proxy.port, raw, timeout=1)
    assert statuses(out) and statuses(out)[0] >= 400
    assert b"<script>" not in out


def test_HOP_09_http10_no_chunked(env: Env) -> None:
    out, closed = raw_exchange(
        env.proxy.port, b"GET /chunked/3000 HTTP/1.0\r\nHost: adv.test\r\n\r\n", 2
    )
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower() and body == b"x" * 3000


# 8. Slow and abusive clients (timeouts shortened by flags: header 2 s, keep-alive 3 s)


def _trickle_until_cut_off(sock: socket.socket, piece: Callable[[int], bytes]) -> None:
    """Send a piece every 0.5 s for up to 8 s: the proxy must answer 408 or close first."""
    out = b""
    cut_off = False
    try:
        for i in range(16):
            sock.sendall(piece(i))
            time.sleep(0.5)
    except (BrokenPipeError, ConnectionResetError):
        cut_off = True
    try:
        out = sock.recv(1000)
    except ConnectionResetError:
        cut_off = True
    assert cut_off or statuses(out)[:1] == [408]
    assert statuses(out)[:1] in ([408], [])


def test_SLOW_01_headers_one_line_per_second(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.sendall(b"GET /adv/SLOW-01/x HTTP/1.1\r\n")
    _trickle_until_cut_off(sock, lambda i: b"X-Slow-%d: 1\r\n" % i)
    sock.close()


def test_SLOW_02_silent_connection_is_closed(env: Env) -> None:
    # The socket timeout is the bar (header timeout 2 s + slack): recv raises past it.
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=2 + 2)
    assert sock.recv(100) == b""
    sock.close()


def test_SLOW_03_body_one_byte_per_second(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.sendall(post("SLOW-03", b"Content-Length: 100000\r\n"))
    _trickle_until_cut_off(sock, lambda i: b"x")
    sock.close()


def test_SLOW_04_unread_response_holds_bounded_memory(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    with peak_rss(env.proxy.pid) as rss:
        sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: adv.test\r\n\r\n" % (128 * 1024 * 1024))
        time.sleep(2)
        out, _ = raw_exchange(env.proxy.port, get("SLOW-04"), timeout=2)
        assert statuses(out) == [200]  # a parallel control request still works
    sock.close()
    assert rss["peak"] - rss["start"] < 64 * 1024 * 1024


def test_SLOW_05_idle_flood(env: Env) -> None:
    socks = [socket.create_connection(("127.0.0.1", env.proxy.port), timeout=5) for _ in range(256)]
    out, _ = raw_exchange(env.proxy.port, get("SLOW-05a"), timeout=2)
    assert statuses(out) == [200]
    for s in socks:
        s.close()
    out, _ = raw_exchange(env.proxy.port, get("SLOW-05b"), timeout=2)
    assert statuses(out) == [200]


def test_SLOW_06_idle_keepalive_is_closed(env: Env) -> None:
    sock = socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10)
    sock.sendall(get("SLOW-06"))
    assert statuses(sock.recv(1000)) == [200]
    sock.settimeout(3 + 2)  # keep-alive timeout 3 s + slack: recv raises past it
    assert sock.recv(100) == b""
    sock.close()


def test_no_socket_leak_after_the_corpus(env: Env) -> None:
    from support import open_fds

    time.sleep(1)
    fds = open_fds(env.proxy.pid)
    assert fds < 60, fds  # listeners, Redis, pooled backend connections; no client leftovers
