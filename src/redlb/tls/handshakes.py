"""Client connections of the TLS listener, and the handshakes that never became one.

A failed handshake (garbage instead of a ClientHello, plain HTTP, no common protocol or
cipher, a stall past the handshake timeout) never reaches the protocol: the loop drops it
without a callback.  Each accepted TLS connection therefore holds a Handshake, watched by a
weak reference, until the loop calls connection_made (the handshake is done); a Handshake
freed before that went with a connection the loop dropped: a failure.  Failures are counted
(``redlb_tls_handshake_failures_total``) and summed up in at most one log line a minute:
a scanner must not flood the log.

The connection is the plain ClientConnection, told of the handshake rather than subclassed:
compiled (mypyc), it cannot be subclassed by this pure module, and stays native over TLS.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

from redlb.proxy.context import ProxyContext
from redlb.proxy.downstream import ClientConnection

log = logging.getLogger("redlb.tls")

SUMMARY_INTERVAL = 60.0


class Handshake:
    """One handshake in progress; only its connection holds it (Handshakes.pending: weakly)."""

    __slots__ = ("__weakref__", "handshakes")

    def __init__(self, handshakes: Handshakes) -> None:
        self.handshakes = handshakes

    def done(self) -> None:
        self.handshakes.completed(self)


class Handshakes:
    """One worker's TLS handshakes in progress, and the failures not yet summed up."""

    def __init__(self, ctx: ProxyContext, speaks: bool = True) -> None:
        self.ctx = ctx
        self.pending: dict[int, weakref.ref[Handshake]] = {}
        self.unreported = 0
        self.last_summary = 0.0
        self.level = logging.WARNING if speaks else logging.DEBUG

    def accept(self) -> ClientConnection:
        """The listener's protocol factory: called as the TCP connection is accepted."""
        handshake = Handshake(self)
        key = id(handshake)
        self.pending[key] = weakref.ref(handshake, lambda _ref: self._failed(key))
        return ClientConnection(self.ctx, b"https", handshake.done)

    def completed(self, handshake: Handshake) -> None:
        # Dropping the reference drops its callback with it.
        self.pending.pop(id(handshake), None)

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
