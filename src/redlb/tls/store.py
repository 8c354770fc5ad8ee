"""Which certificate a handshake gets: chosen by SNI, swapped whole on reload.

Rules:
1. An exact name beats a wildcard; a wildcard ``*.example.com`` covers one label only
   (``a.example.com``, not ``example.com`` nor ``a.b.example.com``, RFC 6125 §6.4.3);
   between pairs naming the same host, the one given first wins.
2. A client without SNI, or naming a host no certificate covers, gets the default: the
   first pair given.
3. The listener's SSLContext never changes; every handshake goes through ``_choose``, which
   points the connection at the current context of its pair, so a reload reaches the next
   handshake and leaves established connections on the context they started with.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from redlb.tls.certificates import Certificate, load


class CertificateStore:
    def __init__(self, certificates: Sequence[Certificate]) -> None:
        if not certificates:
            raise ValueError("a TLS listener needs at least one certificate")
        self.certificates = list(certificates)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        self.default = certificates[0].context
        self._index()
        # The context the listener is created with: only its SNI callback matters.
        self.listener_context = self.default
        self.listener_context.sni_callback = self._choose

    @classmethod
    def load(cls, pairs: Sequence[tuple[str, str]]) -> CertificateStore:
        """Load every pair; raises CertificateError for the first that cannot serve."""
        return cls([load(cert, key) for cert, key in pairs])

    def replace(self, index: int, certificate: Certificate) -> None:
        self.certificates[index] = certificate
        self._index()

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        context = self.exact.get(name)
        if context is not None:
            return context
        _, dot, parent = name.partition(".")
        if dot:
            context = self.wildcard.get(parent)
            if context is not None:
                return context
        return self.default

    def _index(self) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for certificate in self.certificates:
            for name in certificate.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], certificate.context)
                else:
                    exact.setdefault(name, certificate.context)
        self.exact, self.wildcard = exact, wildcard
        self.default = self.certificates[0].context

    def _choose(
        self, connection: ssl.SSLObject, server_name: str | None, _current: ssl.SSLContext
    ) -> None:
        context = self.context_for(server_name)
        if connection.context is not context:
            connection.context = context
