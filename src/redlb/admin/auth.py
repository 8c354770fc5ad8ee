"""Who may use the admin API.

Rules:
1. With a token (``--admin-token-file`` or ``REDLB_ADMIN_TOKEN``; never a flag, so it never
   shows in ``ps``), every API call carries ``Authorization: Bearer TOKEN``, compared in
   constant time.  The token is never logged or echoed.
2. Without a token the listener must be on loopback (Config.validate refuses otherwise), and
   the Host header must name a loopback address: a web page the operator visits cannot reach
   it through DNS rebinding.
3. No cookies, ever: a browser never sends credentials on its own, so there is no CSRF
   surface; writes also require ``Content-Type: application/json``, which a cross-site form
   cannot send without a preflight that this listener never grants.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

LOOPBACK_HOSTS = frozenset({b"127.0.0.1", b"localhost", b"[::1]", b"::1"})
TOKEN_ENV = "REDLB_ADMIN_TOKEN"


class TokenError(ValueError):
    """The token file or variable cannot be used."""


def load_token(token_file: str | None) -> str | None:
    """The token from the file (first line) or the environment; None when neither is set."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read the admin token file {token_file}: {exc}") from None
        if not token:
            raise TokenError(f"the admin token file {token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < 16:
        raise TokenError("the admin token must be at least 16 characters")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise TokenError("the admin token must be printable ASCII without spaces")
    return token


class Guard:
    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def required(self) -> bool:
        return self._token is not None

    def allows(self, authorization: bytes) -> bool:
        if self._token is None:
            return True
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            given = b""
        # compare_digest takes time independent of where the first difference is.
        return hmac.compare_digest(given.strip(), self._token)

    def host_allowed(self, host: bytes) -> bool:
        """Without a token, only a loopback Host (DNS rebinding guard)."""
        if self._token is not None:
            return True
        name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
        return name.lower() in LOOPBACK_HOSTS
