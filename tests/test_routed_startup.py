"""A routed worker accepts only once its routes are read, however long reading them takes.

It waited at most 2 s (STARTUP_GRACE), then accepted with the seed's table: with a big table
on a slow machine (the bench's 10,000 routes) its first requests were answered 503.
"""

from __future__ import annotations

import socket
import time

from support import raw_exchange, wait_for


def test_requests_wait_for_the_routes_rather_than_get_503(redis_server, backends, start_proxy):
    client = redis_server.client()
    client.rpush("api", backends[0].address)
    client.hset("redlb:routes", "api.example.com/", "api")
    # Redis answers PING at once but holds every script (the routes' read) for 3.5 s: the
    # worker knows Redis is there and reading, not down.
    client.execute_command("CLIENT", "PAUSE", "3500", "WRITE")
    started = time.monotonic()
    proxy = start_proxy(redis_server.url, "--redis-timeout", "6", ready=False)

    def connects() -> bool:
        try:
            socket.create_connection(("127.0.0.1", proxy.port), 0.5).close()
            return True
        except OSError:
            return False

    assert wait_for(connects, 10)
    answers = []
    while time.monotonic() - started < 6:  # before, while and after the pause
        response, _ = raw_exchange(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
            timeout=10,
        )
        answers.append(response.split(b"\r\n", 1)[0])
        time.sleep(0.2)
    assert answers and all(a == b"HTTP/1.1 200 OK" for a in answers), answers
