"""What one worker holds in memory (issue 14: 10,000 idle keep-alive connections in 60 MB).

bench/idle_memory.py measures it; the tests here keep what it measured from growing back,
as behaviour: the modules a worker never runs stay out of it (each costs its code objects
in every worker, hundreds of KB for some).
"""

from __future__ import annotations

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
