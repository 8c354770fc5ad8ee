"""Instructions per proxied request (valgrind's callgrind): a deterministic measure of the CPU
the proxy spends in user space, for deciding on the hot path on a busy machine.

A real `redlb serve` (one worker) runs under callgrind with instrumentation off; the client
warms up keep-alive connections, then instrumentation is switched on for an idle window (the
background: sweeper, publisher, resyncs), then for exactly N requests (50 connections, one
request at a time on each, as wrk does).  Everything of bench/profile_calls.py is on (10,000
routes, metrics, access log to a file).  Instructions per request = (busy - idle scaled to
the busy window's length) / N, counting only inside uvloop's protocol callbacks (what
data_received and connection_made run: redlb's request path, httptools, the writes' user
side); the loop's own polling and reading, and timers, are left out.  Kernel time is not
counted (see bench/syscalls.py for it).

    .venv/bin/python bench/instructions.py            # REDLB_PURE=1 for the pure package
    INSTR_REQUESTS=2000 INSTR_FUNCTIONS=30 .venv/bin/python bench/instructions.py
    .venv/bin/python bench/instructions.py --single-pool -- --strategy peak_ewma  # serve flags

``--single-pool``: no routes, the seed's one pool (the strategy table's scenario: a
``--strategy`` applies to that default pool; the routed pools keep their own settings).
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_calls
import run as bench

REQUESTS = int(os.environ.get("INSTR_REQUESTS", "2000"))
CONNECTIONS = 50
FUNCTIONS = int(os.environ.get("INSTR_FUNCTIONS", "0"))


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_ir(path: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def trigger(path: str) -> str:
    """The dump's name (``busy``, ``idle``) from its header: a search of the file's start
    also found "idle" in function names (take_idle) and counted a busy dump as idle."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("desc: Trigger:"):
            return line.split()[-1]  # "desc: Trigger: dump busy"
        if line.startswith("fn="):
            break
    return ""


async def drive(port: int, pid: int, host: str) -> tuple[float, float]:
    per_connection = max(REQUESTS // CONNECTIONS, 1)
    request = f"GET /ok HTTP/1.1\r\nHost: {host}\r\nUser-Agent: instr\r\n\r\n".encode()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(n):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            length = re.search(rb"(?i)content-length: (\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)

    await asyncio.gather(*(loop(r, w, 5) for r, w in conns))
    await asyncio.sleep(1.0)
    # The measured requests first, then as long a window without traffic (the background).
    began = time.monotonic()
    control(pid, "-i", "on")
    await asyncio.gather(*(loop(r, w, per_connection) for r, w in conns))
    control(pid, "--dump=busy")
    busy = time.monotonic() - began
    began = time.monotonic()
    await asyncio.sleep(busy)
    control(pid, "--dump=idle")
    idle = time.monotonic() - began
    control(pid, "-i", "off")
    for _, w in conns:
        w.close()
    return busy, idle


def main() -> None:
    from redlb.store.embedded import redis_server_binary

    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind (apt-get install valgrind)")
    ours, serve_extra = sys.argv, []
    if "--" in sys.argv:  # what follows goes to `redlb serve` as it is
        ours, serve_extra = sys.argv[: sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :]
    single = "--single-pool" in ours
    tmp = Path(tempfile.mkdtemp(prefix="redlb-instr-"))
    tmp.chmod(0o755)
    ports = [bench.free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        conf = bench.backends_conf(tmp, ports)
        procs.append(subprocess.Popen(["nginx", "-c", str(conf), "-e", str(tmp / "b.err")]))
        redis_port = bench.free_port()
        procs.append(subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--save",
                                       "", "--appendonly", "no"], stdout=subprocess.DEVNULL))  # fmt: skip
        for p in [*ports, redis_port]:
            bench.wait_port(p)
        if single:
            with redis.Redis(port=redis_port) as db:
                db.rpush("servers", *(f"127.0.0.1:{p}" for p in ports))
        else:
            bench.seed_routes(redis_port, ports).close()
        port, status = bench.free_port(), bench.free_port()
        out = str(tmp / "callgrind.out")
        log = (tmp / "access.log").open("wb")
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             # Only what the protocol callbacks do (data_received and what it calls): the
             # per-second background tasks run elsewhere, the loop's own I/O too.
             "--toggle-collect=__pyx_f_6uvloop_4loop_run_in_context1",
             sys.executable, "-m", "redlb", "serve", "--listen", f"127.0.0.1:{port}",
             "--status-listen", f"127.0.0.1:{status}", "--workers", "1",
             "--redis", f"redis://127.0.0.1:{redis_port}/{0 if single else 1}",
             "--resync-interval", "30", *serve_extra],
            stdout=log, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(proxy)
        bench.wait_port(port, 300)
        bench.wait_routed(port, 300)  # one pool: answers any Host
        host = "localhost" if single else bench.ROUTED_HOST
        busy, idle = asyncio.run(drive(port, proxy.pid, host))
        time.sleep(0.5)
        files = sorted(glob.glob(out + "*"))
        busy_ir = sum(total_ir(f) for f in files if trigger(f) == "busy")
        idle_ir = sum(total_ir(f) for f in files if trigger(f) == "idle")
        n = max(REQUESTS // CONNECTIONS, 1) * CONNECTIONS
        per_request = (busy_ir - idle_ir * busy / idle) / n
        print(f"redlb: {profile_calls.compiled_state()}; {'one pool' if single else '10,000 routes'}"
              f" {' '.join(serve_extra)}; {n:,} requests; busy {busy_ir:,} Ir in "
              f"{busy:.1f} s, idle {idle_ir:,} Ir in {idle:.1f} s")  # fmt: skip
        print(f"instructions per request (user space, callgrind): {per_request:,.0f}")
        if FUNCTIONS:
            busy_file = next(f for f in files if trigger(f) == "busy")
            report = subprocess.run(["callgrind_annotate", "--inclusive=no", busy_file],
                                    capture_output=True, text=True).stdout  # fmt: skip
            print("\n".join(report.splitlines()[: FUNCTIONS + 25]))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
