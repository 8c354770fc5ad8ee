"""/metrics: one consistent view per instance, summed over its workers, with labelled series."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from redlb.metrics.recorder import MAX_SERIES, Recorder
from support import ROOT, metric_sum, request, scrape, wait_for

pytestmark = pytest.mark.timeout(90)


def _fill(redis_server, backends, n=2):
    redis_server.client().rpush("servers", *[b.address for b in backends[:n]])


def test_counters_are_the_sum_of_all_workers_whoever_answers(redis_server, backends, start_proxy):
    """Before: each scrape was one worker's counters (0, 7, 7, 8, 7, 0: rate() broke)."""
    _fill(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--workers", "3")
    for _ in range(60):  # new connection each: spread over the workers by SO_REUSEPORT
        assert proxy.get("/")[0] == 200
    # Other workers' shares are at most one publish interval (1 s) old; then it is exact.
    seen: list[float] = []

    def total() -> float:
        seen.append(metric_sum(scrape(proxy), "redlb_client_connections_total"))
        return seen[-1]

    assert wait_for(lambda: total() == 60.0, 5, interval=0.1), seen
    assert seen == sorted(seen), seen  # on the way up, never down
    again = [metric_sum(scrape(proxy), "redlb_client_connections_total") for _ in range(12)]
    assert again == [60.0] * 12, again


def test_counters_never_go_backwards_while_traffic_flows(redis_server, backends, start_proxy):
    _fill(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    previous = 0.0
    for round_ in range(15):
        for _ in range(5):
            assert proxy.get("/")[0] == 200
        total = metric_sum(scrape(proxy), "redlb_requests_total")
        assert total >= previous, (round_, previous, total)
        previous = total
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 75.0, 5)


def test_a_worker_restart_keeps_its_counts(redis_server, backends, start_proxy):
    _fill(redis_server, backends)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    for _ in range(30):
        assert proxy.get("/")[0] == 200
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 30.0, 5)
    workers = psutil.Process(proxy.pid).children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    assert wait_for(lambda: len(psutil.Process(proxy.pid).children()) == 2 and proxy.ready(), 15)
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_workers") == 2.0, 10)
    after = scrape(proxy)
    assert metric_sum(after, "redlb_requests_total") == 30.0  # the dead worker's share stays
    assert proxy.get("/")[0] == 200
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 31.0, 5)


def test_labels_status_classes_and_histograms(redis_server, backends, start_proxy):
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    for _ in range(4):
        assert proxy.get("/")[0] == 200
    assert proxy.get("/status/404")[0] == 404
    assert request(proxy.port, "POST", "/status/500", body=b"abcdef")[0] == 500
    samples = scrape(proxy)
    where = {"route": "default", "pool": "servers", "backend": backends[0].address}
    assert metric_sum(samples, "redlb_requests_total", **where, code_class="2xx", method="GET") == 4
    assert metric_sum(samples, "redlb_requests_total", **where, code_class="4xx") == 1
    assert (
        metric_sum(samples, "redlb_requests_total", **where, code_class="5xx", method="POST") == 1
    )
    assert metric_sum(samples, "redlb_request_duration_seconds_count", **where) == 6
    assert metric_sum(samples, "redlb_request_duration_seconds_bucket", **where, le="+Inf") == 6
    assert metric_sum(samples, "redlb_request_body_bytes_total", **where) == 6
    assert metric_sum(samples, "redlb_response_body_bytes_total", **where) > 0
    assert metric_sum(samples, "redlb_upstream_first_byte_seconds_count") == 6
    assert metric_sum(samples, "redlb_upstream_connect_seconds_count") >= 1
    assert metric_sum(samples, "redlb_redis_up") == 1
    assert metric_sum(samples, "redlb_process_resident_memory_bytes") > 1e6
    assert metric_sum(samples, "redlb_pool_backends", pool="servers", state="healthy") == 1


def test_pool_members_by_state_and_ejections(redis_server, backends, start_proxy):
    r = redis_server.client()
    r.rpush("servers", backends[0].address, backends[1].address, "127.0.0.1:1")
    proxy = start_proxy(redis_server.url, "--eject-consecutive", "1")
    r.sadd("redlb:servers:draining", backends[1].address)
    r.publish("redlb:servers:events", "drain")
    for _ in range(6):
        proxy.get("/")

    def states() -> dict[str, float]:
        samples = scrape(proxy)
        return {
            s: metric_sum(samples, "redlb_pool_backends", pool="servers", state=s)
            for s in ("healthy", "ejected", "draining", "down")
        }

    assert wait_for(lambda: states() == {"healthy": 1, "ejected": 1, "draining": 1, "down": 0})
    assert metric_sum(scrape(proxy), "redlb_ejections_total") >= 1
    assert metric_sum(scrape(proxy), "redlb_pool_size", pool="servers") == 3


def test_label_sets_are_capped():
    rec = Recorder()
    for i in range(MAX_SERIES + 500):
        backend = f"10.0.{i // 250}.{i % 250}:80"
        rec.count((b"r", "p", backend, b"GET", 2), 0, 1, 0.001, 0.0005)
    assert len(rec.requests) == MAX_SERIES + 1  # the capped ones share one "other" series
    assert rec.requests[(b"other", "other", "other", b"GET", 2)][0] == 500
    assert sum(series[0] for series in rec.requests.values()) == MAX_SERIES + 500


GRAFANA = ROOT / "ops" / "grafana-redlb.json"


def test_grafana_dashboard_names_only_real_metrics(redis_server, backends, start_proxy):
    """Every expression of the dashboard names series a real running redlb exports."""
    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url, "--workers", "2")
    for _ in range(3):
        proxy.get("/")
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 3, 5)
    samples = scrape(proxy)
    exported = {name for name, _ in samples}
    dashboard = json.loads(Path(GRAFANA).read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 10
    named = set()
    for expr in expressions:
        for name in re.findall(r"\b(redlb_[a-z0-9_]+)", expr):
            named.add(name)
            assert name in exported, f"{name} (in {expr!r}) is not exported"
    # and the dashboard covers the families that matter
    for family in (
        "redlb_requests_total",
        "redlb_request_duration_seconds_bucket",
        "redlb_pool_backends",
        "redlb_redis_up",
        "redlb_upstream_connect_seconds_bucket",
    ):
        assert family in named, family


def test_in_flight_returns_to_zero_when_a_client_drops_pipelined_requests(
    redis_server, backends, start_proxy
):
    """Requests queued behind the first one on a connection that closes never started."""
    import socket

    redis_server.client().rpush("servers", backends[0].address)
    proxy = start_proxy(redis_server.url)
    backends[0].behaviour.delay = 0.3
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        time.sleep(0.05)
        sock.close()  # the first is in flight, three wait behind it
    time.sleep(0.6)
    backends[0].behaviour.delay = 0.0
    assert proxy.get("/")[0] == 200
    assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_active_requests") == 0, 3), metric_sum(
        scrape(proxy), "redlb_active_requests"
    )
    samples = scrape(proxy)
    assert metric_sum(samples, "redlb_pool_active_requests", pool="servers") == 0
    # No request that never started is counted, nor given a duration.
    assert metric_sum(samples, "redlb_request_duration_seconds_sum") < 10


def test_pipelined_status_requests_are_answered_in_order_around_a_metrics_scrape(
    redis_server, backends, start_proxy
):
    """/metrics is built over several turns of the loop: what a client asked after it (and
    a bad request after that) is answered after it, in order, on the same connection."""
    from support import raw_exchange

    client = redis_server.client()
    client.rpush("routed", *[b.address for b in backends[:2]])
    client.hset("redlb:routes", mapping={f"h{i}.example.com/": "routed" for i in range(2000)})
    proxy = start_proxy(redis_server.url)
    assert wait_for(lambda: b"redlb_route_members" in proxy.status("/metrics")[1], 15)
    asked = (b"GET /-/live HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
             b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
             b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n"
             b"BAD\r\n\r\n")  # fmt: skip
    data, closed = raw_exchange(proxy.status_port, asked, timeout=10)
    assert closed  # the bad request is answered 400 and the connection closed
    answers = []
    rest = data
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body_length = 0 if len(answers) == 2 else length  # the HEAD's answer has no body
        answers.append((head.split(b"\r\n")[0], rest[:body_length]))
        rest = rest[body_length:]
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK",
                                       b"HTTP/1.1 404 Error", b"HTTP/1.1 200 OK",
                                       b"HTTP/1.1 400 Error"], answers  # fmt: skip
    assert answers[0][1] == b"live\n" and answers[4][1] == b"ready\n"
    assert answers[1][1].count(b"redlb_route_members{") == 2000
    assert b"redlb_pool_size{" in answers[1][1]
