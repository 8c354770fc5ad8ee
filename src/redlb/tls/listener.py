"""The TLS listener of one worker: its server, certificate watcher and handshake accounting.

The handshake is bounded by ``--header-timeout`` (the loop's ``ssl_handshake_timeout``);
once it is done, the connection is a ClientConnection like any other, whose header deadline
starts then: a client that completes the handshake and sends nothing is closed by it too.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from dataclasses import dataclass

from redlb.address import parse_listen
from redlb.proxy.context import ProxyContext
from redlb.tls.handshakes import Handshakes, quiet_undecodable_server_names
from redlb.tls.reload import CertificateWatcher
from redlb.tls.store import CertificateStore

# How long a closing connection waits for the client's close_notify before the socket goes.
SHUTDOWN_TIMEOUT = 5.0


@dataclass(slots=True)
class TlsSetup:
    """What the supervisor prepares once for every worker: the socket and the certificates."""

    sock: socket.socket
    store: CertificateStore


class TlsListener:
    def __init__(self, ctx: ProxyContext, store: CertificateStore, worker: int) -> None:
        self.ctx = ctx
        self.store = store
        self.watcher = CertificateWatcher(store, speaks=worker == 0)
        self.handshakes = Handshakes(ctx, speaks=worker == 0)
        self.server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        config = self.ctx.config
        loop = asyncio.get_running_loop()
        self.watcher.catch_up()  # a restarted worker: not the certificates of startup
        self.server = await loop.create_server(
            self.handshakes.accept,
            sock=sock,
            backlog=4096,
            ssl=self.store.listener_context,
            ssl_handshake_timeout=config.header_timeout,
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        loop.add_signal_handler(signal.SIGHUP, self.watcher.reload_all)
        quiet_undecodable_server_names()

    def tick(self, now: float) -> None:
        """From the worker's sweeper."""
        self.watcher.check()
        self.handshakes.summarise(now)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def https_port(tls_listen: str) -> int:
    return parse_listen(tls_listen)[1]
