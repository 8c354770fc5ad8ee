"""Certificates for the TLS tests, made by trustme: one test CA, leaves written as PEM files."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import trustme


class Pair:
    """A leaf certificate and its key on disk, for the names given."""

    def __init__(self, ca: trustme.CA, directory: Path, stem: str, *names: str) -> None:
        self.ca = ca
        self.names = names
        self.cert = directory / f"{stem}.crt"
        self.key = directory / f"{stem}.key"
        self.der = b""
        self.issue()

    def issue(self, pad_to: int = 0) -> bytes:
        """A new certificate (and key) for the same names, written atomically; its DER."""
        leaf = self.ca.issue_cert(*self.names)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        key = leaf.private_key_pem.bytes()
        for path, data in ((self.cert, chain), (self.key, key)):
            if pad_to:  # text after the PEM blocks is ignored; same size, same stat
                data = data + b"\n" * (pad_to - len(data))
            write_atomically(path, data)
        self.der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        return self.der

    @property
    def args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def handshake(
    port: int, server_name: str | None, ca: trustme.CA, timeout: float = 10
) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:port sending ``server_name`` as SNI (none if None)."""
    context = client_context(ca)
    if server_name is None:
        context.check_hostname = False
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except BaseException:
        sock.close()
        raise


def served_der(port: int, server_name: str | None, ca: trustme.CA) -> bytes:
    """The DER certificate redlb presents for ``server_name``."""
    with handshake(port, server_name, ca) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der
