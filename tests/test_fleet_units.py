"""The fleet's counting, free of I/O: per-interval deltas, the minute window, percentiles."""

from __future__ import annotations

from types import SimpleNamespace

from redlb.fleet.publisher import E5, LAT, REQ, WINDOW, Publisher
from redlb.fleet.view import _quantile, backend_rates
from redlb.metrics.recorder import BUCKETS, FIRST_BUCKET, Recorder


def _publisher() -> tuple[Publisher, Recorder]:
    recorder = Recorder()
    ctx = SimpleNamespace(
        recorder=recorder, pools={}, table=SimpleNamespace(single=None, routes=[])
    )
    instance = SimpleNamespace(id="i", metrics_dir=None)
    return Publisher(ctx, SimpleNamespace(up=False), instance, 0), recorder  # type: ignore[arg-type]


def _serve(recorder: Recorder, status: int, seconds: float, n: int = 1) -> None:
    key = (b"/", "p", "b:1", b"GET", status // 100)  # what request() makes of an exchange
    for _ in range(n):
        recorder.count(key, 0, 10, seconds, seconds / 2)  # plain values: it may be compiled


def test_intervals_are_deltas_and_the_minute_window_slides():
    pub, rec = _publisher()
    _serve(rec, 200, 0.002, 10)
    _serve(rec, 500, 0.002, 2)
    first = pub.tick()
    assert first[("p", "b:1")][REQ] == 12 and first[("p", "b:1")][E5] == 2
    _serve(rec, 200, 0.002, 3)
    second = pub.tick()
    assert second[("p", "b:1")][REQ] == 3  # only what happened since
    assert pub.minute[("p", "b:1")][REQ] == 15
    for _ in range(WINDOW - 2):
        assert pub.tick() == {}  # quiet intervals
    assert pub.minute[("p", "b:1")][REQ] == 15  # still inside the minute
    pub.tick()
    assert pub.minute[("p", "b:1")][REQ] == 3  # the first interval left the window
    pub.tick()
    assert ("p", "b:1") not in pub.minute  # and then the second


def test_quantiles_follow_prometheus_interpolation():
    buckets = [0] * (len(BUCKETS) + 1)
    i = BUCKETS.index(0.005)
    buckets[i] = 100  # all between 2.5 ms and 5 ms
    assert _quantile(0.5, buckets) == 3.75
    assert round(_quantile(0.99, buckets), 3) == 4.975
    assert _quantile(0.5, [0] * len(buckets)) is None
    buckets[-1] = 1000  # most beyond the last bound: the last bound is the answer
    assert _quantile(0.99, buckets) == BUCKETS[-1] * 1000


def test_rates_sum_over_every_worker_of_every_instance():
    width = LAT + len(BUCKETS) + 1
    last = [0] * width
    last[REQ] = 5
    minute = [0] * width
    minute[REQ], minute[E5] = 100, 10
    minute[LAT + 2] = 100
    doc = {"interval": 1.0, "backends": [["p", "b:1", 2, last, minute]]}
    rates = backend_rates([doc, doc, doc])
    row = rates[("p", "b:1")]
    assert row["in_flight"] == 6 and row["requests_per_second"] == 15
    assert row["requests_last_minute"] == 300 and row["error_rate"] == 0.1
    assert row["p50_ms"] is not None and 1.0 <= row["p50_ms"] <= 2.5


def test_recorder_buckets_are_prometheus_le():
    rec = Recorder()
    _serve(rec, 200, BUCKETS[3])  # exactly on a bound counts in that bucket (le)
    (series,) = rec.requests.values()
    assert series[FIRST_BUCKET + 3] == 1


def test_a_snapshot_of_a_thousand_pools_is_encoded_a_slice_a_turn():
    """The periodic snapshot gives the event loop a turn between slices (1,000 pools and
    hundreds of series encoded in one go held a routed worker's loop for milliseconds), and
    the document is the same one the scrape's one-go take() writes."""
    import json

    from redlb.address import parse_backend
    from redlb.metrics import snapshot
    from redlb.pool import Pool
    from redlb.proxy.context import Stats

    recorder = Recorder()
    for n in range(250):
        recorder.count((b"/r%d" % n, "p", "b:1", b"GET", 2), 0, 10, 0.002, 0.001)
    pools = {}
    for n in range(1000):
        pool = Pool(50)
        pool.update(members=[parse_backend(b"127.0.0.1:%d" % (p + 1)) for p in range(3)],
                    down=[parse_backend(b"127.0.0.1:1")] if n == 7 else [])  # fmt: skip
        pools[f"pool{n}"] = SimpleNamespace(pool=pool, budget=SimpleNamespace(active_requests=n))
    ctx = SimpleNamespace(recorder=recorder, stats=Stats(), pools=pools, clients=set(),
                          access_log=SimpleNamespace(dropped=0), active_exchanges=0,
                          open_tunnels=0)  # fmt: skip
    link = SimpleNamespace(reconnects=0, up=True)
    steps = list(snapshot.take_in_steps(ctx, link, 0, 0.0))  # type: ignore[arg-type]
    turns, document = steps[:-1], steps[-1]
    assert turns == [None] * len(turns)
    assert len(turns) >= 1000 // snapshot.POOL_SLICE + 250 // snapshot.SERIES_SLICE
    assert snapshot.POOL_SLICE <= 200 and snapshot.SERIES_SLICE <= 200
    assert isinstance(document, str)
    parsed = json.loads(document)
    assert parsed["pools"][7] == ["pool7", 3, 2, 1, 0, 0, 7]
    assert parsed["pools"][999] == ["pool999", 3, 3, 0, 0, 0, 999]
    assert len(parsed["requests"]) == 250
    assert parsed["requests"][5][:5] == ["/r5", "p", "b:1", "GET", 2]
    one_go = json.loads(snapshot.take(ctx, link, 0, 0.0))  # type: ignore[arg-type]
    assert {k: v for k, v in one_go.items() if k not in ("time", "gauges", "counters")} == {
        k: v for k, v in parsed.items() if k not in ("time", "gauges", "counters")
    }


def test_the_heartbeat_sums_series_per_backend_a_slice_a_turn():
    """The periodic round sums the recorder's series per backend across turns of the loop
    (2,000 series in one go held it for milliseconds): the same sums as in one go."""
    import asyncio

    from redlb.fleet.publisher import SERIES_SLICE, by_backend

    pub, rec = _publisher()
    for n in range(2 * SERIES_SLICE + 50):
        status = 500 if n % 7 == 0 else 200
        rec.count((b"/r%d" % n, f"p{n % 9}", f"b:{n % 4}", b"GET", status // 100), 0, 10,
                  0.002, 0.001)  # fmt: skip
    turns = 0

    async def sums() -> dict:
        nonlocal turns

        async def count_turns() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        counter = asyncio.get_running_loop().create_task(count_turns())
        result = await pub._by_backend_in_steps()
        counter.cancel()
        return result

    assert asyncio.run(sums()) == by_backend(rec.requests)
    assert turns >= 2  # the loop ran between slices
