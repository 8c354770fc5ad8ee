"""A backend removed from the pool leaves nothing behind in the workers.

Before, its idle keep-alive connections stayed open until they expired (20 s) and its
connection pool object was never dropped: a pool whose members churn (autoscaling, deploys)
grew one entry per backend it ever had.
"""

from __future__ import annotations

from support import metric, wait_for


def test_removed_backend_has_its_idle_connections_closed(redis_server, backends, start_proxy):
    a, b = backends[0], backends[1]
    redis_server.cli("RPUSH", "servers", a.address, b.address)
    proxy = start_proxy(redis_server.url)
    for _ in range(6):
        assert proxy.get("/")[0] == 200
    assert wait_for(lambda: len(b.writers) >= 1)  # kept alive in redlb's pool
    redis_server.cli("LREM", "servers", "0", b.address)
    assert wait_for(lambda: {proxy.get("/")[1] for _ in range(4)} == {b"ok b0\n"})
    # Well before the 20 s idle expiry: the removal itself lets the connection go.
    assert wait_for(lambda: len(b.writers) == 0, 5), len(b.writers)
    assert metric(proxy, "redlb_open_connections") is not None
    # Re-added, it serves again at once (a new pool object, new connections).
    redis_server.cli("RPUSH", "servers", b.address)
    assert wait_for(lambda: b"ok b1\n" in {proxy.get("/")[1] for _ in range(4)})
