"""Client connections of the TLS listener, and the handshakes that never became one.

A failed handshake (garbage instead of a ClientHello, plain HTTP, no common protocol or
cipher, a stall past the handshake timeout) never reaches the protocol: the loop drops it
without a callback.  Each accepted TLS connection is therefore watched by a weak reference
until its handshake completes; one that is freed before that failed.  Failures are counted
(``redlb_tls_handshake_failures_total``) and summed up in at most one log line a minute:
a scanner must not flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from typing import Any

from redlb.proxy.context import ProxyContext
from redlb.proxy.downstream import ClientConnection

log = logging.getLogger("redlb.tls")

SUMMARY_INTERVAL = 60.0


class TlsClientConnection(ClientConnection):
    # Weak references (Handshakes.pending): a compiled ClientConnection has the slot already,
    # and a class may not declare it twice.
    __slots__ = ("handshakes",) + (
        () if hasattr(ClientConnection, "__weakref__") else ("__weakref__",)
    )

    def __init__(self, ctx: ProxyContext, handshakes: Handshakes) -> None:
        super().__init__(ctx, b"https")
        self.handshakes = handshakes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handshakes.completed(self)  # the loop calls this once the handshake is done
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        # The client's close_notify.  The loop's SSL layer shuts the connection down after
        # it whatever this returns (no half-close over TLS, as with nginx), and logs a
        # warning for every True: a line per connection that a client could repeat at will.
        return None


class Handshakes:
    """One worker's TLS handshakes in progress, and the failures not yet summed up."""

    def __init__(self, ctx: ProxyContext, speaks: bool = True) -> None:
        self.ctx = ctx
        self.pending: dict[int, weakref.ref[TlsClientConnection]] = {}
        self.unreported = 0
        self.last_summary = 0.0
        self.level = logging.WARNING if speaks else logging.DEBUG

    def accept(self) -> TlsClientConnection:
        """The listener's protocol factory: called as the TCP connection is accepted."""
        connection = TlsClientConnection(self.ctx, self)
        key = id(connection)
        self.pending[key] = weakref.ref(connection, lambda _ref: self._failed(key))
        return connection

    def completed(self, connection: TlsClientConnection) -> None:
        # Dropping the reference drops its callback with it.
        self.pending.pop(id(connection), None)

    def _failed(self, key: int) -> None:
        self.pending.pop(key, None)
        self.ctx.stats.tls_handshake_failures += 1
        self.unreported += 1

    def summarise(self, now: float) -> None:
        """From the sweeper: one line for every failure since the last line, at most a minute."""
        if self.unreported and now - self.last_summary >= SUMMARY_INTERVAL:
            log.log(
                self.level,
                "%d TLS handshake(s) failed since the last such line (no TLS, no common "
                "protocol or cipher, or stalled; at most one line a minute, every failure is "
                "in redlb_tls_handshake_failures_total)",
                self.unreported,
            )
            self.unreported = 0
            self.last_summary = now


def quiet_undecodable_server_names() -> None:
    """CPython cannot decode a non-ASCII SNI; it fails the handshake (counted like any other)
    and reports the error as "unraisable": a traceback on stderr per handshake, which a
    client could use to flood the log.  Only that report is dropped."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(
            unraisable.object, bytes
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook
