"""TLS to ``https://`` backends: the client context, the server name, the failure log.

Rules:
1. One client context per process and CA setting (a context loads the trust store once;
   building one per connection would reread it on every connect).
2. Verification is on unless ``--upstream-insecure`` says otherwise: the system store by
   default, or only the bundle ``--upstream-ca`` names.
3. The server name (SNI and the name the certificate must hold) is the entry's host, or the
   Host a route sets for its pool; an IP-literal entry sends no SNI and is checked against
   the certificate's IP addresses (Python's ssl does both when given the address).
4. A refused certificate is a configuration fault, not a blip: one log line per backend and
   reason, then at most one a minute while it lasts, never one a request.
5. Nor one handshake a request: after a refusal, the backend (for that server name) is not
   dialled again for REFUSAL_HOLD seconds, even when the ejection cap keeps it in rotation;
   requests meanwhile go elsewhere or get the same 502 at once.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time

from redlb.address import Backend

log = logging.getLogger("redlb.backend_tls")

# After the first line about a backend's failure, the same one again at most this often.
REPEAT_EVERY = 60.0
# After a certificate is refused, no new handshake with that backend for this long (rule 5).
REFUSAL_HOLD = 5.0


@functools.cache
def client_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    """The process's context for this setting; OSError or ssl.SSLError for a bad CA file."""
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        # With a cafile, only that bundle is trusted (not the system store as well).
        context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_name(backend: Backend, host_override: bytes | None) -> str:
    """The name the backend's certificate must hold (rule 3)."""
    if host_override is None:
        return backend.host
    name = host_override.decode("ascii")
    if name.startswith("["):  # an IPv6 literal: no SNI, checked against the IP SANs
        return name[1 : name.find("]")]
    return name.rpartition(":")[0] if ":" in name else name


def is_certificate_refused(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError)


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})


def is_name_refused(exc: BaseException) -> bool:
    """The certificate is good but does not hold the name asked for: when the name is a
    route's Host override, the route's fault, not the backend's."""
    return isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _NAME_MISMATCH


def describe(exc: BaseException, name: str | None = None) -> str:
    """Why a TLS connection to a backend failed, in the words a human acts on."""
    if isinstance(exc, UnicodeError):  # ssl's IDNA encoding of the name: a route's odd Host
        return f"server name {name!r} is not a name TLS can check ({exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"TLS handshake failed: {exc.strerror}"
    return f"TLS handshake failed: {exc!r}"


class FailureLog:
    """Rule 4: the first failure of a kind is logged, repeats are counted into the next line."""

    def __init__(self, every: float = REPEAT_EVERY) -> None:
        self.every = every
        self.last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, not logged)

    def report(self, backend: Backend, reason: str, where: str = "") -> None:
        now = time.monotonic()
        key = (backend.key, reason)
        seen = self.last.get(key)
        if seen is not None and now - seen[0] < self.every:
            self.last[key] = (seen[0], seen[1] + 1)
            return
        if len(self.last) > 10_000:
            self.last.clear()  # bounded: a pool of thousands of broken backends, over days
        self.last[key] = (now, 0)
        again = f" ({seen[1]} more since the last line)" if seen is not None and seen[1] else ""
        log.warning("backend %s%s: %s%s", backend.key, where, reason, again)


failures = FailureLog()
