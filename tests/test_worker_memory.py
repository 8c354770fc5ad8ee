"""What one worker holds in memory (issue 14: 10,000 idle keep-alive connections in 60 MB).

bench/idle_memory.py measures it; the tests here keep what it measured from growing back,
as behaviour: the modules a worker never runs stay out of it (each costs its code objects
in every worker, hundreds of KB for some).
"""

from __future__ import annotations

import http.client
import time

import pytest

from support import HttpBackend, RedisProcess

# Imported only by what a worker started without the matching flag never runs: the other
# commands (rich, the route editor), --config, TLS termination, the admin API, the demo.
WORKER_NEVER_IMPORTS = (
    "rich",
    "tomllib",
    "redlb.cli_ops",
    "redlb.cli_routes",
    "redlb.tls",
    "cryptography.x509",
    "redlb.admin.api",
    "redlb.demo",
)


def _imported(log: str) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` lines on stderr
    ("import time: self | cumulative | module", the module indented by depth)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def _among(imported: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in imported for p in prefixes if m == p or m.startswith(p + ".")}


def test_a_worker_imports_only_what_it_runs(
    redis_server: RedisProcess,
    backends: list[HttpBackend],
    start_proxy,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # -X importtime for redlb serve
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    status, _, _ = proxy.get("/")
    assert status == 200
    assert proxy.status("/metrics")[0] == 200
    imported = _imported(proxy.log())
    assert "redlb.proxy.downstream" in imported  # the log does list the worker's imports
    assert not _among(imported, WORKER_NEVER_IMPORTS)


def test_an_idle_connection_rebuilds_what_it_dropped(
    redis_server: RedisProcess,
    backends: list[HttpBackend],
    start_proxy,  # type: ignore[no-untyped-def]
) -> None:
    """An idle keep-alive connection drops its parser, its last head and the fields built
    from its peer (downstream.py, _hibernate); the next request on it is forwarded with the
    same fields, and its Host is checked again."""
    backend = backends[0]
    redis_server.client().rpush("servers", backend.address)
    proxy = start_proxy(redis_server.url)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for path in ("/idle/1", "/idle/2"):
            conn.request("GET", path, headers={"Host": "idle.test"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(1.5)  # idle through two sweeps or more: the connection hibernates
        conn.putrequest("GET", "/idle/3", skip_host=True)
        conn.putheader("Host", "idle test")  # a space: invalid, whatever Host came before
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        assert response.status == 400
    finally:
        conn.close()
    first, second = (
        next(r for r in backend.received if r.url == path) for path in (b"/idle/1", b"/idle/2")
    )
    for name in (b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-port", b"forwarded"):
        assert second.header(name) == first.header(name)
    assert second.header(b"x-forwarded-port") == [b"%d" % proxy.port]
    assert second.header(b"x-real-ip") == [b"127.0.0.1"]
    assert not [r for r in backend.received if r.url == b"/idle/3"]
