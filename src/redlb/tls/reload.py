"""Certificates reloaded without a restart: files watched by the sweeper, and SIGHUP.

Rules:
1. No thread and no timer of its own: ``check`` runs from the worker's sweeper, and costs
   two ``stat`` calls a pair.
2. A change is loaded once the files have kept the same signature (mtime, inode, size) for
   one check, so a file being written, or a cert replaced before its key, is not read
   half-way; a load that still fails keeps the old certificate serving and is logged once
   per version of the files.
3. SIGHUP reloads every pair at once, changed or not, and says what it did.
4. A worker starts from the certificates the supervisor loaded at startup: one (re)started
   after the files changed reloads them before it accepts a handshake (``catch_up``).
"""

from __future__ import annotations

import logging

from redlb.tls.certificates import (
    CertificateError,
    FilesChanging,
    Signature,
    load,
    signature,
)
from redlb.tls.store import CertificateStore

log = logging.getLogger("redlb.tls")

_UNREADABLE: Signature = ((-1, -1, -1, -1), (-1, -1, -1, -1))


class CertificateWatcher:
    def __init__(self, store: CertificateStore, speaks: bool = True) -> None:
        self.store = store
        # With several workers only one says what happened (they all read the same files).
        self.level = logging.WARNING if speaks else logging.DEBUG
        self.info = logging.INFO if speaks else logging.DEBUG
        count = len(store.certificates)
        self.seen: list[Signature | None] = [None] * count  # at the previous check
        self.refused: list[Signature | None] = [None] * count

    def check(self) -> None:
        for index, current in enumerate(self.store.certificates):
            try:
                now = signature(current.cert_path, current.key_path)
            except OSError:
                now = _UNREADABLE
            stable = now == self.seen[index]
            self.seen[index] = now
            if now == current.signature or now == self.refused[index] or not stable:
                continue
            self._reload(index, now)

    def catch_up(self) -> None:
        """Rule 4: before the listener starts, the pairs whose files are not those loaded."""
        for index, current in enumerate(self.store.certificates):
            try:
                now = signature(current.cert_path, current.key_path)
            except OSError:
                now = _UNREADABLE
            if now != current.signature:
                self._reload(index, now)

    def reload_all(self) -> None:
        """SIGHUP."""
        log.log(self.info, "SIGHUP: reloading %d TLS certificate(s)", len(self.seen))
        for index, current in enumerate(self.store.certificates):
            try:
                now = signature(current.cert_path, current.key_path)
            except OSError:
                now = _UNREADABLE
            self._reload(index, now)

    def _reload(self, index: int, now: Signature) -> None:
        current = self.store.certificates[index]
        try:
            fresh = load(current.cert_path, current.key_path)
        except FilesChanging:
            self.seen[index] = None  # looked at again once they stay still
            return
        except CertificateError as exc:
            self.refused[index] = now
            log.log(self.level, "TLS certificate not reloaded, the old one keeps serving: %s", exc)
            return
        self.refused[index] = None
        self.seen[index] = fresh.signature
        self.store.replace(index, fresh)
        expired = " (EXPIRED)" if fresh.expired else ""
        log.log(
            self.level if fresh.expired else self.info,
            "TLS certificate reloaded: %s for %s, valid until %s%s",
            fresh.cert_path,
            ", ".join(fresh.names),
            fresh.not_after.date(),
            expired,
        )
