"""Memory of one redlb worker holding 10,000 idle keep-alive client connections.

Each connection sends one request, reads the answer and then stays open and idle; the
worker's RSS is read before and after.  Run by `make bench` after the throughput table.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
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


async def main() -> dict[str, float]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis_port, backend_port, port = free_port(), free_port(), free_port()
    server = await asyncio.start_server(backend, "127.0.0.1", backend_port)
    redis_proc = subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--save", ""],
                                  stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.3)
    client = redis.Redis(port=redis_port)
    client.delete("servers")
    client.rpush("servers", f"127.0.0.1:{backend_port}")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "redlb", "serve", "--listen", f"127.0.0.1:{port}", "--redis",
         f"redis://127.0.0.1:{redis_port}", "--workers", "1", "--status-listen", "off",
         "--keepalive-timeout", "300", "--no-access-log"],
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
        before = psutil.Process(proxy.pid).memory_info().rss
        held = await hold(port)
        await asyncio.sleep(3)  # idle: past redlb's 1 s parser hibernation
        after = psutil.Process(proxy.pid).memory_info().rss
        for _, writer in held:
            writer.close()
    finally:
        proxy.terminate()
        proxy.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
        server.close()
    return {"connections": CONNECTIONS, "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
            "per_connection_kb": (after - before) / CONNECTIONS / 1024}  # fmt: skip


if __name__ == "__main__":
    result = asyncio.run(main())
    print(
        f"\n## Memory: one worker holding {result['connections']:,} idle keep-alive connections\n"
        f"RSS {result['rss_before_mb']:.1f} MB before, {result['rss_after_mb']:.1f} MB after "
        f"({result['per_connection_kb']:.2f} KB per connection)"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "idle_memory.json").write_text(json.dumps(result, indent=2))
