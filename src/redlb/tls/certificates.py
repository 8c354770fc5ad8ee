"""One certificate + key pair: the names it serves (from its SAN) and the SSLContext for it.

Rules:
1. TLS 1.2 and 1.3 only, Mozilla's "intermediate" cipher list for TLS 1.2 (TLS 1.3 suites
   are OpenSSL's, all strong), ALPN ``http/1.1``, no renegotiation, no compression.
2. A pair that cannot serve (unreadable, not PEM, key not matching, encrypted key) raises
   CertificateError with one sentence naming the files; nothing is half-loaded.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

# https://ssl-config.mozilla.org/ "intermediate" (version 5.7), TLS 1.2 part.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)

# What identifies a version of the pair's files: a rewrite, a rename over, or a
# Kubernetes-style symlink swap all change it.
Signature = tuple[tuple[int, int, int, int], tuple[int, int, int, int]]


class CertificateError(ValueError):
    """A pair that cannot be served; the message is one line for the user."""


class FilesChanging(CertificateError):
    """The files changed while being read: worth another look, not a complaint."""


@dataclass(frozen=True, slots=True)
class Certificate:
    cert_path: str
    key_path: str
    names: tuple[str, ...]  # lower case; wildcards as "*.example.com"
    not_after: datetime.datetime
    context: ssl.SSLContext
    signature: Signature

    @property
    def expired(self) -> bool:
        return self.not_after < datetime.datetime.now(datetime.UTC)


def signature(cert_path: str, key_path: str) -> Signature:
    """Raises OSError when either file cannot be looked at."""
    return (_stat(cert_path), _stat(key_path))


def _stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size)


def load(cert_path: str, key_path: str) -> Certificate:
    """Read a pair from its files (PEM: the certificate first, then any intermediates)."""
    where = f"{cert_path} + {key_path}"
    try:
        before = signature(cert_path, key_path)
        with open(cert_path, "rb") as file:
            pem = file.read()
        context = server_context()
        context.load_cert_chain(cert_path, key_path, password=_no_password)
        after = signature(cert_path, key_path)
    except _EncryptedKey:
        raise CertificateError(f"{where}: the key is encrypted; give an unencrypted key") from None
    except ssl.SSLError as exc:
        raise CertificateError(f"{where}: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise CertificateError(f"{where}: {exc.strerror or exc} ({exc.filename})") from None
    if before != after:
        raise FilesChanging(f"{where}: the files changed while being read")
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise CertificateError(f"{cert_path}: not a PEM certificate") from None
    # A certificate naming no host (or only IP addresses, which SNI never carries) can
    # still be the default one.
    names = names_of(leaf)
    return Certificate(cert_path, key_path, names, leaf.not_valid_after_utc, context, after)


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return context


def names_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the SAN (then its IP addresses, never matched by SNI); the subject's
    CN only for a certificate without a SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = san.get_values_for_type(x509.DNSName)
        found += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        found = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in found if n))


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, which hangs a service.
    raise _EncryptedKey


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = (exc.reason or "").upper()
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not match the certificate"
    if "PEM" in reason or "PEM lib" in str(exc) or reason in ("NO_START_LINE", "BAD_END_LINE"):
        return "not a complete PEM certificate and key"
    return exc.reason or str(exc)
