"""Adversarial review of session 4's merges: strategies compiled, periodic work and /metrics
sliced across turns of the loop.  Each test here failed before the fix its docstring names."""

from __future__ import annotations

import re
import socket
import threading
import time

from support import wait_for

first_byte_at = 0.0  # when _read_answer's answer began to arrive


def _read_answer(sock: socket.socket, deadline: float) -> bytes:
    """One status answer (head and body), or what came before the connection ended."""
    global first_byte_at
    data = b""
    while time.monotonic() < deadline:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            if len(rest) >= length:
                return data
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        if not data:
            first_byte_at = time.monotonic()
        data += chunk
    return data


def test_a_scrape_asked_before_the_idle_deadline_is_answered_though_built_after_it(
    redis_server, backends, start_proxy
):
    """A keep-alive scraper asks for /metrics just inside the status port's idle timeout
    (a scrape interval equal to it: Prometheus keeps its connection).  The answer is built
    over several turns; the idle timer, left running while it was built, aborted the
    connection mid-build and the scrape got nothing (fixed: no idle timer while an answer
    is built; it is armed again when the answer goes out)."""
    client = redis_server.client()
    client.rpush("routed", *[b.address for b in backends[:2]])
    client.hset("redlb:routes", mapping={f"h{i}.example.com/": "routed" for i in range(5000)})
    proxy = start_proxy(redis_server.url)
    assert wait_for(lambda: proxy.status("/metrics")[1].count(b"redlb_route_members{") == 5000, 30)

    # Other scrapers keep the worker's loop busy building theirs: ours takes many turns.
    stop = threading.Event()

    def scrape_forever() -> None:
        while not stop.is_set():
            try:
                proxy.status("/metrics")
            except OSError:
                pass

    others = [threading.Thread(target=scrape_forever, daemon=True) for _ in range(10)]
    for thread in others:
        thread.start()
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        failures = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", proxy.status_port), timeout=15) as sock:
                sock.sendall(request)
                first = _read_answer(sock, time.monotonic() + 15)
                assert first.startswith(b"HTTP/1.1 200"), first[:200]
                # The server armed its timer as it wrote that answer: ask 20 ms before the
                # timeout, less than a build takes while the others build theirs.
                time.sleep(max(0.0, first_byte_at + 4.98 - time.monotonic()))
                sock.sendall(request)
                second = _read_answer(sock, time.monotonic() + 15)
                if not second.startswith(b"HTTP/1.1 200"):
                    failures.append(second[:80])
        assert not failures, failures
    finally:
        stop.set()
        for thread in others:
            thread.join(timeout=10)


def test_routes_edited_just_before_redis_stalls_are_applied_when_it_is_back(
    redis_server, backends, start_proxy
):
    """1,500 routes to new pools written, then Redis stalls (DEBUG SLEEP) while the worker
    subscribes to and reads the new pools (in slices, many round trips): the session ends,
    and the next one found the routes' digest unchanged and every pool known, so the table
    was never rebuilt: the new hosts got 404 for good (fixed: a table owed is built by the
    next sync that completes, whatever session it is in)."""
    from support import request

    client = redis_server.client()
    client.rpush("routed", backends[0].address)
    client.hset("redlb:routes", mapping={f"h{i}.example.com/": "routed" for i in range(100)})
    proxy = start_proxy(redis_server.url)
    host = {"Host": "h1.example.com"}
    assert wait_for(lambda: request(proxy.port, "GET", "/", headers=host)[0] == 200, 10)
    staller = redis_server.client()
    results = []
    for batch, delay in enumerate([0.0, 0.01, 0.03]):  # the stall somewhere in that work
        pipe = client.pipeline()
        for i in range(1500):
            pipe.rpush(f"b{batch}p{i}", backends[1].address)
        pipe.execute()
        routes = {f"b{batch}x{i}.example.com/": f"b{batch}p{i}" for i in range(1500)}
        client.hset("redlb:routes", mapping=routes)
        time.sleep(delay)
        staller.execute_command("DEBUG", "SLEEP", "0.6")
        host = {"Host": f"b{batch}x7.example.com"}
        results.append(
            wait_for(lambda: request(proxy.port, "GET", "/", headers=host)[0] == 200, 10)
        )
    assert results == [True] * 3, results
    assert "Traceback" not in proxy.log()


def test_a_status_client_that_sends_unknown_paths_and_never_reads_is_cut_off(
    redis_server, backends, start_proxy
):
    """Pipelined requests for an unknown path, never read: each 404 was written without
    the unsent-answers bound the other answers keep (STATUS_MAX_UNSENT), so the worker
    buffered every answer (40 MB of requests: its RSS up 180 MB, and on without end).
    Fixed: a 404 is answered like the others (bounded, and closing when asked)."""
    from support import rss_bytes

    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    pid = proxy.process.pid
    before = rss_bytes(pid)
    chunk = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    sent = 0
    with socket.create_connection(("127.0.0.1", proxy.status_port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            while sent < 40_000_000:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # cut off: what a client that never reads gets
    assert sent < 40_000_000, "the worker kept reading and buffering 404s"
    assert rss_bytes(pid) - before < 64 << 20
    assert proxy.status("/-/live")[0] == 200
