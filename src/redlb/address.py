"""Backend addresses: the one validator for pool entries, the CLI and the admin paths.

A pool entry is ``host:port``, ``http://host:port`` (optionally with a trailing ``/``),
``https://host:port`` (dialled with TLS) or ``[v6addr]:port``.  Anything else is refused:
redlb never dials what it cannot name exactly, so an entry carrying CR/LF, a path,
credentials or another scheme is garbage, not a backend.

Identity: ``http://h:p`` and ``h:p`` are one backend (key ``h:p``); ``https://h:p`` is another
(key ``https://h:p``), so the same port spoken in TLS and in clear never shares health,
ejections, in-flight counts, connections or metrics.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

MAX_ENTRY_LENGTH = 300
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class InvalidAddress(ValueError):
    """A pool entry or CLI argument that does not name a backend."""


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend, identified by its canonical ``host:port`` (``[v6]:port`` for IPv6),
    prefixed with ``https://`` when it is dialled with TLS."""

    host: str
    port: int
    tls: bool = False
    key: str = field(init=False, compare=False, repr=False)
    label: bytes = field(init=False, compare=False, repr=False)  # the key, for the access log
    authority: str = field(init=False, compare=False, repr=False)  # host:port, for a Host field

    def __post_init__(self) -> None:
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        key = "https://" + authority if self.tls else authority
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "label", key.encode())
        object.__setattr__(self, "authority", authority)

    def __hash__(self) -> int:
        return hash(self.key)  # a str caches its hash: cheap on every pick

    def __str__(self) -> str:
        return self.key


def parse_backend(raw: str | bytes) -> Backend:
    """Parse one pool entry; raise InvalidAddress with a reason a human can act on."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_ENTRY_LENGTH:
            raise InvalidAddress(f"entry too long ({len(raw)} bytes)")
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidAddress("entry is not ASCII") from None
    if len(raw) > MAX_ENTRY_LENGTH:
        raise InvalidAddress(f"entry too long ({len(raw)} characters)")
    text = raw
    tls = False
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidAddress(f"unsupported scheme {scheme!r} (only http and https)")
        tls = scheme == "https"
        if text.endswith("/"):
            text = text[:-1]
        if text and ":" not in text.rpartition("]")[2]:
            # A URL without a port: the scheme's own (Hipache's lists rely on it).
            text += ":443" if tls else ":80"
    if not text or any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise InvalidAddress("empty or contains whitespace/control characters")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise InvalidAddress("IPv6 address must be written [addr]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidAddress(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise InvalidAddress("missing :port")
        if not _HOSTNAME.match(host):
            raise InvalidAddress(f"{host!r} is not a valid host name or IPv4 address")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = host.lower()
    if not port_text.isdigit() or len(port_text) > 5:
        raise InvalidAddress(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidAddress(f"port {port} is out of range 1-65535")
    return Backend(host, port, tls)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` for a listener (port 0 allowed)."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidAddress(f"{text!r} is not host:port")
    return host or "0.0.0.0", int(port_text)
