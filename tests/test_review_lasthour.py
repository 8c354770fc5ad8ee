"""Adversarial review of the previous session's last hour (against real processes).

Each test here failed against the code as it was; the fix is in the commit that adds it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from redlb.fleet.instance import metrics_parent
from support import (
    CountingBackend,
    HttpBackend,
    Load,
    Proxy,
    RedisProcess,
    admin_call,
    free_port,
    metric_sum,
    open_fds,
    read_response,
    scrape,
    statuses,
    wait_for,
)


@contextlib.contextmanager
def no_spare_descriptors(pid: int) -> Iterator[None]:
    """The process may open no descriptor more (EMFILE) until the block ends."""
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    now = open_fds(pid)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (now, before[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)


def _worker(proxy: Proxy) -> int:
    children = psutil.Process(proxy.pid).children()
    return children[0].pid if children else proxy.pid


# 1. Descriptor exhaustion is redlb's shortage, in every path that judges a backend


# A host name is looked up first: out of descriptors, glibc cannot read /etc/hosts and
# answers "Name or service not known" (EAI_NONAME), not EMFILE.
SPELLINGS = ["127.0.0.1:{port}", "localhost:{port}"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_health_probe_out_of_descriptors_does_not_mark_the_backend_down(
    redis_server: RedisProcess, backends: list[HttpBackend], start_proxy, spelling: str
):
    """A probe that cannot open a socket (EMFILE) says nothing of the backend: before, the
    prober wrote "down" to Redis and every instance of the fleet stopped routing to it."""
    address = spelling.format(port=backends[0].port)
    redis_server.cli("RPUSH", "servers", address)
    proxy = start_proxy(
        redis_server.url,
        *("--health-path", "/health", "--health-interval", "0.3"),
        *("--health-fall", "2", "--health-rise", "1"),
    )
    key = f"redlb:servers:health:{address}"
    assert wait_for(lambda: redis_server.cli("GET", key).strip() == "up", timeout=10)
    with no_spare_descriptors(_worker(proxy)):
        # Ten probe rounds: five times the fall count.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert redis_server.cli("GET", key).strip() != "down", proxy.log()[-2000:]
            time.sleep(0.1)
    assert "is DOWN" not in proxy.log()
    assert proxy.get("/")[0] == 200


def test_backend_named_by_host_name_is_not_ejected_when_out_of_descriptors(
    redis_server: RedisProcess, backends: list[HttpBackend], start_proxy
):
    """The dial's name lookup fails with EAI_NONAME when the worker has no descriptor left:
    that was a 502 and a failure counted against the backend (ejected fleet-wide)."""
    address = f"localhost:{backends[0].port}"
    redis_server.cli("RPUSH", "servers", address)
    proxy = start_proxy(redis_server.url, "--eject-consecutive", "2")
    answers = _answers_out_of_descriptors(proxy, redis_server.port)
    assert 502 not in answers, answers
    assert 503 in answers, answers
    assert "ejecting" not in proxy.log()
    assert not redis_server.cli("KEYS", "*eject*").strip()
    assert wait_for(lambda: proxy.get("/", timeout=5)[0] == 200, timeout=10)


# 2. A dead worker's snapshot folded into retired.json


def _answers_out_of_descriptors(proxy: Proxy, redis_port: int) -> list[int]:
    """Four clients connected before the limit (each holds its accepted descriptor), then one
    request each while the worker has no descriptor to spare: each needs a new backend
    connection.  The worker's Redis connections are left out of the count: redis-py opens
    and closes them as its background work needs, and one closed meanwhile hid an accept."""
    before = open_fds(_worker(proxy), but_to_port=redis_port)
    clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(4)]
    answers: list[int] = []
    try:
        assert wait_for(
            lambda: open_fds(_worker(proxy), but_to_port=redis_port) >= before + 4, timeout=5
        )
        with no_spare_descriptors(_worker(proxy)):
            for sock in clients:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                answers += statuses(read_response(sock))
    finally:
        for sock in clients:
            sock.close()
    return answers


def _metrics_dir(proxy: Proxy) -> Path:
    # /dev/shm where there is one (fleet.instance.metrics_parent), else the temp directory.
    (found,) = metrics_parent().glob(f"redlb-metrics-{proxy.pid}-*")
    return found


def _kill_a_worker(proxy: Proxy) -> None:
    """SIGKILL one worker once its snapshot is written; wait for its replacement."""
    victim = psutil.Process(proxy.pid).children()[0].pid
    assert wait_for(lambda: (_metrics_dir(proxy) / f"{victim}.json").exists(), 10)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(
        lambda: (
            proxy.alive()
            and victim not in [c.pid for c in psutil.Process(proxy.pid).children()]
            and len(psutil.Process(proxy.pid).children()) == 2
            and proxy.ready()
        ),
        20,
    ), proxy.log()[-3000:]


@pytest.mark.parametrize("content", ["[]", '{"requests": 5}', '{"counters": []}', "{}"])
def test_a_retired_sum_of_the_wrong_shape_does_not_kill_the_supervisor(
    redis_server: RedisProcess, backends: list[HttpBackend], start_proxy, content: str
):
    """Valid JSON that is not a retired sum (edited, or written by another version) made
    retire() raise past the supervisor's OSError guard: the supervisor died, and with it
    (die_with_parent) every worker."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    assert wait_for(lambda: len(psutil.Process(proxy.pid).children()) == 2, 10)
    assert proxy.get("/")[0] == 200
    time.sleep(1.5)  # both workers have written that count (once a second)
    (_metrics_dir(proxy) / "retired.json").write_text(content)
    assert metric_sum(scrape(proxy), "redlb_requests_total") >= 1  # a scrape reads it too
    _kill_a_worker(proxy)
    assert proxy.get("/")[0] == 200
    assert metric_sum(scrape(proxy), "redlb_requests_total") >= 1


def test_a_scrape_during_the_first_fold_still_counts_the_dead_worker(tmp_path: Path):
    """read_all listed the directory, then read the files: when the supervisor folded a
    worker between the two (the first fold, which creates retired.json), the scrape read
    neither the worker's file (gone) nor the sum (not listed): counters went back for it."""
    from redlb.metrics import snapshot

    dead = 2**22 + 12345  # above pid_max's default: no such process
    worker = {"pid": dead, "worker": 0, "time": 1.0, "requests": [], "connect": [],
              "counters": {"retries": 7}, "gauges": {}, "pools": []}  # fmt: skip
    (tmp_path / f"{dead}.json").write_text(json.dumps(worker))

    class FoldedWhileListing(type(tmp_path)):  # type: ignore[misc]
        def glob(self, pattern: str):  # type: ignore[no-untyped-def,override]
            listing = list(super().glob(pattern))
            snapshot.retire(tmp_path, dead)  # the supervisor, between listing and reading
            return iter(listing)

    view = snapshot.read_all(FoldedWhileListing(tmp_path))
    assert sum(s["counters"].get("retries", 0) for s in view.snapshots) == 7


# 5. least_outstanding's costs divided by weights


@pytest.mark.parametrize("backends_in_pool", [2, 6])  # a scan, and P2C's pairs
@pytest.mark.parametrize("scale", [1, 10, 100])
def test_least_outstanding_picks_the_same_whatever_the_weights_scale(
    backends_in_pool: int, scale: int
):
    """Weights 2:1 and 20:10 are the same shares; but the near-tie margin (EQUAL, 0.1) was
    compared with costs already divided by the weight, so at 20:10 (any weight from 10 up,
    and every pool while --slow-start ramps, which multiplies weights by 10) a backend a
    whole request busier was 'equal' and got half the picks."""
    import random

    from redlb.address import Backend
    from redlb.balancer.least import LeastOutstanding
    from redlb.balancer.load import LoadView
    from redlb.balancer.snapshot import Snapshot

    pool = [Backend("127.0.0.1", 9000 + i) for i in range(backends_in_pool)]
    load = LoadView()
    strategy = LeastOutstanding(load, random.Random(7).random)
    # Every heavy backend (weight 2) has two in flight, so costs 3/2 = 1.5 per unit of
    # weight; the one light backend (weight 1) none, cost 1: it must win every pick.
    light = pool[-1]
    for backend in pool[:-1]:
        load.started(backend)
        load.started(backend)
    candidates = Snapshot.of(pool, [2 * scale] * (len(pool) - 1) + [scale])
    picks = [strategy.pick(candidates) for _ in range(200)]
    if backends_in_pool == 2:
        assert picks.count(light) == 200, picks.count(light)
    else:  # P2C: the light one wins every pair it is drawn into
        wins = picks.count(light)
        assert wins >= 200 * 2 / backends_in_pool * 0.7, wins


# 3. The drain guard: never zero backends taking traffic without --force


def _redlb(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "redlb", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def test_two_cli_drains_at_once_cannot_drain_the_last_two_backends(
    redis_server: RedisProcess, backends: list[HttpBackend]
):
    """`redlb backend drain` checked, then wrote: two drains of the last two backends at
    once (two operators, a script) both found the other one taking traffic and both wrote,
    leaving no backend.  Redis holds their writes (CLIENT PAUSE WRITE) until both have read:
    the window made deterministic."""
    a, b = backends[0].address, backends[1].address
    redis_server.cli("RPUSH", "servers", a, b)
    drains = [_redlb("backend", "drain", addr, "--redis", redis_server.url) for addr in (a, b)]
    # Under the CLI's 2 s socket timeout; both have read by then (they start in well under
    # a second; a slower start only lets them run one after the other).
    redis_server.cli("CLIENT", "PAUSE", "1900", "WRITE")
    outcomes = [(p.wait(30), p.communicate()[1].decode()) for p in drains]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    assert any("last backend" in err for _, err in outcomes), outcomes
    assert len(redis_server.client().smembers("redlb:servers:draining")) == 1


def test_two_api_drains_through_two_instances_leave_one_backend_taking_traffic(
    redis_server: RedisProcess, backends: list[HttpBackend], start_proxy
):
    """The admin API's guard under the same deterministic window (held: WATCH on the
    draining set makes the second transaction fail and look again)."""
    a, b = backends[0].address, backends[1].address
    redis_server.cli("RPUSH", "servers", a, b)
    ports = [free_port(), free_port()]
    for port in ports:
        start_proxy(redis_server.url, "--admin-listen", f"127.0.0.1:{port}")
    redis_server.cli("CLIENT", "PAUSE", "800", "WRITE")
    with ThreadPoolExecutor(2) as pool:
        calls = [
            pool.submit(
                admin_call, port, "POST", f"/api/v1/pools/servers/backends/{addr}/drain", {}
            )
            for port, addr in zip(ports, (a, b), strict=True)
        ]
        answers = [call.result()[:2] for call in calls]
    assert sorted(status for status, _ in answers) == [200, 409], answers
    assert len(redis_server.client().smembers("redlb:servers:draining")) == 1
    for bad in ("yes", 1, None, [], {"x": 1}):
        status, answer, _ = admin_call(
            ports[0], "POST", f"/api/v1/pools/servers/backends/{a}/drain", {"force": bad}
        )
        assert status == 400 and "force" in answer["error"], (bad, answer)


# 4. Connections of removed backends


def test_request_in_flight_to_a_removed_backend_completes_and_a_quick_re_add_serves(
    redis_server: RedisProcess, loop_thread, backends: list[HttpBackend], start_proxy
):
    """Held: the sweep closes only idle connections; the busy one finishes its answer, and a
    backend removed and re-added within a sweep keeps serving (on both routes' pools)."""
    slow = CountingBackend(loop_thread, "slow", delay=2.0).start()
    try:
        redis_server.cli("RPUSH", "servers", slow.address)
        redis_server.cli("RPUSH", "other", slow.address, backends[0].address)
        redis_server.cli("HSET", "redlb:routes", "o.test", "other", "/", "servers")
        proxy = start_proxy(redis_server.url, "--strategy", "least_outstanding")
        with ThreadPoolExecutor(2) as pool:
            pending = pool.submit(proxy.get, "/", timeout=15)
            assert wait_for(lambda: slow.inflight == 1, 5), (
                pending.done() and pending.result()[:2],
                proxy.log()[-1500:],
            )
            redis_server.cli("LREM", "servers", "0", slow.address)
            time.sleep(1.5)  # a resync and a sweep or more while it is in flight
            redis_server.cli("RPUSH", "servers", slow.address)
            status, body, _ = pending.result()
        assert status == 200, (status, body)
        assert wait_for(lambda: proxy.get("/", timeout=15)[0] == 200, 10)
        other = proxy.get("/", headers={"Host": "o.test"}, timeout=15)
        assert other[0] == 200, other[:2]
        assert "Traceback" not in proxy.log()
    finally:
        slow.stop()


def test_counters_never_go_back_across_worker_kills_under_load(
    redis_server: RedisProcess, backends: list[HttpBackend], start_proxy
):
    """Held: SIGKILL a worker mid-load three times, scraping all along (whichever worker
    answers): redlb_requests_total and the other counters only ever grow."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--workers", "2", "--no-access-log")
    assert wait_for(lambda: len(psutil.Process(proxy.pid).children()) == 2, 10)
    names = (
        "redlb_requests_total",
        "redlb_upstream_connects_total",
        "redlb_client_connections_total",
    )
    seen: list[tuple[float, ...]] = []

    def sample() -> None:
        samples = scrape(proxy)
        seen.append(tuple(metric_sum(samples, name) for name in names))

    with Load(proxy.port, rate=100, connections=4):
        for _ in range(3):
            for _ in range(6):
                sample()
                time.sleep(0.2)
            _kill_a_worker(proxy)
        for _ in range(6):
            sample()
            time.sleep(0.2)
    pairs = itertools.pairwise(seen)
    backwards = [(a, b) for a, b in pairs if any(y < x for x, y in zip(a, b, strict=True))]
    assert not backwards, backwards
    assert seen[-1][0] > seen[0][0]


# The stranger's command line: bad input is a clear error and exit 2


@pytest.mark.parametrize(
    "flag", ["--status-listen", "--admin-listen", "--admin-token-file", "--config"]
)
def test_an_empty_value_is_refused_not_taken_as_off(flag: str, tmp_path: Path):
    """`--listen ""` was refused, but an empty --status-listen silently turned /metrics and
    the readiness check off, an empty --admin-token-file gave a loopback admin API with no
    token, an empty --config read no file: `--flag "$UNSET_VARIABLE"` in a unit file."""
    args = ["serve", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1", f"{flag}="]
    if flag == "--admin-token-file":
        args += ["--admin-listen", f"127.0.0.1:{free_port()}"]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "redlb", *args],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"redlb serve {flag}= started serving")
    assert done.returncode == 2, done.stderr[-1000:]
    assert flag in done.stderr and "empty" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_https_backend_is_not_ejected_when_out_of_descriptors(
    redis_server: RedisProcess, loop_thread, start_proxy, tmp_path: Path, name: str
):
    """The TLS dial path: a shortage is not a TLS failure (no ejection, no TLS log line)."""
    import trustme

    from test_backend_tls import TlsBackend

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    backend = TlsBackend(loop_thread, "s", ca.issue_cert("localhost", "127.0.0.1")).start()
    try:
        address = f"https://{name}:{backend.port}"
        redis_server.cli("RPUSH", "servers", address)
        proxy = start_proxy(
            redis_server.url, "--eject-consecutive", "2", "--upstream-ca", str(ca_file)
        )
        answers = _answers_out_of_descriptors(proxy, redis_server.port)
        assert answers == [503] * 4, answers
        assert "ejecting" not in proxy.log()
        assert "redlb.backend_tls" not in proxy.log()
        assert wait_for(lambda: proxy.get("/", timeout=5)[0] == 200, 10)
    finally:
        backend.stop()


BAD_OPS_INPUT = [
    ("backend", "add", "garbage"),
    ("backend", "add", "127.0.0.1:99999"),
    ("backend", "drain", ""),
    ("backend", "undrain", "a b:1"),
    ("backend", "weight", "127.0.0.1:5", "0"),
    ("backend", "weight", "127.0.0.1:5", "-1"),
    ("backend", "weight", "127.0.0.1:5", "99999999999999999999"),
    ("route", "add", "a.test/", "servers", "--host-header", "a/b"),
    ("route", "add", "a.test/", "bad pool"),
    ("pool", "set", "servers", "strategy=nope"),
    ("pool", "set", "servers", "connect_timeout=-1"),
    ("pool", "set", "servers", "connect_timeout=nan"),
    ("pool", "set", "servers", "nokey=1"),
    ("pool", "set", "servers", "garbage"),
    ("pool", "show", ""),
]


@pytest.mark.parametrize("args", BAD_OPS_INPUT, ids=lambda a: " ".join(a)[:40])
def test_bad_input_to_an_ops_command_is_a_usage_error(args: tuple[str, ...], tmp_path: Path):
    """The CLI says "exit 2 for usage, 1 otherwise", and serve's flags keep it; but a bad
    address, weight, route or pool setting given to backend/route/pool exited 1, as if
    Redis had failed: a script could not tell its own mistake from an outage."""
    done = subprocess.run(
        [sys.executable, "-m", "redlb", *args, "--redis", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.startswith("Error:") and "Traceback" not in done.stderr, done.stderr
    assert "127.0.0.1:1" not in done.stderr  # refused before Redis is asked
