"""What the data path records per request: plain counters, rendered only at scrape time.

Rules:
1. One dict lookup and a few integer additions per request; no timer, lock or allocation
   beyond the first request of a new label set.  Calls per request: this method and one
   ``bisect_left`` (a second only when the first byte came a bucket earlier than the last).
2. Label sets are capped (``MAX_SERIES``): backends and routes come from Redis, so a pool of
   10,000 entries or a route storm must not grow memory or scrape size without bound.  Past
   the cap, new label sets are counted under ``route="other", pool="other",
   backend="other"`` (method and code class kept), so totals stay right.
3. Methods are httptools' (llhttp's) fixed list, so that label is bounded by the parser.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redlb.proxy.exchange import Exchange

# Seconds; Prometheus' `le` upper bounds (the last bucket is +Inf).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
N_BUCKETS = len(BUCKETS) + 1
MAX_SERIES = 2000
MAX_UPSTREAM_SERIES = 1000
OTHER = "other"

# A request series: count, bytes in, bytes out, seconds sum, responses from a backend and
# their time-to-first-byte sum, then the duration buckets, then the first-byte buckets.
COUNT, BYTES_IN, BYTES_OUT, SECONDS, FB_COUNT, FB_SECONDS = 0, 1, 2, 3, 4, 5
FIRST_BUCKET = 6
FB_FIRST_BUCKET = FIRST_BUCKET + N_BUCKETS
SERIES_WIDTH = FB_FIRST_BUCKET + N_BUCKETS
# An upstream timing series: count, seconds sum, then the bucket counts.
U_COUNT, U_SECONDS, U_FIRST_BUCKET = 0, 1, 2

RequestKey = tuple[bytes, str, str, bytes, int]  # route, pool, backend, method, status class
UpstreamKey = tuple[str, str]  # pool, backend


class Recorder:
    """One worker's request counters, keyed by label set."""

    __slots__ = ("connect", "requests")

    def __init__(self) -> None:
        self.requests: dict[RequestKey, list[float]] = {}
        self.connect: dict[UpstreamKey, list[float]] = {}

    def request(self, ex: Exchange, seconds: float) -> None:
        """One finished exchange (called once, from Exchange._finish)."""
        route = ex.req.route
        backend = ex.backend
        key = (
            route.label if route is not None else b"no route",
            ex.up.name if route is not None else "",
            backend.key if backend is not None else "",
            ex.req.method,
            ex.status // 100,
        )
        self.count(key, ex.body_bytes, ex.bytes_out, seconds, ex.first_byte)

    def count(
        self, key: RequestKey, bytes_in: int, bytes_out: int, seconds: float, first_byte: float
    ) -> None:
        """One request of this label set (apart from request(), so that it is tested with
        plain values: a compiled Recorder takes nothing but a real Exchange)."""
        try:
            series = self.requests[key]  # a subscript, not a method call: the common case
        except KeyError:
            series = self._new_request_series(key)
        series[COUNT] += 1
        series[BYTES_IN] += bytes_in
        series[BYTES_OUT] += bytes_out
        series[SECONDS] += seconds
        bucket = bisect_left(BUCKETS, seconds)
        series[FIRST_BUCKET + bucket] += 1
        if first_byte:
            series[FB_COUNT] += 1
            series[FB_SECONDS] += first_byte
            # The first byte comes no later than the last: it is in the request's bucket or
            # below, usually in it (a small response), which one comparison tells.
            if bucket and first_byte <= BUCKETS[bucket - 1]:
                bucket = bisect_left(BUCKETS, first_byte, 0, bucket)
            series[FB_FIRST_BUCKET + bucket] += 1

    def upstream(self, table: dict[UpstreamKey, list[float]], key: UpstreamKey, s: float) -> None:
        """A new connection's connect time (``self.connect``), off the keep-alive path."""
        series = table.get(key)
        if series is None:
            if len(table) >= MAX_UPSTREAM_SERIES:
                key = (OTHER, OTHER)
            series = table.setdefault(key, [0] * (U_FIRST_BUCKET + N_BUCKETS))
        series[U_COUNT] += 1
        series[U_SECONDS] += s
        series[U_FIRST_BUCKET + bisect_left(BUCKETS, s)] += 1

    def _new_request_series(self, key: RequestKey) -> list[float]:
        if len(self.requests) >= MAX_SERIES:
            key = (OTHER.encode(), OTHER, OTHER, key[3], key[4])
            series = self.requests.get(key)
            if series is not None:
                return series
        series = self.requests[key] = [0] * SERIES_WIDTH
        return series
