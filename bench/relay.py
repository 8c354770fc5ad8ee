"""The floor under any uvloop proxy: bytes relayed, no HTTP at all.

Each client connection gets its own backend connection (round-robin at connect time) and
bytes are copied both ways unparsed.  What redlb spends above this is its HTTP work.

    .venv/bin/python bench/relay.py PORT BACKEND_PORT[,BACKEND_PORT...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop


class Relay(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Relay | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(port: int, backends: list[int]) -> None:
    loop = asyncio.get_running_loop()
    rotation = itertools.cycle(backends)
    pending: set[asyncio.Task[None]] = set()

    async def attach(client: Relay) -> None:
        upstream = Relay()
        upstream.peer = client
        await loop.create_connection(lambda: upstream, "127.0.0.1", next(rotation))
        client.peer = upstream
        for data in client.early:
            client.data_received(data)
        client.early = []

    def accept() -> Relay:
        client = Relay()
        task = loop.create_task(attach(client))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return client

    await loop.create_server(accept, "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")]))
