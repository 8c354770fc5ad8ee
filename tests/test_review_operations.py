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
