"""What the data path records per request: plain counters, rendered only at scrape time.

Rules:
1. One dict lookup and a few additions per request; no timer, lock or allocation beyond the
   first request of a new label set.  The bucket is found by a loop from the smallest (most
   requests are in the first buckets): compiled, a few native comparisons, where a call to
   ``bisect_left`` costs more.  Module constants are ``Final``: compiled, a constant, not a
   lookup in the module's dict.
2. Label sets are capped (``MAX_SERIES``): backends and routes come from Redis, so a pool of
   10,000 entries or a route storm must not grow memory or scrape size without bound.  Past
   the cap, new label sets are counted under ``route="other", pool="other",
   backend="other"`` (method and code class kept), so totals stay right.
3. Methods are httptools' (llhttp's) fixed list, so that label is bounded by the parser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from redlb.proxy.exchange import Exchange

# Seconds; Prometheus' `le` upper bounds (the last bucket is +Inf).
# tuple[float, ...]: compiled, a fixed-size tuple type is a C struct, boxed whole to be indexed.
BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
N_BUCKETS: Final = 15  # len(BUCKETS) + 1: the last bucket is +Inf
MAX_SERIES: Final = 2000
MAX_UPSTREAM_SERIES: Final = 1000
OTHER: Final = "other"

# A request series: count, bytes in, bytes out, seconds sum, responses from a backend and
# their time-to-first-byte sum, then the duration buckets, then the first-byte buckets.
COUNT: Final = 0
BYTES_IN: Final = 1
BYTES_OUT: Final = 2
SECONDS: Final = 3
FB_COUNT: Final = 4
FB_SECONDS: Final = 5
FIRST_BUCKET: Final = 6
FB_FIRST_BUCKET: Final = FIRST_BUCKET + N_BUCKETS
SERIES_WIDTH: Final = FB_FIRST_BUCKET + N_BUCKETS
# An upstream timing series: count, seconds sum, then the bucket counts.
U_COUNT: Final = 0
U_SECONDS: Final = 1
U_FIRST_BUCKET: Final = 2

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
        bucket = bucket_of(seconds)
        series[FIRST_BUCKET + bucket] += 1
        if first_byte:
            series[FB_COUNT] += 1
            series[FB_SECONDS] += first_byte
            # The first byte comes no later than the last: it is in the request's bucket or
            # below, usually in it (a small response), which one comparison tells.
            if bucket and first_byte <= BUCKETS[bucket - 1]:
                bucket = bucket_of(first_byte)
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
        series[U_FIRST_BUCKET + bucket_of(s)] += 1

    def _new_request_series(self, key: RequestKey) -> list[float]:
        if len(self.requests) >= MAX_SERIES:
            key = (OTHER.encode(), OTHER, OTHER, key[3], key[4])
            series = self.requests.get(key)
            if series is not None:
                return series
        series = self.requests[key] = [0] * SERIES_WIDTH
        return series


def bucket_of(seconds: float) -> int:
    """The first bucket whose upper bound is at least ``seconds`` (``bisect_left``)."""
    bucket = 0
    while bucket < N_BUCKETS - 1 and BUCKETS[bucket] < seconds:
        bucket += 1
    return bucket
