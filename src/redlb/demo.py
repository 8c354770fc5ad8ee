"""``redlb demo``: embedded Redis, three demo backends, the balancer, ten requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
from functools import partial
from pathlib import Path

import httptools
import redis
import uvloop

from redlb.config import Config
from redlb.proxy.context import ProxyContext
from redlb.server import _worker
from redlb.store.embedded import EmbeddedRedis, free_port, redis_server_binary
from redlb.store.keys import Keys
from redlb.store.rotation import Cursor


class DemoBackend(asyncio.Protocol):
    """A tiny keep-alive HTTP server that says who it is."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        body = f"Hello from {self.name}\n".encode()
        keep = self.parser.should_keep_alive()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%b\r\n%b"
            % (len(body), b"" if keep else b"Connection: close\r\n", body)
        )
        if not keep:
            self.transport.close()


async def _get(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.partition(b"\r\n\r\n")[2]


def run_demo(listen: str, state_dir: str, count: int, exit_after: bool) -> None:
    embedded = EmbeddedRedis(state_dir)
    url = embedded.start()
    try:
        uvloop.run(_demo(listen, url, count, exit_after, state_dir))
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()


async def _demo(listen: str, url: str, count: int, exit_after: bool, state_dir: str) -> None:
    loop = asyncio.get_running_loop()
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    with contextlib.closing(socket.socket()) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            probe.bind((host, port))
        except OSError:
            port = free_port(host)
            print(f"port {port_text} is busy; the demo balancer uses {port} instead", flush=True)
    servers = []
    addresses = []
    for n in range(1, 4):
        backend_port = free_port()
        address = f"127.0.0.1:{backend_port}"
        name = f"demo backend {n} ({address})"
        servers.append(
            await loop.create_server(partial(DemoBackend, name), "127.0.0.1", backend_port)
        )
        addresses.append(address)
    client = redis.Redis.from_url(url)
    pool = Keys("servers")
    client.delete(pool.pool, pool.counter)
    client.rpush(pool.pool, *addresses)
    client.close()
    redis_socket = url.removeprefix("unix://").partition("?")[0]
    # Name the commands as they can be typed here: the venv's, when not on PATH.
    beside_us = Path(sys.argv[0]).with_name("redis-cli")
    if not beside_us.exists():
        beside_us = Path(redis_server_binary()).with_name("redis-cli")
    cli = shutil.which("redis-cli") or os.path.relpath(beside_us)
    redlb = shutil.which("redlb") or os.path.relpath(sys.argv[0])
    config = Config(
        listen=f"{host}:{port}", redis_url=url, workers=1, status_listen=None,
        state_dir=".redlb/demo",
    )  # fmt: skip

    async def show(ctx: ProxyContext) -> None:
        for _ in range(250):
            if ctx.pools[config.pool].pool.healthy:
                break
            await asyncio.sleep(0.02)
        print(f"\nredlb listens on http://{host}:{port}/ ; sending {count} requests:\n", flush=True)
        for _ in range(count):
            await _get(host, port)
        await asyncio.sleep(0.2)  # let the batched access log flush first
        print(
            f"""
Each line above is one request, and the backends take turns.  Try next:
  curl http://{host}:{port}/
  {cli} -s {redis_socket} LRANGE servers 0 -1      # the pool, a plain Redis list
  {cli} -s {redis_socket} LREM servers 0 {addresses[0]}   # applied within a second
  {redlb} backend add {addresses[0]} --state-dir {state_dir}
Ctrl-C stops the demo.""",
            flush=True,
        )
        if exit_after:
            os.kill(os.getpid(), signal.SIGTERM)

    sys.stdout.flush()
    await _worker(config, url, Cursor(), on_listening=show)
    for server in servers:
        server.close()
