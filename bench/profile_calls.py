"""Python calls per proxied keep-alive request, by function: the profile that guides the hot path.

A real `redlb serve` (one worker) runs under cProfile in a child process, with every feature of
the data path on: routing through the 10,000-route table of bench/run.py (Host
host77.example.com), per-route/backend metrics, the access log (to a file), the status
listener.  Backends are nginx (as in bench/run.py), Redis a real redis-server.  The client
warms up its keep-alive connections first, then the profiler is switched on (SIGUSR1), exactly
N requests are sent, and it is switched off (SIGUSR1 again): connection set-up is not counted,
what the worker does by the second (sweeper, fleet publisher, resyncs) is measured in an idle
window first and subtracted for as long as the requests took; what it does per so many
requests (lease refills, access-log flushes) stays, amortised as in production.

cProfile counts every Python function entered and every C function called from Python code.
Code compiled by mypyc is invisible to it (its calls are C calls), so on a compiled install
the table shows what is left in Python; REDLB_PURE=1 profiles the pure package.

    .venv/bin/python bench/profile_calls.py                  # full data path, 20,000 requests
    .venv/bin/python bench/profile_calls.py --single-pool    # no routes: the seed's one pool
    PROFILE_REQUESTS=5000 PROFILE_TOP=60 .venv/bin/python bench/profile_calls.py --json out.json
    .venv/bin/python bench/profile_calls.py --single-pool -- --strategy hash  # more serve flags
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the same backends and route table as make bench

REQUESTS = int(os.environ.get("PROFILE_REQUESTS", "20000"))
CONNECTIONS = int(os.environ.get("PROFILE_CONNECTIONS", "50"))
TOP = int(os.environ.get("PROFILE_TOP", "40"))
WARMUP_PER_CONNECTION = 20
IDLE_SECONDS = float(os.environ.get("PROFILE_IDLE_SECONDS", "3"))
# The resync (1 s by default) re-reads digests of the 1,000 pools: work by the second, not by
# the request, and bursty enough to blur the subtraction below; slowed down here (the idle
# window still measures the background, which is printed on its own).
RESYNC = os.environ.get("PROFILE_RESYNC_INTERVAL", "30")


# The child: redlb serve, its main thread profiled between two SIGUSR1.


def child(out: str, args: list[str]) -> None:
    import cProfile

    from redlb.cli import main

    profiler = cProfile.Profile()
    windows = 0

    def toggle(_signum: int, _frame: object) -> None:
        nonlocal profiler, windows
        if not windows % 2:
            profiler = cProfile.Profile()
            profiler.enable()
        else:
            profiler.disable()
            profiler.dump_stats(out + ".tmp")
            os.replace(out + ".tmp", f"{out}.{windows // 2}")
        windows += 1

    signal.signal(signal.SIGUSR1, toggle)
    main(["serve", *args], prog_name="redlb")


# The client: keep-alive connections, one request at a time on each (as wrk does).


async def drive(
    port: int, host: str, path: str, proxy: subprocess.Popen[bytes], out: Path
) -> tuple[int, float, float]:
    """Profile an idle window, then N requests; return (N, idle seconds, busy seconds)."""
    per_connection = max(REQUESTS // CONNECTIONS, 1)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: profile\r\n\r\n".encode()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]

    async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                await reader.readexactly(int(line[15:]))

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(n):
            await one_request(reader, writer)

    # Warm-up: every connection accepted, backend connections pooled, leases taken.
    await asyncio.gather(*(loop(r, w, WARMUP_PER_CONNECTION) for r, w in conns))
    await asyncio.sleep(0.5)
    # Window 0, no traffic: what the background (resyncs, sweeper, publisher) calls a second.
    began = time.monotonic()
    proxy.send_signal(signal.SIGUSR1)
    await asyncio.sleep(IDLE_SECONDS)
    proxy.send_signal(signal.SIGUSR1)
    idle = time.monotonic() - began
    await _until(Path(f"{out}.0").exists)
    # Window 1: the measured requests.
    began = time.monotonic()
    proxy.send_signal(signal.SIGUSR1)
    await asyncio.gather(*(loop(r, w, per_connection) for r, w in conns))
    proxy.send_signal(signal.SIGUSR1)
    busy = time.monotonic() - began
    await _until(Path(f"{out}.1").exists)
    for _, w in conns:
        w.close()
    return per_connection * CONNECTIONS, idle, busy


async def _until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("the profiled proxy did not answer the signal")
        await asyncio.sleep(0.02)


# Reporting


def where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name  # a C function: "<method 'write' of 'uvloop...' objects>" and the like
    parts = Path(file).parts
    short = "/".join(parts[parts.index("redlb") :]) if "redlb" in parts else "/".join(parts[-2:])
    return f"{short}:{line} {name}"


def _calls(stats_file: Path) -> dict[tuple[str, int, str], int]:
    import pstats

    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    return {key: ncalls for key, (_, ncalls, _, _, _) in stats.items()}


def report(out: Path, requests: int, idle: float, busy: float, top: int) -> dict[str, object]:
    """Calls per request: the busy window's calls minus the background's for as long."""
    background = _calls(Path(f"{out}.0"))
    measured = _calls(Path(f"{out}.1"))
    scale = busy / idle
    rows = []
    totals = {"py": 0.0, "C": 0.0, "redlb": 0.0}
    for key in measured.keys() | background.keys():
        net = (measured.get(key, 0) - background.get(key, 0) * scale) / requests
        kind = "C" if key[0] == "~" else "py"
        totals[kind] += net
        if "/redlb/" in key[0]:
            totals["redlb"] += net
        rows.append((net, kind, where(key)))
    rows.sort(key=lambda r: -r[0])
    per_second = sum(background.values()) / idle
    print(f"\n{requests:,} requests in {busy:.1f} s (profiled); background {per_second:,.0f} "
          f"calls/s over {idle:.1f} s idle, subtracted for {busy:.1f} s")  # fmt: skip
    print("calls per request (cProfile, deterministic):")
    print(f"  Python functions: {totals['py']:7.1f}   (redlb's own: {totals['redlb']:.1f})")
    print(f"  C functions:      {totals['C']:7.1f}")
    print(f"  total:            {totals['py'] + totals['C']:7.1f}\n")
    print("| calls/req | kind | function |")
    print("|---:|---|---|")
    for net, kind, name in rows[:top]:
        if net < 0.05:
            break
        print(f"| {net:.2f} | {kind} | {name} |")
    return {
        "requests": requests,
        "busy_seconds": busy,
        "background_calls_per_second": per_second,
        "python_calls_per_request": totals["py"],
        "redlb_calls_per_request": totals["redlb"],
        "c_calls_per_request": totals["C"],
        "functions": [
            {"calls_per_request": round(net, 3), "kind": kind, "function": name}
            for net, kind, name in rows
            if net >= 0.005
        ],
    }


def compiled_state() -> str:
    try:
        from redlb import build

        return build.describe()  # type: ignore[no-any-return]
    except ImportError:
        return "pure (no build info)"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    ours, serve_extra = sys.argv, []
    if "--" in sys.argv:  # what follows goes to `redlb serve` as it is
        ours, serve_extra = sys.argv[: sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :]
    single = "--single-pool" in ours
    json_out = ours[ours.index("--json") + 1] if "--json" in ours else None
    tmp = Path(tempfile.mkdtemp(prefix="redlb-profile-"))
    tmp.chmod(0o755)  # nginx workers read the response files from here
    backend_ports = [bench.free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    from redlb.store.embedded import redis_server_binary

    try:
        conf = bench.backends_conf(tmp, backend_ports)
        procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-e", str(tmp / "b.err")]))
        redis_port = bench.free_port()
        procs.append(
            subprocess.Popen(
                [redis_server_binary(), "--port", str(redis_port), "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        for p in [*backend_ports, redis_port]:
            bench.wait_port(p)
        members = [f"127.0.0.1:{p}" for p in backend_ports]
        db = redis.Redis(port=redis_port, db=0 if single else 1)
        if single:
            db.rpush("servers", *members)
            host = "localhost"
        else:
            pipe = db.pipeline(transaction=False)
            for p in range(bench.ROUTE_POOLS):
                pipe.rpush(f"pool{p}", *members)
            pipe.hset("redlb:routes", mapping=bench._routes(0))
            pipe.execute()
            host = bench.ROUTED_HOST
        port, status = bench.free_port(), bench.free_port()
        out = tmp / "calls.prof"
        log = (tmp / "access.log").open("wb")
        args = ["--listen", f"127.0.0.1:{port}", "--status-listen", f"127.0.0.1:{status}",
                "--redis", f"redis://127.0.0.1:{redis_port}/{0 if single else 1}",
                "--workers", "1", "--resync-interval", RESYNC, *serve_extra]  # fmt: skip
        proxy = subprocess.Popen(
            [sys.executable, __file__, "--child", str(out), *args], stdout=log,
            stderr=subprocess.DEVNULL, cwd=tmp,
        )  # fmt: skip
        procs.append(proxy)
        bench.wait_port(port, 30)
        time.sleep(1.0)  # the routing table is loaded before the listener opens; settle
        requests, idle, busy = asyncio.run(drive(port, host, "/ok", proxy, out))
        log.close()
        lines = (tmp / "access.log").read_bytes().count(b"\n")
        print(f"redlb: {compiled_state()}; {'one pool' if single else '10,000 routes'}, "
              f"metrics on, access log on ({lines:,} lines written) {' '.join(serve_extra)}")  # fmt: skip
        result = report(out, requests, idle, busy, TOP)
        result["build"] = compiled_state()
        result["scenario"] = "one pool" if single else "10,000 routes"
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
