"""Sticky sessions: a signed, opaque cookie naming a backend, honoured by every instance.

The cookie value is ``HMAC-SHA256(secret, pool NUL backend)``, truncated to 128 bits and
base64url-encoded.  It reveals nothing about the backend, and nobody without the secret
(kept in Redis, store/sticky.py) can make the value of a backend they were never sent to.
Any instance maps a value back by computing the values of the healthy snapshot; a value
naming a backend that is gone, drained or ejected maps to nothing, and the pool's strategy
picks (and a new cookie is set).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from redlb.address import Backend


class StickyCookie:
    __slots__ = ("by_value", "name", "pool", "secret", "seen", "set_cookie_lines")

    def __init__(self, name: str, secret: bytes, pool: str) -> None:
        self.name = name.encode()
        self.secret = secret
        self.pool = pool.encode()
        self.seen: tuple[Backend, ...] | None = None
        self.by_value: dict[bytes, Backend] = {}
        self.set_cookie_lines: dict[str, bytes] = {}

    def value(self, backend: Backend) -> bytes:
        mac = hmac.new(self.secret, self.pool + b"\0" + backend.label, hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:16]).rstrip(b"=")

    def find(self, value: bytes, candidates: tuple[Backend, ...]) -> Backend | None:
        """The healthy backend this cookie value names, if any."""
        if candidates is not self.seen:
            self.by_value = {self.value(b): b for b in candidates}
            self.seen = candidates
        return self.by_value.get(value)

    def set_cookie(self, backend: Backend) -> bytes:
        """The response header line that sends later requests back to ``backend``."""
        line = self.set_cookie_lines.get(backend.key)
        if line is None:
            line = b"Set-Cookie: %b=%b; Path=/; HttpOnly; SameSite=Lax\r\n" % (
                self.name,
                self.value(backend),
            )
            self.set_cookie_lines[backend.key] = line
        return line
