"""Review of the periodic work re-sliced into ~0.1 ms turns (merge of ``tail``): the metrics
snapshot, its file, the heartbeat, the sweeper and the access log, on real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import threading
import time

import psutil

from support import (
    CountingBackend,
    HttpBackend,
    Proxy,
    RedisProcess,
    metric,
    metric_sum,
    open_fds,
    read_response,
    request,
    scrape,
    statuses,
    wait_for,
)


def _scrapes_at_once(proxy: Proxy, count: int) -> list[int]:
    """``count`` scrapes sent on connections opened beforehand while the worker is stopped:
    they reach it in the same turn of its loop."""
    port = proxy.status_port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    try:
        time.sleep(0.05)  # accepted: each connection's request is all that remains
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            for sock in socks:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.05)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        out = []
        for sock in socks:
            answer = read_response(sock)
            out.append(statuses(answer)[0] if answer else 0)
        return out
    finally:
        for sock in socks:
            sock.close()


def test_concurrent_scrapes_of_one_worker_all_answer(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """Two scrapers (an HA pair of Prometheus servers) ask the same worker at once: each
    writes the worker's snapshot in steps through the same temporary file, so one renamed
    the other's file away and the second rename failed (500, "No such file")."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    try:
        for _ in range(5):
            proxy.get("/")
        answers: list[int] = []
        for _round in range(10):
            answers += _scrapes_at_once(proxy, 3)
            time.sleep(0.3)  # past SCRAPE_FRESHNESS: the next round writes the file again
        assert answers.count(200) == len(answers), (str(answers), proxy.log()[-300:])
    finally:
        proxy.stop()


def _pipelined(port: int, target: str, count: int) -> int:
    """``count`` GETs pipelined on one connection in one write; the answers read back."""
    return _answers([target] * count, port).count(b"HTTP/1.1 ")


def _answers(targets: list[str], port: int, timeout: float = 10) -> bytes:
    """GETs of ``targets`` pipelined on one connection in one write; what came back, read
    until as many answers arrived or the connection closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(f"GET {t} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for t in targets))
        data = b""
        while data.count(b"HTTP/1.1 ") < len(targets):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return data


def test_a_full_access_log_batch_of_long_lines_is_written_not_dropped(
    redis_server: RedisProcess, tmp_path
):
    """A burst (1,500 pipelined requests: the empty pool answers 503 at once) fills a batch
    of FLUSH_LINES = 1,024 lines before the timer; JSON lines with a long target (cut at 200
    bytes) are ~300 bytes, so the batch alone was over MAX_PENDING (256 KiB) and dropped
    whole, though the writer had nothing pending: 1,024 of 1,500 lines lost."""
    proxy = Proxy(redis_server.url, "--log-format", "json", workdir=tmp_path / "p").start()
    try:
        target = "/" + "a" * 300
        assert _pipelined(proxy.port, target, 1500) == 1500
        written = lambda: proxy.access_log().count('"status":503')  # noqa: E731
        wait_for(lambda: written() >= 1500, 5)
        assert (written(), metric(proxy, "redlb_access_log_dropped")) == (1500, 0.0)
    finally:
        proxy.stop()


def test_a_pipelined_flood_raises_nothing_in_the_compiled_backlog_parse(
    redis_server: RedisProcess, tmp_path
):
    """A pipelined client's backlog parsed again leaves a backlog (paused once more):
    compiled, ``_parse_backlog`` checked ``self.backlog`` narrowed to None by mypy after it
    set it, so mypyc's cast raised "TypeError: None object expected; got bytes" in the
    loop's callback, a traceback logged each time (40 for 1,500 requests)."""
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    try:
        assert _pipelined(proxy.port, "/x", 1500) == 1500
        assert _pipelined(proxy.port, "/x", 1500) == 1500
        log = proxy.log()
        assert "Traceback" not in log, log[-800:]
    finally:
        proxy.stop()


def test_the_open_fds_gauge_is_not_zero_after_the_descriptors_ran_out(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """Out of descriptors, listing /proc/self/fd fails (EMFILE) and was counted 0; that 0
    was then kept FDS_MAX_AGE (10 s): once clients left, /metrics said the worker had no
    descriptor open at all, the opposite of the truth an operator alerts on."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    children = psutil.Process(proxy.pid).children()
    worker = children[0].pid if children else proxy.pid
    limit = open_fds(worker) + 20
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, limit))
    held: list[socket.socket] = []
    try:
        for _ in range(30):  # more than the worker can accept: it runs out
            held.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        time.sleep(2.5)  # the periodic snapshot (each second) runs out of descriptors too
        for sock in held:
            sock.close()
        held.clear()
        assert wait_for(lambda: proxy.status("/metrics")[0] == 200, 10)
        gauge = metric(proxy, "redlb_process_open_fds")
        assert gauge is not None and gauge >= open_fds(worker) // 2, (gauge, open_fds(worker))
    finally:
        for sock in held:
            sock.close()
        proxy.stop()


def test_metrics_summed_over_two_workers_match_the_requests_sent_exactly(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """A series is encoded again only when its count moved (snapshot._encode_rows): the
    bytes, durations and code classes of every series, summed over two workers' files,
    must still be exactly what was sent, per backend and per class, round after round."""
    redis_server.cli("RPUSH", "servers", backends[0].address, backends[1].address)
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()
    try:
        sent = {"2xx": 0, "4xx": 0, "5xx": 0}
        body_in = body_out = 0
        paths = ["/big/%d", "/status/404", "/status/500", "/big/%d"]
        for round_ in range(3):
            for i in range(40):  # each a new connection: both workers take some
                path = paths[i % 4] % (i * 7 + round_) if "%d" in paths[i % 4] else paths[i % 4]
                body = b"x" * (i * 3 + round_)
                status, data, _ = request(proxy.port, "POST", path, body=body)
                sent[f"{status // 100}xx"] += 1
                body_in += len(body)
                body_out += len(data)
            want = (
                sent,
                float(body_in),
                float(body_out),
                {b.address: float(b.count()) for b in backends[:2]},
            )

            def seen():  # type: ignore[no-untyped-def]
                samples = scrape(proxy)
                return (
                    {
                        k: int(metric_sum(samples, "redlb_requests_total", code_class=k))
                        for k in sent
                    },
                    metric_sum(samples, "redlb_request_body_bytes_total"),
                    metric_sum(samples, "redlb_response_body_bytes_total"),
                    {
                        b.address: metric_sum(samples, "redlb_requests_total", backend=b.address)
                        for b in backends[:2]
                    },
                )

            assert wait_for(lambda: seen() == want, 5, interval=0.2), (round_, seen(), want)
            for _ in range(4):  # each worker answers some: every answer exact
                assert seen() == want
    finally:
        proxy.stop()


def _heartbeats(redis_server: RedisProcess) -> list[dict]:  # type: ignore[type-arg]
    client = redis_server.client()
    out = []
    for member in client.zrange("redlb:fleet:workers", 0, -1):
        text = client.get(f"redlb:fleet:worker:{member.decode()}")
        if text is not None:
            out.append(json.loads(text))  # spliced JSON: must parse
    return out


def test_the_heartbeat_names_the_table_in_use_after_fast_changes_and_a_flushall(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """The table's part of the heartbeat is encoded once per table and spliced in: after
    tables replaced fast, and after FLUSHALL and new routes, it names the table in use."""
    client = redis_server.client()
    for n in range(8):
        client.rpush(f"p{n}", backends[n % 3].address)
    client.hset("redlb:routes", mapping={f"/r{n}": f"p{n}" for n in range(4)})
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()

    def named(pools: list[str], routes: int) -> bool:
        beats = _heartbeats(redis_server)
        return len(beats) == 2 and all(
            b["pools"] == pools and b["route_count"] == routes for b in beats
        )

    try:
        assert wait_for(lambda: named([f"p{n}" for n in range(4)], 4), 10)
        for n in range(4, 8):  # a table a few ms after the other
            client.hset("redlb:routes", f"/r{n}", f"p{n}")
            client.hdel("redlb:routes", f"/r{n - 4}")
            time.sleep(0.02)
        assert wait_for(lambda: named([f"p{n}" for n in range(4, 8)], 4), 10), _heartbeats(
            redis_server
        )
        client.flushall()
        for n in range(8):
            client.rpush(f"p{n}", backends[n % 3].address)
        client.hset("redlb:routes", mapping={"/a": "p1", "/b": "p2", "/c": "p2"})
        assert wait_for(lambda: named(["p1", "p2"], 3), 15), _heartbeats(redis_server)
        assert proxy.get("/c")[0] == 200
    finally:
        proxy.stop()


def test_every_access_log_line_is_written_in_order_when_stopped_right_after_a_flood(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """One flush timer at a time and 1,024-line batches: a flood (pipelined, more than a
    batch) then SIGTERM at once: every answered request has its line, in order."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, workdir=tmp_path / "p").start()
    count = 2500
    try:
        data = _answers([f"/n{i}" for i in range(count)], proxy.port, timeout=20)
        assert data.count(b"HTTP/1.1 200") == count
    finally:
        assert proxy.stop() == 0
    logged = [int(m) for m in re.findall(r"^GET /n(\d+) => 200", proxy.access_log(), re.M)]
    assert logged == list(range(count)), (len(logged), logged[:3], logged[-3:])


def test_routes_replaced_fast_leave_exactly_the_final_pools_followed(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """Tables replaced many times, fast, while the sweeper, the snapshot and the resync walk
    the pools in slices: the last table's pools are all followed (an edit of one reaches
    the proxy), and no removed pool stays in /metrics."""
    client = redis_server.client()
    for n in range(10):
        client.rpush(f"q{n}", backends[0].address)
    client.hset("redlb:routes", mapping={f"/q{n}": f"q{n}" for n in range(5)})
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()
    try:
        for step in range(40):  # routes to 3 pools of 10, another set every few ms
            client.delete("redlb:routes")
            client.hset(
                "redlb:routes",
                mapping={f"/q{(step + k * 3) % 10}": f"q{(step + k * 3) % 10}" for k in range(3)},
            )
            time.sleep(0.01 if step % 5 else 0.3)
        final = sorted(f"q{(39 + k * 3) % 10}" for k in range(3))  # q2, q5, q9

        def pools_in_metrics() -> list[str]:
            samples = scrape(proxy)
            return sorted(
                {dict(ls)["pool"] for (name, ls), _ in samples.items() if name == "redlb_pool_size"}
            )

        assert wait_for(lambda: pools_in_metrics() == final, 10), pools_in_metrics()
        for pool in final:
            client.rpush(pool, backends[1].address)  # followed: the edit reaches both workers

        def reaches_both(pool: str) -> bool:
            bodies = {proxy.get(f"/{pool}")[1] for _ in range(8)}
            return bodies == {b"ok b0\n", b"ok b1\n"}

        for pool in final:
            assert wait_for(lambda p=pool: reaches_both(p), 10), pool
        assert proxy.get("/q0")[0] == 404 or "q0" in final
    finally:
        proxy.stop()


def test_two_workers_sharing_a_piped_stdout_never_tear_a_line(redis_server: RedisProcess, tmp_path):
    """Both workers write their batches to the one stdout pipe (a log shipper reading it):
    a write larger than PIPE_BUF is not atomic, so a batch (up to 1,024 lines) written while
    the pipe was full was cut mid-line by the other worker's:
    ``GET /w2-aaaaaaaaGET /w5-aaaa... => 503``."""
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p")
    os.mkfifo(proxy.out_path)
    reader = os.open(proxy.out_path, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()
    done = threading.Event()

    def read() -> None:  # a reader slower than the workers: the pipe is often full
        while not done.is_set():
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(reader, 4096))
            time.sleep(0.0005)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        proxy.start()
        floods = [
            threading.Thread(target=_pipelined, args=(proxy.port, f"/w{i}-" + "a" * 40, 3000))
            for i in range(6)
        ]
        for flood in floods:
            flood.start()
        for flood in floods:
            flood.join(60)
        time.sleep(2)
    finally:
        done.set()
        thread.join()
        proxy.stop()
        os.close(reader)
    lines = bytes(got).split(b"\n")[:-1]
    line = rb"GET /w\d-a{40} => 503 Service Unavailable  - [\d.]+ms 0B"
    torn = [x for x in lines if not re.fullmatch(line, x)]
    assert len(lines) > 1000 and not torn, (len(lines), len(torn), torn[:2])


def test_two_workers_stopped_right_after_a_flood_log_every_request(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """SIGTERM to the supervisor right after each worker answered more than a batch: every
    answered request has its line (none left in a batch or a timer at the exit)."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()
    answered = []
    try:
        floods = [
            threading.Thread(
                target=lambda i=i: answered.append(_pipelined(proxy.port, f"/c{i}", 1500))
            )
            for i in range(4)
        ]
        for flood in floods:
            flood.start()
        for flood in floods:
            flood.join(60)
    finally:
        assert proxy.stop() == 0
    log = proxy.access_log()
    assert answered == [1500] * 4
    assert [log.count(f"GET /c{i} => 200") for i in range(4)] == [1500] * 4


def test_the_heartbeat_counts_requests_in_flight_over_pools_walked_in_slices(
    redis_server: RedisProcess, loop_thread, tmp_path
):
    """In flight counted a slice of pools a turn (60 pools: two slices), requests held at
    pools of both slices: the heartbeats' sum is every request held, then 0."""
    slow = CountingBackend(loop_thread, "slow", 4.0).start()
    client = redis_server.client()
    for n in range(60):
        client.rpush(f"s{n}", slow.address)
    client.hset("redlb:routes", mapping={f"/s{n}": f"s{n}" for n in range(60)})
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()

    def in_flight() -> int:
        return sum(int(b[2]) for beat in _heartbeats(redis_server) for b in beat["backends"])

    held = [
        threading.Thread(target=request, args=(proxy.port, "GET", f"/s{n}"))
        for n in (1, 30, 59, 59, 2, 45)
    ]
    try:
        for thread in held:
            thread.start()
        assert wait_for(lambda: slow.inflight == 6, 5)
        assert wait_for(lambda: in_flight() == 6, 3.5, interval=0.1), in_flight()
        for thread in held:
            thread.join(10)
        assert wait_for(lambda: in_flight() == 0, 5), in_flight()
    finally:
        proxy.stop()
        slow.stop()


def test_concurrent_scrapes_of_two_workers_never_see_a_counter_go_back(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """Scrapes at once, while both workers serve and write their files a step at a time:
    no scrape parses a torn file, and a scrape begun after another ended never sees less."""
    redis_server.cli("RPUSH", "servers", backends[0].address)
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()
    try:
        previous = 0.0
        for round_ in range(12):
            for _ in range(10):
                assert proxy.get("/")[0] == 200
            totals: list[float] = []

            def one() -> None:
                totals.append(metric_sum(scrape(proxy), "redlb_requests_total"))

            scrapers = [threading.Thread(target=one) for _ in range(3)]
            for thread in scrapers:
                thread.start()
            for thread in scrapers:
                thread.join(15)
            assert len(totals) == 3 and min(totals) >= previous, (round_, previous, totals)
            previous = max(totals)
        assert wait_for(lambda: metric_sum(scrape(proxy), "redlb_requests_total") == 120.0, 5)
    finally:
        proxy.stop()


def test_the_heartbeats_last_minute_sums_equal_the_requests_sent(
    redis_server: RedisProcess, backends: list[HttpBackend], tmp_path
):
    """The recorder's series summed a slice a turn, each round: the heartbeats' counts of
    the last minute, over both workers, are exactly the requests and 4xx/5xx sent."""
    redis_server.cli("RPUSH", "servers", backends[0].address, backends[1].address)
    proxy = Proxy(redis_server.url, "--workers", "2", workdir=tmp_path / "p").start()
    try:
        sent = [0, 0, 0]  # requests, 4xx, 5xx
        for i in range(90):
            path = ("/", "/status/404", "/status/503")[i % 3]
            status = proxy.get(path)[0]
            sent[0] += 1
            sent[1] += status // 100 == 4
            sent[2] += status // 100 == 5
            if i % 30 == 29:
                time.sleep(0.7)  # spread over rounds of the heartbeat

        def minute() -> list[int]:
            beats = _heartbeats(redis_server)
            return [sum(int(b[4][i]) for beat in beats for b in beat["backends"]) for i in range(3)]

        assert wait_for(lambda: minute() == sent, 5, interval=0.2), (minute(), sent)
    finally:
        proxy.stop()
