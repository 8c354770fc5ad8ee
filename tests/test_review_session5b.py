"""Review of the periodic work re-sliced into ~0.1 ms turns (merge of ``tail``): the metrics
snapshot, its file, the heartbeat, the sweeper and the access log, on real processes.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from support import HttpBackend, Proxy, RedisProcess, read_response, statuses


def _scrapes_at_once(proxy: Proxy, count: int) -> list[int]:
    """``count`` scrapes sent on connections opened beforehand while the worker is stopped:
    they reach it in the same turn of its loop."""
    port = proxy.status_port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        time.sleep(0.05)  # accepted: each connection's request is all that remains
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            for sock in socks:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.05)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        out = []
        for sock in socks:
            answer = read_response(sock)
            out.append(statuses(answer)[0] if answer else 0)
        return out
    finally:
        for sock in socks:
            sock.close()


def test_concurrent_scrapes_of_one_worker_all_answer(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """Two scrapers (an HA pair of Prometheus servers) ask the same worker at once: each
    writes the worker's snapshot in steps through the same temporary file, so one renamed
    the other's file away and the second rename failed (500, "No such file")."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    try:
        for _ in range(5):
            proxy.get("/")
        answers: list[int] = []
        for _round in range(10):
            answers += _scrapes_at_once(proxy, 3)
            time.sleep(0.3)  # past SCRAPE_FRESHNESS: the next round writes the file again
        assert answers.count(200) == len(answers), (str(answers), proxy.log()[-300:])
    finally:
        proxy.stop()
