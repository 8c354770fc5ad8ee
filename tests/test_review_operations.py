"""Independent review of issue 12 (operations): the admin API, fleet view, metrics, config
file and JSON log attacked as an operator and an attacker would, against real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from redlb.cli import main
from redlb.store.embedded import free_port
from support import admin_call, metric_sum, raw_exchange, rss_bytes, scrape, wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "review-token-0123456789abcdef"


def start_admin(start_proxy, redis_server, *args: str, token_file: Path | None = None):
    port = free_port()
    extra = ["--admin-listen", f"127.0.0.1:{port}", *args]
    if token_file is not None:
        extra += ["--admin-token-file", str(token_file)]
    return start_proxy(redis_server.url, *extra), port


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(TOKEN + "\n")
    return path


# Admin API: hostile bodies and paths


def test_deeply_nested_json_body_is_a_400_not_a_500(redis_server, backends, start_proxy):
    redis_server.client().rpush("servers", backends[0].address)
    proxy, port = start_admin(start_proxy, redis_server)
    status, body, _ = admin_call(port, "POST", "/api/v1/pools/servers/backends",
                                 body=b"[" * 50_000)  # fmt: skip
    assert status == 400, (status, body)
    assert "internal" not in proxy.log()


def test_a_path_ending_in_openapi_json_still_needs_the_token(
    redis_server, backends, start_proxy, token_file
):
    """Before: any API path ending in /openapi.json skipped the token check, so a pool
    named ``openapi.json`` was readable (and its ejection clearable) by anyone."""
    r = redis_server.client()
    r.rpush("openapi.json", backends[0].address)
    _, port = start_admin(start_proxy, redis_server, token_file=token_file)
    status, body, _ = admin_call(port, "GET", "/api/v1/pools/openapi.json")
    assert status == 401, (status, body)
    assert admin_call(port, "GET", "/api/v1/openapi.json")[0] == 200  # the document stays public


def _worker_pid(proxy) -> int:
    """With --workers 1 the serve process is the worker."""
    return int(proxy.pid)


def test_an_idle_admin_connection_is_closed(redis_server, backends, start_proxy):
    """Before: a connection that sends nothing (or half a request) was held forever, so a
    few thousand of them took every file descriptor of the worker, data plane included."""
    redis_server.client().rpush("servers", backends[0].address)
    _, port = start_admin(start_proxy, redis_server, "--header-timeout", "1")
    idle = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET /api/v1/pools HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for sock in (idle, half):
        sock.settimeout(15)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            data = b"(still open)"
        except ConnectionResetError:
            data = b""
        assert data in (b"",) or data.startswith(b"HTTP/1.1 408"), data
        sock.close()
    # A slow but live client still gets its answers.
    status, _, _ = admin_call(port, "GET", "/api/v1/pools")
    assert status == 200


def test_answers_left_unread_do_not_pile_up_in_the_worker(redis_server, backends, start_proxy):
    """Before: pipelined requests were all answered into the transport's buffer whether or
    not the client read: the public openapi.json (39 KB) asked 1500 times = +58 MB."""
    redis_server.client().rpush("servers", backends[0].address)
    proxy, port = start_admin(start_proxy, redis_server)
    pid = _worker_pid(proxy)
    before = rss_bytes(pid)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    one = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock.settimeout(0.5)
    sent = 0
    try:
        for _ in range(1500):
            sock.sendall(one)
            sent += 1
    except OSError:
        pass  # the worker stopped reading (or hung up): that is the point
    grown = 0
    for _ in range(30):  # the worker answers as fast as it can: watch it for 3 s
        time.sleep(0.1)
        grown = max(grown, rss_bytes(pid) - before)
    sock.close()
    assert grown < 16 * 1024 * 1024, (sent, grown)
    assert admin_call(port, "GET", "/api/v1/pools")[0] == 200
