"""Adversarial review of session 3's merges: the repeated-read fast paths (rule 5 on both
sides), the compiled-by-default build, the access log formats, the strategy rewrites and the
CLI's exit codes.  Each test here failed before the fix its docstring names."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import redlb
from redlb import build
from redlb.address import Backend
from redlb.balancer.load import LoadView
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.snapshot import Snapshot
from support import (
    ScriptedBackend,
    metric_sum,
    raw_exchange,
    read_response,
    scrape,
    wait_for,
)

SRC = Path(redlb.__file__).resolve().parent.parent

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


# Compiled by default: a machine whose compiler cannot compile is a machine without one


def test_a_compiler_that_cannot_compile_means_the_pure_build_is_expected() -> None:
    """`CC=/bin/false make test` on a fresh clone: setup.py's compile failed (the install
    was pure, as it should), but build.py told the Makefile to expect the compiled build,
    since /bin/false exists, and test_build failed the run."""
    env = {**os.environ, "CC": "/bin/false"}
    out = subprocess.run(
        [sys.executable, str(SRC / "redlb" / "build.py")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.stdout.strip() == "pure", out.stdout + out.stderr
    assert build.missing_toolchain({"CC": "/bin/false"}) is not None
    if build.missing_toolchain() is None:  # where this machine's compiler works, it still says so
        assert build.missing_toolchain({"CC": os.environ.get("CC", "")}) is None


# Downstream rule 5: what each repeated request still gets (held)


def test_repeated_reads_are_each_logged_counted_and_forwarded_for_their_own_peer(
    redis_server, backends, start_proxy
):
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    socks = []
    for source in ("127.0.0.1", "127.0.0.2"):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5,
                                        source_address=(source, 0))  # fmt: skip
        socks.append(sock)
    try:
        for _ in range(4):
            for sock in socks:
                assert _ask(sock, GET).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    received = backends[0].received
    assert wait_for(lambda: len(received) == 8)
    peers = [r.header(b"X-Forwarded-For") for r in received]
    assert peers == [[b"127.0.0.1"], [b"127.0.0.2"]] * 4, peers
    assert [r.header(b"X-Real-IP") for r in received] == [[b"127.0.0.1"], [b"127.0.0.2"]] * 4
    assert wait_for(lambda: proxy.access_log().count("GET /same => 200") == 8, 5), (
        proxy.access_log()
    )
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 8, 5)


def test_repeats_around_a_stripped_h2c_upgrade_are_each_one_request(
    redis_server, backends, start_proxy
):
    """The parser goes on after an Upgrade that is not a WebSocket's (downstream._feed):
    reads repeated before and after it are each the one request they are (held)."""
    upgrade = (
        b"GET /same HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    sent = [GET, upgrade, GET, GET, upgrade, upgrade, GET, GET]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        answers = [_ask(sock, data)[:12] for data in sent]
    assert answers == [b"HTTP/1.1 200"] * len(sent), answers
    received = backends[0].received
    assert wait_for(lambda: len(received) == len(sent)), len(received)
    assert [bool(r.header(b"Upgrade")) for r in received] == [False] * len(sent)
    assert [bool(r.header(b"User-Agent")) for r in received] == [d == GET for d in sent]


# The access log: a backend's reason phrase is written into it (and relayed to the client)


def test_control_characters_in_a_reason_phrase_reach_neither_the_log_nor_the_client(
    redis_server, loop_thread, start_proxy
):
    """llhttp takes any byte but CR and LF in a reason phrase: a backend's VT, FF, FS or
    escape sequence went raw into the text access log (line breaks to str.splitlines and to
    many log shippers, terminal control to whoever tails it) and to the client's status
    line, where RFC 9112 §4 allows only HTAB, SP, VCHAR and obs-text."""
    reason = b"OK\x0b- => 200 forged\x1c\x1b[2J\x00"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int) -> None:
        while True:
            await backend.read_request(reader)
            writer.write(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend = ScriptedBackend(loop_thread, script).start()
    try:
        redis_server.cli("RPUSH", "servers", backend.address)
        proxy = start_proxy(redis_server.url)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            answers = [_ask(sock, GET) for _ in range(3)]  # the repeated answers too (rule 5)
        for answer in answers:
            status_line = answer.partition(b"\r\n")[0]
            assert status_line.startswith(b"HTTP/1.1 200 OK"), answer
            assert all(byte >= 0x20 and byte != 0x7F for byte in status_line), status_line
        assert wait_for(lambda: proxy.access_log().count("GET /same => 200") == 3, 5)
        log = proxy.access_log()
        assert len(log.splitlines()) == 3, repr(log)
        assert not any(ord(c) < 0x20 and c != "\n" for c in log), repr(log)
    finally:
        backend.stop()


def _read_head_only(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


VARIANTS = [
    GET,
    b"GET /same?q=1&r=%41 HTTP/1.1\r\nHost: H:80\r\nX-Forwarded-For: 6.6.6.6\r\n"
    b"Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
    b"GET http://h/abs HTTP/1.1\r\nHost: other\r\n\r\n",
    b"GET /same HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
    b"GET /same HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /same HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS /same HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"DELETE /same HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
    b"GET /same HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
    b"Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nX_Under: 1\r\n\r\n",
    b"GET /status/304 HTTP/1.1\r\nHost: h\r\nIf-None-Match: x\r\n\r\n",
    b"GET /status/204 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /status/404 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /big/70000 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /same HTTP/1.1\r\nHost: h\r\n\r\n\r\n",  # a CRLF after the request
    b"POST /same HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]


def test_a_request_repeated_whole_is_forwarded_and_answered_as_when_split(
    redis_server, backends, start_proxy
):
    """Differential: each request sent three times whole on one connection (the repeats
    take downstream and upstream rule 5) and three times split in two reads on another
    (always parsed): the backend gets the same heads and the client the same answers (held)."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    received = backends[0].received
    for request in VARIANTS:
        seen = []
        for split in (False, True):
            before = len(received)
            answers = []
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                for _ in range(3):
                    if split:
                        sock.sendall(request[:9])
                        time.sleep(0.05)
                        sock.sendall(request[9:])
                    else:
                        sock.sendall(request)
                    head = request.startswith(b"HEAD")
                    answers.append(_read_head_only(sock) if head else read_response(sock))
            assert wait_for(lambda b=before: len(received) == b + 3), (request, received[before:])
            heads = [(r.method, r.url, r.headers, r.body) for r in received[before:]]
            seen.append((answers, heads))
        (whole, whole_heads), (split_answers, split_heads) = seen
        assert whole == split_answers, request
        assert whole_heads == split_heads, request
        assert whole_heads[0] == whole_heads[1] == whole_heads[2], request


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Hop\r\nX-Hop: s\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\n\r\nno",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=9\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n",  # bytes after the response
]


def test_a_response_repeated_whole_is_relayed_as_when_split(redis_server, loop_thread, start_proxy):
    """Differential on the backend side: each response written whole three times (upstream
    rule 5 for the repeats) to one proxy, and split in two writes to another: the clients get
    the same answers, and the backend connections are reused alike (held)."""
    plan: dict[str, bytes] = {}

    def scripted(split: bool) -> ScriptedBackend:
        async def script(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int
        ) -> None:
            while True:
                await backend.read_request(reader)
                response = plan["response"]
                if split:
                    writer.write(response[:12])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(response[12:])
                else:
                    writer.write(response)
                await writer.drain()

        backend = ScriptedBackend(loop_thread, script).start()
        return backend

    whole, split = scripted(False), scripted(True)
    try:
        redis_server.cli("RPUSH", "whole", whole.address)
        redis_server.cli("RPUSH", "split", split.address)
        proxies = [start_proxy(redis_server.url, pool=name) for name in ("whole", "split")]
        for response in RESPONSES:
            plan["response"] = response
            seen = []
            for proxy, backend in zip(proxies, (whole, split), strict=True):
                connections = backend.connections
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                    answers = [_ask(sock, GET) for _ in range(3)]
                seen.append((answers, backend.connections - connections))
            assert seen[0] == seen[1], (response, seen)
    finally:
        whole.stop()
        split.stop()


def test_refused_targets_with_control_bytes_stay_on_one_line_in_both_formats(
    redis_server, backends, start_proxy
):
    """The refusal line shows the target read so far (held)."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    hostile = [
        b"GET /a\x0bforged => 200 OK HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a\x1b[2Jb HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a\rGET /forged HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a\nGET /forged HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /\xc3\xa9\x85x HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /" + b"a" * 9000 + b"\x0b HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
    for log_format in ("text", "json"):
        proxy = start_proxy(redis_server.url, "--log-format", log_format)
        for data in hostile:
            answer, _ = raw_exchange(proxy.port, data, timeout=2)
            assert answer.startswith(b"HTTP/1.1 4"), (data, answer[:60])
        assert wait_for(lambda p=proxy: len(p.access_log().splitlines()) >= len(hostile), 5)
        log = proxy.access_log()
        assert len(log.splitlines()) == len(hostile), repr(log)
        assert not any(ord(c) < 0x20 and c != "\n" for c in log), repr(log)
        assert "forged" not in log.replace("\\u000bforged", ""), repr(log)
        if log_format == "json":
            assert all(json.loads(line)["refused"] for line in log.splitlines())
        assert len(backends[0].received) == 0


# Strategies: bounded loads and weights


def test_bounded_loads_keep_the_weights() -> None:
    """hash with weights 3:1 under load: bounded loads capped every backend at (1 + eps) x
    the plain average, so the heavy one was held to 62.5% of the requests in flight, not
    its 75% (the bound is on each backend's weighted share of the load)."""
    load = LoadView()
    strategy = RendezvousHash(load, balance=0.25)
    heavy, light = Backend("10.0.0.1", 80), Backend("10.0.0.2", 80)
    candidates = Snapshot.of([heavy, light], [3, 1])
    for i in range(4000):
        picked = strategy.pick(candidates, b"user-%d" % i)
        load.started(picked)
        total = load.local_total
        assert load.local.get(heavy.key, 0) <= max(-(-1250 * total * 3 // 4000), 2)
        assert load.local.get(light.key, 0) <= max(-(-1250 * total * 1 // 4000), 2)
    share = load.local[heavy.key] / load.local_total
    assert 0.72 < share < 0.78, share
