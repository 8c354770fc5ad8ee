"""This instance's identity and per-instance resources, made once before the workers fork.

An instance is one ``redlb serve``: its supervisor and its workers.  They share one id (the
fleet registry groups workers by it), one metrics directory (metrics/snapshot.py) and, when
enabled, one admin socket bound by the supervisor, so that no other process can take over
the port between two worker restarts.
"""

from __future__ import annotations

import atexit
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
DIR_PREFIX = "redlb-metrics-"
SHARED_MEMORY = Path("/dev/shm")


def metrics_parent() -> Path:
    """Where metrics directories go: memory (tmpfs) when there is one.  Every worker
    replaces its file each second from its event loop; on a disk file system creating and
    renaming a file can wait for the journal (tens of ms behind a busy access log)."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK | os.X_OK):
        return SHARED_MEMORY
    return Path(tempfile.gettempdir())


def _remove_dead_dirs() -> None:
    """Metrics directories left by instances that were killed (SIGKILL skips the cleanup)."""
    for path in metrics_parent().glob(f"{DIR_PREFIX}*-*"):
        pid = path.name[len(DIR_PREFIX) :].partition("-")[0]
        if not pid.isdigit() or path.owner() != _me():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def begin(config: Config) -> Instance:
    """Made by the process that forks the workers; they inherit it."""
    global _current
    host = socket.gethostname()
    _remove_dead_dirs()
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=metrics_parent()))
    instance = Instance(
        id=f"{host}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        host=host,
        pid=os.getpid(),
        version=__version__,
        started=time.time(),
        listen=[
            config.listen or "off",
            *([f"https://{config.tls_listen}"] if config.tls_listen else []),
        ],
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
    if _current is not None:
        return _current
    atexit.register(end)  # e.g. `redlb demo`, which runs a worker without serve()
    return begin(config)


def end() -> None:
    global _current
    if _current is not None and _current.pid == os.getpid():
        with contextlib.suppress(OSError):
            _current.close()
    _current = None
