"""This instance's identity and per-instance resources, made once before the workers fork.

An instance is one ``redlb serve``: its supervisor and its workers.  They share one id (the
fleet registry groups workers by it), one metrics directory (metrics/snapshot.py) and, when
enabled, one admin socket bound by the supervisor, so that no other process can take over
the port between two worker restarts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from redlb import __version__
from redlb.config import Config


@dataclass
class Instance:
    id: str
    host: str
    pid: int
    version: str
    started: float  # Unix time
    listen: list[str]
    metrics_dir: Path
    admin_listen: str | None = None
    admin_socket: socket.socket | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.admin_socket is not None:
            self.admin_socket.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


_current: Instance | None = None


def begin(config: Config) -> Instance:
    """Made by the process that forks the workers; they inherit it."""
    global _current
    host = socket.gethostname()
    metrics_dir = Path(tempfile.mkdtemp(prefix="redlb-metrics-"))
    instance = Instance(
        id=f"{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        host=host,
        pid=os.getpid(),
        version=__version__,
        started=time.time(),
        listen=[config.listen],
        metrics_dir=metrics_dir,
    )
    admin = getattr(config, "admin_listen", None)
    if admin:
        from redlb.admin.listener import bind

        try:
            instance.admin_socket = bind(admin)
        except BaseException:
            instance.close()
            raise
        instance.admin_listen = admin
    _current = instance
    return instance


def current(config: Config) -> Instance:
    """The instance this process belongs to (made here for a worker run on its own)."""
    return _current if _current is not None else begin(config)


def end() -> None:
    global _current
    if _current is not None and _current.pid == os.getpid():
        with contextlib.suppress(OSError):
            _current.close()
    _current = None
