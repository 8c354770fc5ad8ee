"""Memory of one redlb worker holding 10,000 idle keep-alive client connections.

Each connection sends one request, reads the answer and then stays open and idle; the
worker's RSS is read before and after, with /proc's breakdown: anonymous memory (the
worker's own objects) and file-backed pages (the mapped code of Python, its extensions and
libcrypto: shared with every other process mapping the same files, counted in RSS anyway).
Run by `make bench` after the throughput table, as the goal states it (issue 14): the access
log and the status listener off.  ``--defaults`` measures a worker as `redlb serve` starts
one without those flags (access log on, status listener on and scraped once before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import redis

from redlb.store.embedded import redis_server_binary

CONNECTIONS = 10_000
BATCH = 100  # connections opened (and requests in flight) at a time
RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()


async def hold(port: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    held = []
    for _ in range(0, CONNECTIONS, BATCH):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(BATCH))
        )
        for _, writer in batch:
            writer.write(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
        for reader, _ in batch:
            await reader.readuntil(b"ok\n")
        held.extend(batch)
    return held


def memory(pid: int) -> dict[str, float]:
    """RSS and its parts in MB (/proc/PID/smaps_rollup): anonymous, file-backed."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            value = rest.split()
            if len(value) == 2 and value[1] == "kB":
                fields[name] = int(value[0]) / 1024
    return {"rss": psutil.Process(pid).memory_info().rss / 2**20,
            "anonymous": fields["Anonymous"], "file_backed": fields["Rss"] - fields["Anonymous"],
            "private_dirty": fields["Private_Dirty"]}  # fmt: skip


async def main(defaults: bool) -> dict[str, object]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis_port, backend_port, port, status_port = free_port(), free_port(), free_port(), free_port()
    server = await asyncio.start_server(backend, "127.0.0.1", backend_port)
    redis_proc = subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--save", ""],
                                  stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.3)
    client = redis.Redis(port=redis_port)
    client.delete("servers")
    client.rpush("servers", f"127.0.0.1:{backend_port}")
    if defaults:
        flags = ["--status-listen", f"127.0.0.1:{status_port}"]
    else:
        flags = ["--status-listen", "off", "--no-access-log"]
    proxy = subprocess.Popen(
        [sys.executable, "-m", "redlb", "serve", "--listen", f"127.0.0.1:{port}", "--redis",
         f"redis://127.0.0.1:{redis_port}", "--workers", "1", "--keepalive-timeout", "300",
         *flags],
        stdout=subprocess.DEVNULL,  # the access log, with --defaults
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        await asyncio.sleep(0.5)
        if defaults:  # a worker whose status listener is on is scraped
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=10):
                pass
        before = memory(proxy.pid)
        held = await hold(port)
        await asyncio.sleep(3)  # idle: past the sweeps that drop an idle connection's parser
        after = memory(proxy.pid)
        for _, writer in held:
            writer.close()
    finally:
        proxy.terminate()
        try:
            proxy.wait(40)  # --drain-timeout is 30 s
        except subprocess.TimeoutExpired:  # measured already: say it, and leave nothing behind
            print("redlb did not stop within 40 s of SIGTERM: killed", file=sys.stderr)
            proxy.kill()
            proxy.wait()
        redis_proc.terminate()
        redis_proc.wait(10)
        server.close()
    return {"connections": CONNECTIONS, "rss_before_mb": before["rss"],
            "rss_after_mb": after["rss"],
            "per_connection_kb": (after["rss"] - before["rss"]) * 1024 / CONNECTIONS,
            "access_log_and_status": defaults, "before_mb": before, "after_mb": after}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defaults", action="store_true",
                        help="access log and status listener on (scraped once)")  # fmt: skip
    defaults = parser.parse_args().defaults
    result = asyncio.run(main(defaults))
    before, after = result["before_mb"], result["after_mb"]
    print(
        f"\n## Memory: one worker holding {result['connections']:,} idle keep-alive connections"
        f"{' (access log and status listener on)' if defaults else ''}\n"
        f"RSS {result['rss_before_mb']:.1f} MB before, {result['rss_after_mb']:.1f} MB after "
        f"({result['per_connection_kb']:.2f} KB per connection)\n"
        f"anonymous {before['anonymous']:.1f} -> {after['anonymous']:.1f} MB, "
        f"file-backed {before['file_backed']:.1f} -> {after['file_backed']:.1f} MB"
    )
    RESULTS.mkdir(exist_ok=True)
    name = "idle_memory_defaults.json" if defaults else "idle_memory.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
