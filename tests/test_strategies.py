"""Pure strategy modules: distribution properties with hypothesis, no sockets, no Redis."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redlb.address import Backend
from redlb.balancer.ewma import PeakEwma
from redlb.balancer.first import FirstAvailable
from redlb.balancer.least import LeastOutstanding
from redlb.balancer.leastconn import LeastConnections
from redlb.balancer.load import LoadView
from redlb.balancer.random_choice import RandomChoice
from redlb.balancer.rendezvous import TABLE_SIZE, RendezvousHash, SlotStream, build_table
from redlb.balancer.requestkey import KeySpec, cookie, parse_key_spec, request_key
from redlb.balancer.snapshot import Snapshot
from redlb.balancer.sticky import StickyCookie
from redlb.balancer.wrr import WeightedOrder, smooth_period, stride_period
from redlb.pool import Pool

BACKENDS = [Backend(f"10.0.0.{i}", 8000 + i) for i in range(1, 41)]
weights_lists = st.lists(st.integers(1, 20), min_size=1, max_size=8)


def snapshot(n: int, weights: list[int] | None = None) -> Snapshot:
    return Snapshot.of(BACKENDS[:n], weights or ())


# Smooth weighted round robin


def test_smooth_period_is_nginx_sequence() -> None:
    a, b, c = BACKENDS[:3]
    assert smooth_period([a, b, c], [5, 1, 1]) == (a, a, b, a, c, a, a)


@given(weights_lists, st.data())
@settings(deadline=None)
def test_any_run_of_the_period_follows_the_weights(weights: list[int], data: st.DataObject) -> None:
    backends = BACKENDS[: len(weights)]
    period = smooth_period(backends, weights)
    total = len(period)
    start = data.draw(st.integers(0, 3 * total))
    length = data.draw(st.integers(1, 3 * total))
    run = Counter(period[(start + k) % total] for k in range(length))
    weight_sum = sum(weights)
    for backend, weight in zip(backends, weights, strict=True):
        assert abs(run[backend] - length * weight / weight_sum) < 2


@given(weights_lists, st.data())
@settings(deadline=None)
def test_stride_order_of_large_pools_follows_the_weights(
    weights: list[int], data: st.DataObject
) -> None:
    """The layout past nginx's work bound: exact over a period, any run within 3."""
    backends = BACKENDS[: len(weights)]
    period = stride_period(backends, weights)
    assert Counter(period) == dict(zip(backends, weights, strict=True))
    total = len(period)
    start = data.draw(st.integers(0, 3 * total))
    length = data.draw(st.integers(1, 3 * total))
    run = Counter(period[(start + k) % total] for k in range(length))
    for backend, weight in zip(backends, weights, strict=True):
        assert abs(run[backend] - length * weight / total) < 3


@given(weights_lists, st.lists(st.integers(1, 400), min_size=1, max_size=30))
@settings(deadline=None)
def test_fleet_of_leased_blocks_follows_the_weights(weights: list[int], blocks: list[int]) -> None:
    """Instances use contiguous blocks of the shared counter, each only partly: k runs."""
    order = WeightedOrder()
    candidates = snapshot(len(weights), weights)
    counts: Counter[Backend] = Counter()
    index = 0
    rng = random.Random(len(blocks))
    for block in blocks:
        used = rng.randint(0, block)  # an instance may stop anywhere inside its block
        for k in range(used):
            sequence = order.of(candidates)
            counts[sequence[(index + k) % len(sequence)]] += 1
        index += block
    served = sum(counts.values())
    for i, backend in enumerate(candidates):
        share = served * weights[i] / sum(weights)
        assert abs(counts[backend] - share) < 2 * len(blocks)


def test_weighted_order_is_the_snapshot_itself_without_weights() -> None:
    order = WeightedOrder()
    candidates = snapshot(3)
    assert order.of(candidates) is candidates


# Least outstanding (P2C), least connections, peak EWMA


@given(st.integers(2, 10), st.integers(0, 2**32))
@settings(deadline=None)
def test_p2c_never_picks_the_busiest_when_two_differ(n: int, seed: int) -> None:
    load = LoadView()
    candidates = snapshot(n)
    busiest = candidates[seed % n]
    load.set_others({busiest.key: 50})  # only other instances load it
    strategy = LeastOutstanding(load, random.Random(seed).random)
    picks = Counter(strategy.pick(candidates) for _ in range(200))
    assert picks[busiest] == 0
    assert len(picks) == n - 1  # the others are all used


@given(st.integers(0, 2**32))
@settings(deadline=None)
def test_p2c_equalises_in_flight_counts(seed: int) -> None:
    load = LoadView()
    candidates = snapshot(5)
    strategy = LeastOutstanding(load, random.Random(seed).random)
    for _ in range(500):
        load.started(strategy.pick(candidates))
    counts = [load.local.get(b.key, 0) for b in candidates]
    # P2C: the busiest is O(log log n) over the average (random choice: ~28 here).
    assert max(counts) - 100 <= 3


def test_p2c_counts_other_instances_and_weights() -> None:
    load = LoadView()
    a, b = BACKENDS[:2]
    strategy = LeastOutstanding(load, random.Random(1).random)
    load.set_others({a.key: 3})
    assert all(strategy.pick(Snapshot.of([a, b])) is b for _ in range(20))
    # Weight 8 against 1: a with 3 in flight still costs less than b with 1.
    load.set_others({a.key: 3, b.key: 1})
    assert all(strategy.pick(Snapshot.of([a, b], [8, 1])) is a for _ in range(20))


def answered(load: LoadView, backend: Backend, seconds: float) -> None:
    load.started(backend)
    load.finished(backend, seconds)


@given(st.integers(0, 2**32))
@settings(deadline=None)
def test_least_outstanding_gives_near_ties_to_the_faster_backend(seed: int) -> None:
    """Latency counts for at most 1.25 requests (NEAR): a backend 10 times slower loses
    ties and a one-request lead (1.125 requests), never a lead of two; backends of like
    latency are compared on their counts alone."""
    load = LoadView()
    fast, slow, like = BACKENDS[:3]
    strategy = LeastOutstanding(load, random.Random(seed).random)
    answered(load, fast, 0.02)
    answered(load, slow, 0.2)
    pair = Snapshot.of([slow, fast])
    assert all(strategy.pick(pair) is fast for _ in range(10))  # a tie
    load.set_others({fast.key: 1.0})
    assert all(strategy.pick(pair) is fast for _ in range(10))  # the slow one has one fewer
    load.set_others({fast.key: 2.0})
    assert all(strategy.pick(pair) is slow for _ in range(10))  # two fewer: it wins
    answered(load, like, 0.021)
    load.set_others({fast.key: 0.3})
    assert all(strategy.pick(Snapshot.of([fast, like])) is like for _ in range(10))
    load.set_others({})  # like latencies and equal counts: a tie, taken at random
    picks = Counter(strategy.pick(Snapshot.of([fast, like, slow])) for _ in range(200))
    assert set(picks) == {fast, like}


def test_least_outstanding_pair_gives_near_ties_to_the_faster_backend() -> None:
    """Above SCAN_UP_TO, the pair drawn (here always the first two) is compared alike."""
    load = LoadView()
    fast, slow = BACKENDS[:2]
    strategy = LeastOutstanding(load, lambda: 0.0)  # draws candidates 0 and 1
    answered(load, fast, 0.02)
    answered(load, slow, 0.2)
    load.set_others({fast.key: 1.0})
    for first, second in ((fast, slow), (slow, fast)):
        assert strategy.pick(Snapshot.of([first, second, *BACKENDS[2:6]])) is fast
    load.set_others({fast.key: 2.0})
    assert strategy.pick(Snapshot.of([fast, slow, *BACKENDS[2:6]])) is slow


def test_least_conn_takes_equals_in_turn_and_ignores_others() -> None:
    load = LoadView()
    candidates = snapshot(3)
    strategy = LeastConnections(load)
    load.set_others({candidates[0].key: 100})  # invisible to a per-instance strategy
    assert Counter(strategy.pick(candidates) for _ in range(30)) == {b: 10 for b in candidates}
    load.started(candidates[1])
    assert candidates[1] not in {strategy.pick(candidates) for _ in range(10)}


def test_peak_ewma_avoids_a_slow_backend_at_once_and_forgives_it_slowly() -> None:
    now = [0.0]
    load = LoadView(clock=lambda: now[0], decay=10.0)
    fast, slow = BACKENDS[:2]
    strategy = PeakEwma(load, random.Random(3).random)
    candidates = Snapshot.of([fast, slow])
    for backend, elapsed in ((fast, 0.01), (slow, 0.2)):
        load.started(backend)
        load.finished(backend, elapsed)
    assert all(strategy.pick(candidates) is fast for _ in range(20))
    now[0] = 1.0
    load.started(slow)
    load.finished(slow, 0.01)  # one fast answer: the average decays, it does not jump down
    assert load.ewma(slow) > 0.15
    now[0] = 100.0
    assert load.ewma(slow) < 0.001  # no news for long: tried again
    load.started(slow)
    load.finished(slow, 0.01)
    assert load.ewma(slow) < 0.02


def test_load_view_publishes_means_over_the_interval() -> None:
    now = [0.0]
    load = LoadView(clock=lambda: now[0])
    load.windowed = True  # as the publisher sets it
    a, b = BACKENDS[:2]
    load.started(a)
    now[0] = 0.5
    load.finished(a, 0.5)  # a: in flight half of the second
    load.started(b)  # b: from 0.5 on, still in flight
    now[0] = 1.0
    assert load.take_means() == {a.key: 0.5, b.key: 0.5}
    now[0] = 2.0
    assert load.take_means() == {b.key: 1.0}


def test_others_move_with_this_instance_since_they_were_read() -> None:
    """Two peers published 3 on a; since then this instance sent 2 more there: assume they
    did too (a herd otherwise), and never below zero when it finished some."""
    load = LoadView()
    a, b = BACKENDS[:2]
    load.started(b)
    load.set_others({a.key: 3.0}, peers=2)
    load.started(a)
    load.started(a)
    assert load.outstanding(a) == 2 + 3 + 2 * 2
    load.finished(b, 0.0)
    assert load.outstanding(b) == 0  # the others had none there: still none
    strategy = LeastOutstanding(load, random.Random(1).random)
    assert strategy.pick(Snapshot.of([a, b])) is b


def test_own_finish_is_not_taken_for_the_fleets() -> None:
    """This instance had 2 on the slow backend s and 1 on f (its published means), the two
    peers 3 on s and 2 on f: 5 against 3.  One of its own requests on s ends: 4 against 3,
    so the next pick is f.  Taking that finish for the fleet's (s at 5 - 3 = 2) sent every
    client back where it came from, and a 5-3-4 split of 12 clients held for good."""
    load = LoadView()
    s, f = BACKENDS[:2]
    for backend in (s, s, f):
        load.started(backend)
    load.set_others({s.key: 3.0, f.key: 2.0}, peers=2, baseline={s.key: 2.0, f.key: 1.0})
    load.finished(s, 0.2)
    assert load.outstanding(s) == 4 and load.outstanding(f) == 3
    strategy = LeastOutstanding(load, random.Random(1).random)
    assert all(strategy.pick(Snapshot.of([s, f])) is f for _ in range(20))


def test_load_view_finished_never_goes_negative() -> None:
    load = LoadView()
    a = BACKENDS[0]
    load.started(a)
    load.finished(a, 0.1)
    assert load.local == {} and load.local_total == 0


# Random and first available


@given(weights_lists, st.integers(0, 2**32))
@settings(max_examples=30, deadline=None)
def test_random_follows_the_weights(weights: list[int], seed: int) -> None:
    strategy = RandomChoice(random.Random(seed).random)
    candidates = snapshot(len(weights), weights)
    draws = 20_000
    counts = Counter(strategy.pick(candidates) for _ in range(draws))
    for i, backend in enumerate(candidates):
        expected = weights[i] / sum(weights)
        assert abs(counts[backend] / draws - expected) < 0.02


def test_first_fills_in_order_up_to_the_cap() -> None:
    load = LoadView()
    candidates = snapshot(3)
    strategy = FirstAvailable(load, cap=2)
    picks = []
    for _ in range(7):
        backend = strategy.pick(candidates)
        picks.append(candidates.index(backend))
        load.started(backend)
    assert picks == [0, 0, 1, 1, 2, 2, 0]  # all full: the first one (it queues)
    load.finished(candidates[1], 0.0)
    assert strategy.pick(candidates) is candidates[1]


# Consistent hashing


keys_strategy = st.lists(
    st.binary(min_size=1, max_size=12), min_size=200, max_size=400, unique=True
)


def moved_share(
    names: list[str], weights: list[int], after_names: list[str], after_weights: list[int]
) -> tuple[float, list[int], list[int]]:
    """The share of slots whose backend changes, and both tables."""
    before = build_table(names, weights)
    after = build_table(after_names, after_weights)
    moved = sum(1 for a, b in zip(before, after, strict=True) if names[a] != after_names[b])
    return moved / TABLE_SIZE, before, after


@given(st.integers(2, 30), st.integers(0, 29), keys_strategy)
@settings(max_examples=25, deadline=None)
def test_hash_moves_only_the_leavers_keys(n: int, leaving: int, keys: list[bytes]) -> None:
    leaving %= n
    before = RendezvousHash(LoadView(), balance=0)
    after = RendezvousHash(LoadView(), balance=0)
    full = snapshot(n)
    reduced = Snapshot.of([b for i, b in enumerate(full) if i != leaving])
    # Over the table itself (every slot is a key range): exactly the leaver's slots move,
    # and they are <= 1/N + 1% of the table.
    before.pick(full, b"x")
    after.pick(reduced, b"x")
    moved = [i for i, (x, y) in enumerate(zip(before.table, after.table, strict=True))
             if full[x] != reduced[y]]  # fmt: skip
    assert moved == [i for i, x in enumerate(before.table) if x == leaving]
    assert len(moved) / TABLE_SIZE <= 1 / n + 0.01
    # And a key moves only if it was the leaver's.
    gone = full[leaving]
    for key in keys:
        home = before.pick(full, key)
        assert after.pick(reduced, key) == home or home == gone


ADDRESS_FAMILIES = [
    ("10.0.0.{}:80", 0),  # Maglev moved 1/8 + 1.65% here (two backends drew the same skip)
    ("192.168.1.{}:8443", 10),  # and 1/6 + 2.16% here, with no such coincidence
    ("127.0.0.1:{}", 9000),
    ("backend-{}.internal:8080", 1),
    ("[fd00::{}]:443", 1),
]


@pytest.mark.parametrize(("family", "first"), ADDRESS_FAMILIES)
def test_hash_disruption_bound_holds_for_other_addresses(family: str, first: int) -> None:
    """The property test above draws the count and the leaver, but always over the same
    addresses: every removal from 2..12 backends of other address families holds the bound."""
    for n in range(2, 13):
        names = [family.format(first + i) for i in range(n)]
        before = build_table(names, [])
        for leaving in range(n):
            reduced = names[:leaving] + names[leaving + 1 :]
            after = build_table(reduced, [])
            moved = sum(1 for a, b in zip(before, after, strict=True) if names[a] != reduced[b])
            assert moved == before.count(leaving)  # only the leaver's slots
            assert moved / TABLE_SIZE <= 1 / n + 0.01, (family, n, leaving)


@given(st.integers(1, 29), st.integers(0, 29))
@settings(max_examples=15, deadline=None)
def test_hash_joiner_only_takes_slots(n: int, position: int) -> None:
    names = [b.key for b in BACKENDS[: n + 1]]
    joiner = names.pop(position % (n + 1))
    share, before, after = moved_share(names, [], [*names, joiner], [])
    moved = [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if y == n]
    assert share == len(moved) / TABLE_SIZE  # every slot that changed went to the joiner
    assert share <= 1 / (n + 1) + 0.01


def test_hash_weight_change_moves_slots_one_way_only() -> None:
    names = [b.key for b in BACKENDS[:4]]
    share, before, after = moved_share(names, [1, 2, 3, 4], names, [1, 5, 3, 4])
    assert all(x == y or y == 1 for x, y in zip(before, after, strict=True))  # raised: takes
    assert 0 < share <= 5 / 13 - 2 / 10 + 0.01  # its share grows from 2/10 to 5/13
    lowered = build_table(names, [1, 2, 1, 4])
    assert all(x == y or x == 2 for x, y in zip(before, lowered, strict=True))  # lowered: gives


@given(st.integers(1, 40))
@settings(max_examples=20, deadline=None)
def test_hash_shares_follow_the_weights_within_sampling_noise(n: int) -> None:
    """The price of exact disruption: each share is 1/N within its sampling noise (the table
    is M draws of 1/N), five standard deviations here; bounded loads cap the rest."""
    strategy = RendezvousHash(LoadView(), balance=0)
    candidates = snapshot(n)
    strategy.pick(candidates, b"k")
    shares = Counter(strategy.table)
    p = 1 / n
    noise = 5 * (p * (1 - p) / TABLE_SIZE) ** 0.5
    for i in range(n):
        assert abs(shares[i] / TABLE_SIZE - p) <= noise


def test_hash_honours_weights() -> None:
    strategy = RendezvousHash(LoadView(), balance=0)
    candidates = snapshot(3, [1, 2, 5])
    strategy.pick(candidates, b"k")
    shares = Counter(strategy.table)
    for i, weight in enumerate([1, 2, 5]):
        assert abs(shares[i] / len(strategy.table) - weight / 8) < 0.01


def test_hash_draws_do_not_depend_on_block_sizes() -> None:
    """A stream is one sequence however it is taken: instances of different memberships
    (different block sizes) rank every slot alike."""
    one, two = SlotStream("10.0.0.1:80"), SlotStream("10.0.0.1:80")
    cut = one.take(7) + one.take(3000) + one.take(1) + one.take(5000)
    assert cut == two.take(8008)
    assert len(set(cut)) > 7000  # draws, not a repeated pattern


def test_hash_tables_do_not_depend_on_pool_order() -> None:
    names = [b.key for b in BACKENDS[:7]]
    table = build_table(names, [])
    shuffled = names[3:] + names[:3]
    other = build_table(shuffled, [])
    assert [names[i] for i in table] == [shuffled[i] for i in other]
    weighted = build_table(names, [3, 1, 2, 1, 1, 4, 1])
    reordered = build_table(shuffled, [1, 1, 4, 1, 3, 1, 2])
    assert [names[i] for i in weighted] == [shuffled[i] for i in reordered]


@given(st.integers(1, 20), keys_strategy)
@settings(max_examples=25, deadline=None)
def test_hash_same_key_same_backend_across_instances(n: int, keys: list[bytes]) -> None:
    one, two = RendezvousHash(LoadView(), balance=0), RendezvousHash(LoadView(), balance=0)
    candidates = snapshot(n)
    copy = Snapshot.of(list(candidates))  # another instance's own snapshot object
    assert all(one.pick(candidates, k) == two.pick(copy, k) for k in keys)


@given(
    st.integers(2, 12),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.lists(st.integers(0, 5), min_size=50, max_size=600),
)
@settings(max_examples=40, deadline=None)
def test_bounded_load_never_exceeds_one_plus_epsilon_average(
    n: int, epsilon: float, key_ids: list[int]
) -> None:
    """Few distinct keys (hot keys): without the bound, a backend would take them all."""
    load = LoadView()
    strategy = RendezvousHash(load, balance=epsilon)
    candidates = snapshot(n)
    for m, key_id in enumerate(key_ids, 1):
        load.started(strategy.pick(candidates, b"key-%d" % key_id))
        cap = -(-(round(1000 * (1 + epsilon)) * m) // (1000 * n))
        assert max(load.local.values()) <= max(cap, n)  # bounded once the average is >= 1
    if len(key_ids) >= 4 * n * n:  # long enough for the bound to have caught up
        assert max(load.local.values()) <= cap


def test_bounded_load_counts_the_fleet() -> None:
    load = LoadView()
    strategy = RendezvousHash(load, balance=0.25)
    candidates = snapshot(4)
    home = strategy.pick(candidates, b"user-1")
    other = next(b for b in candidates if b is not home)
    load.set_others({home.key: 10, other.key: 0})  # others loaded the key's home
    assert strategy.pick(candidates, b"user-1") != home


@given(
    st.integers(2, 12),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=20, max_size=300),
    st.integers(0, 3),
)
@settings(max_examples=40, deadline=None)
def test_bounded_load_spills_along_the_keys_probes(
    n: int, steps: list[tuple[int, int]], peers: int
) -> None:
    """The routes kept per key pick what walking the probes afresh picks: the key's slot,
    then its rehashes in order, then the least loaded (with the fleet's counts too)."""
    from redlb.balancer.rendezvous import PROBES, key_hash, rehash

    load = LoadView()
    strategy = RendezvousHash(load, balance=0.25)
    candidates = snapshot(n)
    load.set_others({b.key: float(i % 3) for i, b in enumerate(candidates)}, peers=peers)
    for key_id, finishes in steps:
        key = b"key-%d" % key_id
        picked = strategy.pick(candidates, key)
        total = load.total() + 1
        cap = -(-(1250 * total) // (1000 * n))
        h = key_hash(key)
        probes = [h] + [rehash(h, attempt) for attempt in range(1, PROBES + 1)]
        walked = [candidates[strategy.table[p % len(strategy.table)]] for p in probes]
        below = [b for b in walked if load.outstanding(b) < cap]
        if total <= n:
            expected = walked[0]
        else:
            expected = below[0] if below else min(candidates, key=load.outstanding)
        assert picked is expected
        load.started(picked)
        for backend in list(candidates)[:finishes]:
            if load.local.get(backend.key):
                load.finished(backend, 0.01)


def test_every_configurable_strategy_has_a_module() -> None:
    from redlb.balancer import STRATEGIES
    from redlb.config import STRATEGIES as NAMES

    assert set(NAMES) - {"round_robin"} <= set(STRATEGIES)
    assert {"lease", "strict"} <= set(STRATEGIES)


# Request keys


def test_key_specs_parse_and_refuse() -> None:
    assert parse_key_spec("header:X-User") == KeySpec("header", b"x-user")
    assert str(parse_key_spec("query:id")) == "query:id"
    for bad in ("headers:x", "header:", "ip:x", "cookie:a b", "query:" + "x" * 300):
        try:
            parse_key_spec(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_request_key_reads_each_part_and_falls_back_to_the_client() -> None:
    headers = [(b"X-User", b"alice"), (b"Cookie", b"a=1; sid=xyz; b=2")]
    peer, target = b"192.0.2.7", b"/cart/items?id=42&x=%2Fy"
    assert request_key(KeySpec("ip"), peer, target, headers) == peer
    assert request_key(KeySpec("path"), peer, target, headers) == b"/cart/items"
    assert request_key(parse_key_spec("header:x-user"), peer, target, headers) == b"alice"
    assert request_key(KeySpec("cookie", b"sid"), peer, target, headers) == b"xyz"
    assert request_key(KeySpec("query", b"x"), peer, target, headers) == b"/y"
    assert request_key(KeySpec("query", b"nope"), peer, target, headers) == peer
    assert request_key(KeySpec("header", b"x-none"), peer, target, []) == peer
    assert cookie([(b"cookie", b"sid")], b"sid") == b""


# Sticky cookies


@given(st.integers(1, 20), st.integers(0, 19))
@settings(deadline=None)
def test_sticky_value_finds_its_backend_and_nothing_else(n: int, index: int) -> None:
    index %= n
    sticky = StickyCookie("lb", b"s" * 32, "servers")
    candidates = snapshot(n)
    value = sticky.value(candidates[index])
    assert sticky.find(value, candidates) is candidates[index]
    assert candidates[index].key.encode() not in value  # opaque
    other = StickyCookie("lb", b"t" * 32, "servers")  # another secret: a forgery
    assert sticky.find(other.value(candidates[index]), candidates) is None
    gone = Snapshot.of([b for i, b in enumerate(candidates) if i != index])
    assert sticky.find(value, gone) is None  # gone, drained or ejected: the strategy picks
    assert sticky.set_cookie(candidates[index]).startswith(b"Set-Cookie: lb=" + value + b";")


# Slow start


def test_slow_start_ramps_a_joining_backend_in_tenths() -> None:
    wall = [1000.0]
    pool = Pool(wall=lambda: wall[0])
    pool.slow_start = 10.0
    a, b = BACKENDS[:2]
    pool.update(members=[a])
    assert pool.healthy.weights == ()  # start-up: nothing ramps
    pool.update(members=[a, b])
    assert pool.joined == {b}
    assert pool.healthy.weights == (10, 1)
    wall[0] += 5.0
    pool.rebuild()
    assert pool.healthy.weights == (10, 6)
    wall[0] += 5.0
    pool.rebuild()
    assert pool.healthy.weights == () and not pool.ramping
    pool.update(down=[b])
    assert pool.left == {b}


def test_slow_start_uses_the_fleet_time_and_the_weights() -> None:
    wall = [1000.0]
    pool = Pool(wall=lambda: wall[0])
    pool.slow_start = 10.0
    a, b = BACKENDS[:2]
    pool.update(members=[a, b], weights={a: 3})
    assert pool.healthy.weights == (3, 1)
    pool.update(up_since={b: 998.0})  # another instance saw b join 2 s ago
    assert pool.healthy.weights == (30, 3)
    same = pool.healthy
    pool.rebuild()
    assert pool.healthy is same  # nothing changed: strategies keep their tables
