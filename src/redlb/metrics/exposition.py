"""The instance's summed metrics as Prometheus text (names and types follow its conventions).

Label cardinality: request series are capped per worker (recorder.MAX_SERIES label sets,
then ``other``); pools and routes come from the routing table, itself capped by RouteSync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from redlb.metrics import looplag
from redlb.metrics.recorder import (
    BUCKETS,
    BYTES_IN,
    BYTES_OUT,
    COUNT,
    FB_COUNT,
    FB_FIRST_BUCKET,
    FB_SECONDS,
    FIRST_BUCKET,
    N_BUCKETS,
    SECONDS,
    U_FIRST_BUCKET,
    U_SECONDS,
)
from redlb.metrics.snapshot import POOL_STATES, STATS_COUNTERS, InstanceView

BOUNDS = [*(repr(b) for b in BUCKETS), "+Inf"]
CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


POOL_SLICE = 200  # pools written between two turns of the loop (render_in_steps)


def render(view: InstanceView, info: dict[str, str]) -> bytes:
    return b"".join(render_in_steps(view, info))


def render_in_steps(view: InstanceView, info: dict[str, str]) -> Iterator[bytes]:
    """The text a part at a time (a group of families, or a slice of pools): the caller
    lets the event loop run between parts.  In one go, a thousand pools' text and the
    families held the loop for ten milliseconds or more a scrape."""
    yield _families(lambda: _requests(view.snapshots))
    yield _families(lambda: _upstream(view.snapshots))
    yield _families(lambda: _others(view, info))
    yield from _per_pool_text(view)


def _others(view: InstanceView, info: dict[str, str]) -> Iterator[Metric]:
    yield from _counters(view.snapshots)
    yield from _gauges(view)
    yield from _loop_lag(view)
    yield from _pools(view)
    instance = InfoMetricFamily("redlb_instance", "This redlb instance")
    instance.add_metric([], info)
    yield instance


def _families(make: Callable[[], Iterable[Metric]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(make))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, make: Callable[[], Iterable[Metric]]) -> None:
        self.make = make

    def collect(self) -> Iterable[Metric]:
        return self.make()


def _labels(name: str) -> str:
    return name or "none"


def _requests(snapshots: Iterable[dict[str, Any]]) -> Iterator[Metric]:
    counts: dict[tuple[str, ...], float] = {}
    bytes_in: dict[tuple[str, ...], float] = {}
    bytes_out: dict[tuple[str, ...], float] = {}
    hist: dict[tuple[str, ...], list[float]] = {}
    per_pool: dict[str, float] = {}
    for snap in snapshots:
        for route, pool, backend, method, klass, series in snap["requests"]:
            where: tuple[str, ...] = (route or "default", _labels(pool), _labels(backend))
            full = (*where, CLASSES.get(klass, "none"), method)
            counts[full] = counts.get(full, 0) + series[COUNT]
            bytes_in[where] = bytes_in.get(where, 0) + series[BYTES_IN]
            bytes_out[where] = bytes_out.get(where, 0) + series[BYTES_OUT]
            acc = hist.setdefault(where, [0.0] * (1 + N_BUCKETS))
            acc[0] += series[SECONDS]
            for i in range(N_BUCKETS):
                acc[1 + i] += series[FIRST_BUCKET + i]
            if pool:
                per_pool[pool] = per_pool.get(pool, 0) + series[COUNT]
    total = CounterMetricFamily(
        "redlb_requests",
        "Requests answered, by route, pool, backend, status class and method",
        labels=["route", "pool", "backend", "code_class", "method"],
    )
    for labels, value in sorted(counts.items()):
        total.add_metric(list(labels), value)
    yield total
    where_labels = ["route", "pool", "backend"]
    received = CounterMetricFamily(
        "redlb_request_body_bytes", "Request body bytes received from clients", labels=where_labels
    )
    sent = CounterMetricFamily(
        "redlb_response_body_bytes", "Response body bytes sent to clients", labels=where_labels
    )
    duration = HistogramMetricFamily(
        "redlb_request_duration_seconds",
        "Time from a request's turn to its last response byte",
        labels=where_labels,
    )
    for where in sorted(hist):
        received.add_metric(list(where), bytes_in[where])
        sent.add_metric(list(where), bytes_out[where])
        acc = hist[where]
        duration.add_metric(list(where), _cumulative(acc[1:]), acc[0])
    yield received
    yield sent
    yield duration
    pool_requests = CounterMetricFamily(
        "redlb_pool_requests", "Requests routed to the pool", labels=["pool"]
    )
    for pool, value in sorted(per_pool.items()):
        pool_requests.add_metric([pool], value)
    yield pool_requests


def _cumulative(buckets: list[float]) -> list[tuple[str, float]]:
    out = []
    running = 0.0
    for bound, count in zip(BOUNDS, buckets, strict=True):
        running += count
        out.append((bound, running))
    return out


def _upstream(snapshots: list[dict[str, Any]]) -> Iterator[Metric]:
    connect: dict[tuple[str, str], list[float]] = {}
    first_byte: dict[tuple[str, str], list[float]] = {}
    for snap in snapshots:
        for pool, backend, series in snap["connect"]:
            a = connect.setdefault((pool, backend), [0.0] * (1 + N_BUCKETS))
            a[0] += series[U_SECONDS]
            for i in range(N_BUCKETS):
                a[1 + i] += series[U_FIRST_BUCKET + i]
        for _, pool, backend, _, _, series in snap["requests"]:
            if not series[FB_COUNT]:
                continue
            a = first_byte.setdefault((_labels(pool), _labels(backend)), [0.0] * (1 + N_BUCKETS))
            a[0] += series[FB_SECONDS]
            for i in range(N_BUCKETS):
                a[1 + i] += series[FB_FIRST_BUCKET + i]
    for acc, name, doc in (
        (connect, "redlb_upstream_connect_seconds", "Time to open a backend connection"),
        (
            first_byte,
            "redlb_upstream_first_byte_seconds",
            "Time from a request's turn to the backend's response head",
        ),
    ):
        family = HistogramMetricFamily(name, doc, labels=["pool", "backend"])
        for key in sorted(acc):
            a = acc[key]
            family.add_metric(list(key), _cumulative(a[1:]), a[0])
        yield family


def _counters(snapshots: list[dict[str, Any]]) -> Iterator[Metric]:
    def total(key: str) -> float:
        return sum(float(snap["counters"].get(key, 0)) for snap in snapshots)

    docs = {
        "rejected": "Malformed or over-limit requests refused by redlb",
        "proxy_errors": "Responses generated by redlb itself (no backend answer)",
        "retries": "Requests retried on another connection or backend",
        "retries_refused": "Retries refused by the retry budget",
        "upstream_connects": "New backend connections opened",
        "upstream_reuses": "Requests sent on a pooled backend connection",
        "upstream_tls_failures": "Handshakes with https:// backends that failed (any reason)",
        "client_connections": "Client connections accepted",
        "tls_handshake_failures": "TLS handshakes that failed or timed out (not logged one by one)",
        "tunnels": "WebSocket tunnels opened",
    }
    for key, name in STATS_COUNTERS.items():
        yield CounterMetricFamily(name, docs[key], value=total(key))
    for key, name, doc in (
        ("ejections", "redlb_ejections", "Backends ejected by this instance (passive health)"),
        ("redis_reconnects", "redlb_redis_reconnects", "Times Redis came back after an outage"),
        ("log_dropped", "redlb_access_log_dropped", "Access log lines dropped"),
        ("cpu_seconds", "redlb_process_cpu_seconds", "User and system CPU of all workers"),
    ):
        yield CounterMetricFamily(name, doc, value=total(key))
    tunnel_bytes = CounterMetricFamily(
        "redlb_tunnel_bytes",
        "Bytes relayed by WebSocket tunnels (an open one's within a second)",
        labels=["direction"],
    )
    for direction in ("to_client", "from_client"):
        tunnel_bytes.add_metric([direction], total(f"tunnel_bytes_{direction}"))
    yield tunnel_bytes


def _gauges(view: InstanceView) -> Iterator[Metric]:
    live = view.live

    def total(key: str) -> float:
        return sum(float(snap["gauges"].get(key, 0)) for snap in live)

    yield GaugeMetricFamily("redlb_workers", "Worker processes running", value=len(live))
    yield GaugeMetricFamily(
        "redlb_active_requests", "Requests in flight", value=total("active_requests")
    )
    yield GaugeMetricFamily(
        "redlb_open_connections", "Open client connections", value=total("open_connections")
    )
    yield GaugeMetricFamily(
        "redlb_open_tunnels",
        "Open WebSocket tunnels (their connections are in redlb_open_connections too)",
        value=total("open_tunnels"),
    )
    yield GaugeMetricFamily(
        "redlb_redis_up",
        "1 when Redis answers every worker",
        value=min((snap["gauges"]["redis_up"] for snap in live), default=0),
    )
    yield GaugeMetricFamily(
        "redlb_redis_latency_seconds",
        "Slowest worker's last Redis round trip (the fleet heartbeat)",
        value=max((snap["gauges"]["redis_latency_seconds"] for snap in live), default=0.0),
    )
    yield GaugeMetricFamily(
        "redlb_process_resident_memory_bytes",
        "Resident memory of all workers",
        value=total("resident_memory_bytes"),
    )
    yield GaugeMetricFamily(
        "redlb_process_open_fds", "Open file descriptors of all workers", value=total("open_fds")
    )
    yield GaugeMetricFamily(
        "redlb_metrics_series",
        "Request label sets held (capped per worker; past it, counted as 'other')",
        value=sum(len(snap["requests"]) for snap in view.snapshots),
    )


def _loop_lag(view: InstanceView) -> Iterator[Metric]:
    """How late each worker's event loop ran what was due (metrics/looplag.py)."""
    cumulative = [0.0] * len(looplag.BUCKETS)
    count = total = largest = 0.0
    for snap in view.snapshots:
        lag = snap.get("loop_lag")
        if not lag:
            continue
        cumulative = [a + b for a, b in zip(cumulative, lag["buckets"], strict=True)]
        count += lag["count"]
        total += lag["sum"]
        if snap in view.live:
            largest = max(largest, lag["max"])
    family = HistogramMetricFamily(
        "redlb_event_loop_lag_seconds",
        "How much later than due a worker's event loop woke a 20 ms timer (a stall every "
        "request waits behind)",
    )
    bounds = [repr(b) for b in looplag.BUCKETS]
    family.add_metric([], [*zip(bounds, cumulative, strict=True), ("+Inf", count)], total)
    yield family
    yield GaugeMetricFamily(
        "redlb_event_loop_lag_max_seconds",
        "The largest event loop lag of any worker since its previous snapshot (about a second)",
        value=largest,
    )


def _pools(view: InstanceView) -> Iterator[Metric]:
    all_members = all_healthy = 0
    freshest = view.freshest
    if freshest is not None:
        for _, total, healthy, *_ in freshest["pools"]:
            all_members += total
            all_healthy += healthy
    yield GaugeMetricFamily("redlb_pool_members", "Valid entries of every pool", value=all_members)
    yield GaugeMetricFamily("redlb_pool_healthy", "Backends taking traffic", value=all_healthy)


def _per_pool_text(view: InstanceView) -> Iterator[bytes]:
    """Per-pool series written as text, ``POOL_SLICE`` pools a part: with a thousand pools,
    prometheus_client's objects held the event loop for tens of ms a scrape (status.py
    writes per-route series alike).  Each family's lines stay together."""
    freshest = view.freshest
    if freshest is None:
        return
    in_flight: dict[str, float] = {}
    for snap in view.live:
        for row in snap["pools"]:
            in_flight[row[0]] = in_flight.get(row[0], 0) + row[6]
    rows = freshest["pools"]
    yield (
        b"# HELP redlb_pool_backends Backends of the pool by state\n"
        b"# TYPE redlb_pool_backends gauge\n"
    )
    for start in range(0, len(rows), POOL_SLICE):
        backends: list[bytes] = []
        for name, _, *counts, _ in rows[start : start + POOL_SLICE]:
            pool = label_value(name)
            for state, count in zip(POOL_STATES, counts, strict=True):
                backends.append(
                    b'redlb_pool_backends{pool="%b",state="%b"} %r\n'
                    % (pool, state.encode(), float(count))
                )
        yield b"".join(backends)
    yield b"# HELP redlb_pool_size Valid entries of the pool\n# TYPE redlb_pool_size gauge\n"
    for start in range(0, len(rows), POOL_SLICE):
        yield b"".join(
            b'redlb_pool_size{pool="%b"} %r\n' % (label_value(row[0]), float(row[1]))
            for row in rows[start : start + POOL_SLICE]
        )
    yield (
        b"# HELP redlb_pool_active_requests Requests in flight to the pool\n"
        b"# TYPE redlb_pool_active_requests gauge\n"
    )
    for start in range(0, len(rows), POOL_SLICE):
        yield b"".join(
            b'redlb_pool_active_requests{pool="%b"} %r\n'
            % (label_value(row[0]), float(in_flight.get(row[0], 0)))
            for row in rows[start : start + POOL_SLICE]
        )


def label_value(value: str | bytes) -> bytes:
    """A Prometheus label value: backslash, quote and newline escaped."""
    raw = value.encode() if isinstance(value, str) else value
    return raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b'"', b'\\"')
