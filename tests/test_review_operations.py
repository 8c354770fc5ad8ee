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


# The fleet view: documents it cannot read are skipped, not a 500


def test_a_malformed_fleet_document_is_skipped(redis_server, backends, start_proxy, tmp_path):
    """Before: one worker document of another shape (an older or newer redlb in a rolling
    upgrade, or a hand-written key) made every fleet read a 500 and `redlb status` a
    traceback."""
    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    proxy, port = start_admin(start_proxy, redis_server)
    assert wait_for(lambda: len(admin_call(port, "GET", "/api/v1/instances")[1]["instances"]) == 1)
    now = time.time()
    for member, doc in (
        ("old/0", {"instance": "old"}),
        ("list/0", [1, 2]),
        ("typed/0", {"instance": "t", "backends": [["p", "b", "x", 1, 2]]}),
    ):
        r.set(f"redlb:fleet:worker:{member}", json.dumps(doc), px=60_000)
        r.zadd("redlb:fleet:workers", {member: now + 30})  # fmt: skip
    for path in ("/api/v1/instances", "/api/v1/stats", "/api/v1/overview", "/api/v1/pools",
                 "/api/v1/pools/servers", "/api/v1/health"):  # fmt: skip
        status, body, _ = admin_call(port, "GET", path)
        assert status == 200, (path, status, body)
    assert len(admin_call(port, "GET", "/api/v1/instances")[1]["instances"]) == 1
    out = subprocess.run([sys.executable, "-m", "redlb", "status", "--redis", redis_server.url],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-500:]


# Writes from two instances at once


def test_concurrent_adds_of_one_backend_through_two_instances(redis_server, backends,
                                                              start_proxy):  # fmt: skip
    """Before: check (LRANGE) then act (RPUSH) without a transaction: two operators adding
    the same backend through two instances both got 201 and the pool held it twice."""
    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    _, port_a = start_admin(start_proxy, redis_server)
    _, port_b = start_admin(start_proxy, redis_server)
    for round_ in range(8):
        address = f"127.0.0.1:{20000 + round_}"
        statuses: list[int] = []
        barrier = threading.Barrier(8)

        def add(port: int, address: str = address) -> None:
            barrier.wait()
            statuses.append(admin_call(port, "POST", "/api/v1/pools/servers/backends",
                                       {"address": address})[0])  # fmt: skip

        threads = [threading.Thread(target=add, args=(p,)) for p in [port_a, port_b] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        entries = [e for e in r.lrange("servers", 0, -1) if e == address.encode()]
        assert len(entries) == 1 and sorted(statuses) == [201] + [409] * 7, (round_, statuses)


def test_removing_a_backend_through_the_api_forgets_its_weight(redis_server, backends,
                                                               start_proxy):  # fmt: skip
    """`redlb backend rm` deletes the weight with the entry; the API left it behind, so the
    same address added again came back with its old weight."""
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address)
    _, port = start_admin(start_proxy, redis_server)
    path = f"/api/v1/pools/servers/backends/{backends[1].address}"
    assert admin_call(port, "PUT", path + "/weight", {"weight": 7})[0] == 200
    assert admin_call(port, "DELETE", path)[0] == 200
    assert r.hget("redlb:servers:weights", backends[1].address) is None
    status, _, _ = admin_call(port, "POST", "/api/v1/pools/servers/backends",
                              {"address": backends[1].address})  # fmt: skip
    assert status == 201
    pool = admin_call(port, "GET", "/api/v1/pools/servers")[1]
    weights = {b["address"]: b["weight"] for b in pool["backends"]}
    assert weights[backends[1].address] == 1, weights


# Metrics: a worker that stops cleanly hands in its last counts


def test_a_worker_stopped_cleanly_keeps_its_last_second_of_counts(redis_server, backends,
                                                                  start_proxy):  # fmt: skip
    """Before: a worker wrote its counts once a second and not on its way out, so the
    requests of its last second vanished from /metrics when it was stopped and replaced."""
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    assert wait_for(lambda: len(psutil.Process(proxy.pid).children()) == 2, 10)
    for _round in range(3):
        before = metric_sum(scrape(proxy), "redlb_requests_total")
        workers = psutil.Process(proxy.pid).children()
        sent = 0
        for _ in range(40):  # a new connection each: spread over both workers
            assert proxy.get("/")[0] == 200
            sent += 1
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)  # at once: inside the 1 s between writes
        assert wait_for(
            lambda: len(psutil.Process(proxy.pid).children()) == 2 and proxy.ready(), 20
        )
        assert wait_for(
            lambda: metric_sum(scrape(proxy), "redlb_requests_total") >= before + sent, 5
        ), (before, sent, metric_sum(scrape(proxy), "redlb_requests_total"))
        assert metric_sum(scrape(proxy), "redlb_requests_total") == before + sent


# The config file: every bad value one line and exit 2, as the same value given as a flag


def _redlb(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REDLB_")}
    return subprocess.run([sys.executable, "-m", "redlb", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd, env={**clean, **env})  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admin-token-file = 1979-05-27\n", "c.toml:1: admin-token-file must be a"),
        ("max.body = 1\n", "c.toml:1: unknown key 'max'"),
        ('workers = "two"\n', "c.toml:1: workers must be an integer"),
        ("host = [1, 2]\n", "c.toml:1: host must be a"),
        ("pool = 3\n", "c.toml:1: pool must be a"),
        ('rotation = "random"\n', "c.toml:1: rotation: 'random' is not one of"),
        ('admin-listen = "nowhere"\n', "--admin-listen: 'nowhere' is not host:port"),
    ],
)
def test_bad_config_values_are_one_line_and_exit_2(tmp_path: Path, text: str, message: str):
    """Before: a TOML date for a path was a TypeError traceback; a dotted key named line 0;
    numbers were taken as pool and host names; and a file's bad value exited 1 where the
    same value as a flag or REDLB_* exits 2 (a usage error)."""
    (tmp_path / "c.toml").write_text(text)
    for args in (["config", "check", "c.toml"], ["serve", "--config", "c.toml"]):
        out = _redlb(args, tmp_path)
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr, out.stderr
    out = _redlb(["config", "show"], tmp_path, REDLB_CONFIG=str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr


# The dashboard: a slow fleet read does not pile up polls


def test_the_dashboard_never_has_two_polls_in_flight(redis_server, backends, start_proxy):
    """Before: setInterval fired a poll every second whether or not the last had come
    back; with Redis paused (each answer waits out the 8 s Redis timeout) the browser
    opened its six connections and queued the rest, each one more fleet read for redlb."""
    from browser import ensure_chromium, headless

    browser, driver_path = ensure_chromium()
    redis_server.client().rpush("servers", backends[0].address)
    # Idle keep-alive connections (the page's own files) go after 1 s: what stays open is
    # a poll waiting for its answer.
    proxy, port = start_admin(start_proxy, redis_server, "--header-timeout", "1")
    driver = headless(browser, driver_path)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        assert wait_for(lambda: "live" in driver.find_element("id", "status").text, 15)
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            most = 0
            time.sleep(1.5)
            for _ in range(50):  # 5 s more: five more polls due
                time.sleep(0.1)
                conns = [c for c in psutil.Process(proxy.pid).net_connections("tcp")
                         if c.laddr.port == port and c.status == "ESTABLISHED"]  # fmt: skip
                most = max(most, len(conns))
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        assert most <= 1, most
        assert wait_for(lambda: "live" in driver.find_element("id", "status").text, 20)
    finally:
        driver.quit()


# The JSON log: valid JSON, one object a line, whatever the client sends


def test_json_log_lines_stay_json_under_hostile_bytes(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address, "127.0.0.1:1")  # the second refuses: warnings
    r.hset("redlb:routes", "/api", "servers")
    proxy = start_proxy(redis_server.url, "--log-format", "json")
    hostile = [
        b'/a"b\\c\x01\x7f\xff\xfe%00%0a?q="\\',
        b"/\xc3\x28\xe2\x82\x28\xf0\x28\x8c\xbc",
        b"/api/" + bytes(range(0x80, 0x100)),
        b"/api/\x1b[31m" + b"x" * 7000,
    ]
    sent = 0
    for target in hostile:
        for host in (b"h\xffst", b'"}{', b"ok"):
            raw_exchange(proxy.port, b"GET %b HTTP/1.1\r\nHost: %b\r\nX-A: \xff\"\r\n"
                         b"Connection: close\r\n\r\n" % (target, host))  # fmt: skip
            sent += 1
    for _ in range(6):
        proxy.get("/api/x")
        sent += 1
    proxy.stop()
    assert len(proxy.access_log().splitlines()) == sent, proxy.access_log()[-500:]
    for name, text in (("access", proxy.access_log()), ("event", proxy.log())):
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) > 2, (name, text[-300:])
        for line in lines[:-1]:
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{name} log line is not JSON: {line[:200]!r}")
            assert isinstance(record, dict), line


# The fleet registry through pauses, flushes and restarts


def _instance_pids(port: int) -> set[int]:
    status, body, _ = admin_call(port, "GET", "/api/v1/instances")
    assert status == 200, body
    return {i["pid"] for i in body["instances"]}


def test_fleet_view_through_a_paused_instance_a_flush_and_a_redis_restart(
    redis_server, backends, start_proxy, tmp_path
):
    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    a, port = start_admin(start_proxy, redis_server)
    b = start_proxy(redis_server.url, "--workers", "2")
    both = {a.pid, b.pid}
    assert wait_for(lambda: _instance_pids(port) == both, 10)
    # A frozen instance leaves the view by the deadline (5 s without a heartbeat), and
    # comes back when it thaws.
    stopped = [b.pid, *(c.pid for c in psutil.Process(b.pid).children())]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: _instance_pids(port) == {a.pid}, 10)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: _instance_pids(port) == both, 10)

    def workers() -> dict[int, int]:
        instances = admin_call(port, "GET", "/api/v1/instances")[1]["instances"]
        return {i["pid"]: i["workers"] for i in instances}

    assert wait_for(lambda: workers() == {a.pid: 1, b.pid: 2}, 10), workers()
    # FLUSHALL: every instance registers again within a heartbeat or two.
    r.flushall()
    r.rpush("servers", backends[0].address)
    assert wait_for(lambda: _instance_pids(port) == both, 10)
    # Redis restarted empty on the same port.
    redis_server.kill()
    redis_server.wipe()
    redis_server.start()
    assert wait_for(lambda: admin_call(port, "GET", "/api/v1/instances")[0] == 200, 15)
    assert wait_for(lambda: _instance_pids(port) == both, 15)
    # The registry index does not keep members whose documents are gone for long.
    assert wait_for(lambda: len(redis_server.client().zrange("redlb:fleet:workers", 0, -1)) == 3,
                    10)  # fmt: skip


def test_top_keeps_watching_through_a_redis_outage(redis_server, backends, start_proxy,
                                                   tmp_path):  # fmt: skip
    """Before: `redlb top` exited at the first failed read, so the live view went away
    exactly when an operator needs it (a Redis restart or failover)."""
    redis_server.client().rpush("servers", backends[0].address)
    start_proxy(redis_server.url)
    env = {**os.environ, "COLUMNS": "200", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    top = subprocess.Popen([sys.executable, "-m", "redlb", "top", "--redis", redis_server.url,
                            "--count", "12", "--interval", "0.5"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)  # fmt: skip
    try:
        time.sleep(1.5)
        redis_server.kill()
        time.sleep(2.0)
        redis_server.start()
        out, err = top.communicate(timeout=60)
    finally:
        if top.poll() is None:
            top.kill()
    assert top.returncode == 0, err
    assert "cannot read the fleet" in out
    assert out.rstrip().splitlines()[-1].strip() != "", out[-300:]
    assert backends[0].address in out.rpartition("cannot read the fleet")[2], out[-1500:]


# Metrics: exact sums across workers and instances, bounded labels


def test_counts_summed_per_instance_equal_what_each_was_sent(redis_server, backends, start_proxy):
    redis_server.client().rpush("servers", *[b.address for b in backends])
    a = start_proxy(redis_server.url, "--workers", "2")
    b = start_proxy(redis_server.url, "--workers", "2")
    sent = {a.port: 0, b.port: 0}
    body_bytes = {a.port: 0, b.port: 0}
    for i in range(90):
        proxy = a if i % 3 else b
        status, body, _ = proxy.get(f"/n{i}")  # a new connection each: both workers serve
        assert status == 200
        sent[proxy.port] += 1
        body_bytes[proxy.port] += len(body)
    for proxy in (a, b):

        def settled(proxy=proxy) -> bool:
            return metric_sum(scrape(proxy), "redlb_requests_total") == sent[proxy.port]

        assert wait_for(settled, 5), (sent, metric_sum(scrape(proxy), "redlb_requests_total"))
        samples = scrape(proxy)
        assert metric_sum(samples, "redlb_request_duration_seconds_count") == sent[proxy.port]
        assert metric_sum(samples, "redlb_response_body_bytes_total") == body_bytes[proxy.port]
        assert metric_sum(samples, "redlb_requests_total", code_class="2xx") == sent[proxy.port]


def test_random_hosts_paths_and_methods_do_not_grow_the_labels(redis_server, backends,
                                                               start_proxy):  # fmt: skip
    import random

    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    r.hset("redlb:routes", mapping={"/api": "servers", "shop.example/": "servers"})
    proxy = start_proxy(redis_server.url)
    rng = random.Random(12)
    methods = [b"GET", b"POST", b"PURGE", b"MKCOL", b"FOO", b"G\xffT"]
    for i in range(300):
        host = b"%x.example" % rng.getrandbits(64)
        path = b"/%x/%x" % (rng.getrandbits(32), i) if i % 2 else b"/api/%x" % i
        method = rng.choice(methods)
        raw_exchange(proxy.port, b"%b %b HTTP/1.1\r\nHost: %b\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n" % (method, path, host), timeout=2)  # fmt: skip
    samples = scrape(proxy)
    label_sets = [labels for (name, labels) in samples if name == "redlb_requests_total"]
    routes = {dict(ls)["route"] for ls in label_sets}
    assert len(label_sets) <= 30, sorted(map(dict, label_sets))[:40]
    assert routes <= {"/api", "shop.example/", "no route", "default"}, routes


def test_recorder_buckets_match_a_plain_bisect():
    """The recorder finds the first-byte bucket from the duration's (one bisect a request
    instead of two); it must land where a plain bisect would."""
    import random
    from bisect import bisect_left

    from redlb.metrics.recorder import BUCKETS, FB_FIRST_BUCKET, FIRST_BUCKET, N_BUCKETS, Recorder

    rng = random.Random(7)
    edges = [*BUCKETS, *(b * 1.0000001 for b in BUCKETS), *(b * 0.9999999 for b in BUCKETS)]
    for _ in range(3000):
        seconds = rng.choice([rng.uniform(0, 12), rng.choice(edges), 10 ** rng.uniform(-5, 1.2)])
        first_byte = rng.choice([seconds, seconds * rng.random(), rng.choice(edges)])
        first_byte = min(first_byte, seconds) or 1e-9
        rec = Recorder()
        rec.count((b"no route", "", "", b"GET", 2), 0, 0, seconds, first_byte)
        (series,) = rec.requests.values()
        want = [0] * N_BUCKETS
        want[bisect_left(BUCKETS, seconds)] = 1
        assert series[FIRST_BUCKET : FIRST_BUCKET + N_BUCKETS] == want
        want = [0] * N_BUCKETS
        want[bisect_left(BUCKETS, first_byte)] = 1
        assert series[FB_FIRST_BUCKET : FB_FIRST_BUCKET + N_BUCKETS] == want, (seconds, first_byte)


def test_one_key_of_the_wrong_type_does_not_blind_the_whole_fleet_view(
    redis_server, backends, start_proxy, tmp_path
):
    """Before: a route to a pool whose key is a string (the API itself accepts that route),
    or a draining set that is not a set, made /overview, /pools, /health a 503 "Redis did
    not answer: ResponseError": the dashboard and `redlb status` showed nothing at all."""
    r = redis_server.client()
    r.rpush("servers", backends[0].address)
    r.set("strkey", "x")
    r.rpush("other", backends[1].address)
    r.set("redlb:other:draining", "not a set")
    r.hset(f"redlb:servers:health:{backends[0].address}", "a", "b")  # a hash, not a string
    proxy, port = start_admin(start_proxy, redis_server)
    status, _, _ = admin_call(port, "PUT", "/api/v1/routes", {"match": "/s", "pool": "strkey"})
    assert status == 200
    r.hset("redlb:routes", "/o", "other")
    for path in ("/api/v1/overview", "/api/v1/pools", "/api/v1/health", "/api/v1/pools/strkey",
                 "/api/v1/pools/other"):  # fmt: skip
        status, body, _ = admin_call(port, "GET", path)
        assert status == 200, (path, status, body)
    pools = {p["name"]: p for p in admin_call(port, "GET", "/api/v1/pools")[1]["pools"]}
    assert pools["servers"]["backends"][0]["address"] == backends[0].address
    assert "string" in pools["strkey"]["error"] and "draining" in pools["other"]["error"]
    out = subprocess.run([sys.executable, "-m", "redlb", "status", "--redis", redis_server.url],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_hostile_pool_and_route_names_keep_metrics_parseable(redis_server, backends, start_proxy):
    r = redis_server.client()
    names = ['p"q', "back\\slash", "a{b}c", 'x"}1,y="']
    for i, name in enumerate(names):
        r.rpush(name, backends[0].address)
        r.hset("redlb:routes", f"/r{i}", name)
    proxy = start_proxy(redis_server.url)
    assert wait_for(lambda: proxy.get("/r0/x")[0] == 200, 10)
    for i in range(len(names)):
        assert proxy.get(f"/r{i}/x")[0] == 200
    samples = scrape(proxy)  # prometheus_client's own parser reads it back
    pools = {dict(ls).get("pool") for (n, ls) in samples if n == "redlb_pool_size"}
    assert set(names) <= pools, pools
    served = {dict(ls).get("pool") for (n, ls) in samples if n == "redlb_requests_total"}
    assert wait_for(
        lambda: (
            set(names)
            <= {dict(ls).get("pool") for (n, ls) in scrape(proxy) if n == "redlb_requests_total"}
        ),
        5,
    ), served


def test_drain_racing_a_remove_leaves_no_orphan_state(redis_server, backends, start_proxy):
    """Before: drain and weight checked membership, then wrote, outside a transaction; a
    remove through another instance in between left the address in the draining set (or
    the weights hash) of a pool it is not in, so re-adding it later brought it back
    silently drained (or weighted)."""
    r = redis_server.client()
    _, port_a = start_admin(start_proxy, redis_server)
    _, port_b = start_admin(start_proxy, redis_server)
    orphans = []
    for round_ in range(25):
        address = f"127.0.0.1:{21000 + round_}"
        r.rpush("servers", address)
        barrier = threading.Barrier(3)
        path = f"/api/v1/pools/servers/backends/{address}"

        def drain() -> None:
            barrier.wait()
            admin_call(port_a, "POST", path + "/drain", {})

        def weight() -> None:
            barrier.wait()
            admin_call(port_a, "PUT", path + "/weight", {"weight": 9})

        def remove() -> None:
            barrier.wait()
            admin_call(port_b, "DELETE", path)

        threads = [threading.Thread(target=f) for f in (drain, weight, remove)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if r.sismember("redlb:servers:draining", address) or r.hexists(
            "redlb:servers:weights", address
        ):
            orphans.append(address)
        assert address.encode() not in r.lrange("servers", 0, -1)
    assert not orphans, orphans
