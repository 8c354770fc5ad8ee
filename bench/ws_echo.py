"""WebSocket echo throughput: 1 KB messages per second through redlb vs through nginx.

The proxy under test runs alone on CPU 0; the echo backend and the client share CPU 1 and are
kept cheap so that the proxy is what is measured: both are raw uvloop protocols.  The backend
answers a real opening handshake (101 with the right Sec-WebSocket-Accept: redlb checks it),
then echoes bytes as they come.  The client opens CONNECTIONS tunnels and keeps WINDOW masked
1 KB binary frames in flight on each; a message counts when its echo is back.  (The echo
sends the client's masked frames back as they are: no WebSocket client would accept that, but
both proxies relay tunnel bytes without reading them.)

    BENCH_ONLY=websocket .venv/bin/python bench/run.py        # this scenario alone
    python bench/ws_echo.py backend PORT                       # the pieces, by hand
    python bench/ws_echo.py client PORT SECONDS CONNECTIONS
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MESSAGE = 1024
WINDOW = 16
CONNECTIONS = 50
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
# A masked binary frame of 1 KB (mask key zero: the payload stays as is).
FRAME = bytes([0x82, 0x80 | 126]) + MESSAGE.to_bytes(2, "big") + b"\0\0\0\0" + b"w" * MESSAGE


class EchoBackend(asyncio.Protocol):
    def __init__(self) -> None:
        self.head = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            self.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head, _, rest = self.head.partition(b"\r\n\r\n")
        self.head = None  # type: ignore[assignment]
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %b\r\n\r\n%b" % (accept, rest)
        )


class Client(asyncio.Protocol):
    """One tunnel: WINDOW frames in flight, one more sent for each echo back."""

    def __init__(self, counts: list[int], opened: asyncio.Future[None]) -> None:
        self.counts = counts
        self.opened = opened
        self.head = b""
        self.pending = 0  # echoed bytes short of a whole message
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %b\r\n\r\n" % KEY
        )

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.head = None  # type: ignore[assignment]
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(head.decode(errors="replace")))
                return
            self.opened.set_result(None)
            self.transport.write(FRAME * WINDOW)
        self.pending += len(data)
        done, self.pending = divmod(self.pending, len(FRAME))
        if done:
            self.counts[0] += done
            self.transport.write(FRAME * done)


async def _client(port: int, seconds: float, connections: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    counts = [0]
    transports = []
    for _ in range(connections):
        opened: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda opened=opened: Client(counts, opened), "127.0.0.1", port
        )
        transports.append(transport)
        await asyncio.wait_for(opened, 10)
    await asyncio.sleep(1.0)  # warm-up
    start, began = counts[0], time.monotonic()
    await asyncio.sleep(seconds)
    messages, elapsed = counts[0] - start, time.monotonic() - began
    for transport in transports:
        transport.close()
    return {"messages": messages, "seconds": elapsed, "msgs_per_s": messages / elapsed}


def scenario(
    tmp: Path,
    redis_client: Any,
    redlb: Callable[..., Callable[[int], subprocess.Popen]],
    seconds: int,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Both proxies in interleaved rounds; medians of messages/s and CPU per message."""
    from run import LOAD_CPU, PROXY_CPU, _nginx_conf, cpu_seconds, free_port, pinned, wait_port

    backend_port = free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    backend = pinned(LOAD_CPU, [*me, "backend", str(backend_port)])
    wait_port(backend_port)
    redis_client.delete("wsbench")
    redis_client.rpush("wsbench", f"127.0.0.1:{backend_port}")

    def nginx(port: int) -> subprocess.Popen:
        conf = _nginx_conf(
            tmp, "wsproxy",
            f"""http {{ access_log off;
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://127.0.0.1:{backend_port}; proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade";
      proxy_set_header Host $host; proxy_read_timeout 3600s; }} }} }}""",
        )  # fmt: skip
        return pinned(PROXY_CPU, ["nginx", "-c", str(conf), "-e", str(tmp / "wsp.err")])

    starts = {"nginx": nginx, "redlb": redlb("--pool", "wsbench", "--no-access-log")}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in starts}
    try:
        for r in range(rounds):
            for name, start in starts.items():
                port = free_port()
                proc = start(port)
                try:
                    wait_port(port)
                    time.sleep(0.5)
                    user0, sys0 = cpu_seconds(proc.pid)
                    out = subprocess.run(
                        ["taskset", "-c", LOAD_CPU, *me, "client", str(port), str(seconds),
                         str(CONNECTIONS)],
                        capture_output=True, text=True, timeout=seconds + 60, check=True,
                    ).stdout  # fmt: skip
                    user1, sys1 = cpu_seconds(proc.pid)
                    result = json.loads(out)
                    # CPU over the warm-up too: an upper bound, the same for both proxies.
                    cpu = user1 - user0 + sys1 - sys0
                    result["cpu_us_per_msg"] = cpu * 1e6 / max(result["messages"], 1)
                    runs[name].append(result)
                finally:
                    proc.terminate()
                    proc.wait(15)
            print(f"  websocket echo: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        backend.terminate()
        backend.wait(10)
    rows = {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in runs.items()
    }
    print(f"\nWebSocket echo, {CONNECTIONS} tunnels x {WINDOW} x 1 KB in flight")
    print(f"{'proxy':<10}{'msgs/s':>12}{'CPU us/msg':>12}")
    for name, row in rows.items():
        print(f"{name:<10}{row['msgs_per_s']:>12.0f}{row['cpu_us_per_msg']:>12.1f}")
    ratio = rows["redlb"]["msgs_per_s"] / max(rows["nginx"]["msgs_per_s"], 1)
    print(f"redlb / nginx messages/s: {ratio:.2f} (goal >= 0.5)")
    rows["ratio"] = {"msgs_per_s": ratio}
    return rows


def main() -> None:
    import uvloop

    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "backend":

        async def serve() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(EchoBackend, "127.0.0.1", port, backlog=1024)
            await server.serve_forever()

        uvloop.run(serve())
    else:
        seconds, connections = float(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(uvloop.run(_client(port, seconds, connections))))


if __name__ == "__main__":
    main()
