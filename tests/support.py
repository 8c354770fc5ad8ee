"""Real processes and sockets for the tests: redis-server, backends, redlb, clients.

Nothing here imitates Redis or HTTP: every Redis is a redis-server process started on a free
port, every backend a real server on a loopback socket, every redlb a real `redlb serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl as ssl_module
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Self

import httptools
import redis

from redlb.store.embedded import free_port, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def wait_for_async(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """wait_for() inside a running event loop: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


# Redis


class RedisProcess:
    """A real redis-server on a free loopback port, with AOF so a restart keeps the data."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, persistent: bool = True) -> RedisProcess:
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "always", "--logfile", str(self.dir / "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        assert wait_for(self.ping, 10), "redis-server did not start"
        return self

    def start_unchecked(self) -> RedisProcess:
        """Start without pinging (for a server that refuses us, e.g. with requirepass)."""
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", *self.extra]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        assert wait_for(lambda: self._accepts(), 10)
        return self

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def client_with_password(self, password: str) -> redis.Redis:
        return redis.Redis(port=self.port, password=password, socket_timeout=2)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def wipe(self) -> None:
        for path in self.dir.glob("appendonly*"):
            if path.is_dir():
                for inner in path.iterdir():
                    inner.unlink()
                path.rmdir()
            else:
                path.unlink()

    def cli(self, *args: str) -> str:
        binary = Path(redis_server_binary()).with_name("redis-cli")
        out = subprocess.run(
            [str(binary), "-p", str(self.port), *args], capture_output=True, check=True, timeout=5
        )
        return out.stdout.decode()


# A loop in a thread, for servers the tests run in-process


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # a wedged server must not fail the teardown
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# Backends


@dataclass
class Received:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body_len: int
    body_sha: str
    body: bytes  # first 64 KiB

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class BackendBehaviour:
    status: int = 200
    hang: bool = False
    delay: float = 0.0
    close_after: bool = False


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.sha = hashlib.sha256()
        self.length = 0
        self.head = b""
        self.done = False


class LoopbackServer:
    """An asyncio server on a loopback port, run on a LoopThread; ``ssl`` makes it HTTPS
    (the handshake done before ``_serve`` runs).  ``_serve`` adds each connection's writer
    to ``writers``: ``stop`` aborts those still open, as a killed server would."""

    def __init__(
        self,
        loop: LoopThread,
        port: int | None = None,
        host: str = "127.0.0.1",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.loop = loop
        self.host = host
        self.port = port or free_port()
        self.ssl = ssl
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def start(self) -> Self:
        async def go() -> None:
            self.server = await asyncio.start_server(
                self._serve, self.host, self.port, ssl=self.ssl
            )

        self.loop.run(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                for writer in list(self.writers):
                    writer.transport.abort()
                self.server = None

        self.loop.run(go())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HttpBackend(LoopbackServer):
    """A real HTTP/1.1 server on a loopback port that records what it receives.

    Paths: ``/big/N`` sends N bytes; ``/chunked/N`` sends N bytes chunked; ``/status/NNN``;
    ``/echo`` answers with a description of the request; anything else ``ok NAME``.
    """

    def __init__(
        self,
        loop: LoopThread,
        name: str,
        port: int | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        super().__init__(loop, port, ssl=ssl)
        self.name = name
        self.received: list[Received] = []
        self.raw: list[bytes] = []  # every connection's bytes, in arrival order
        self.connections = 0
        self.behaviour = BackendBehaviour()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self) -> int:
        return len(self.received)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        index = len(self.raw)
        self.raw.append(b"")
        done: list[_Request] = []
        current = _Request()

        class Callbacks:
            def on_url(_, url: bytes) -> None:
                current.url += url

            def on_header(_, name: bytes, value: bytes) -> None:
                current.headers.append((name, value))

            def on_body(_, body: bytes) -> None:
                nonlocal current
                current.sha.update(body)
                if current.length < 65536:
                    current.head += body[: 65536 - current.length]
                current.length += len(body)

            def on_message_complete(_) -> None:
                nonlocal current
                done.append(current)
                current = _Request()

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    break
                if len(self.raw[index]) < 1 << 20:
                    self.raw[index] += data[:65536]
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    break
                while done:
                    req = done.pop(0)
                    method = parser.get_method()
                    self.received.append(
                        Received(method, req.url, req.headers, req.length,
                                 req.sha.hexdigest(), req.head)
                    )  # fmt: skip
                    keep = await self._respond(writer, method, req)
                    if not keep:
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, method: bytes, req: _Request) -> bool:
        b = self.behaviour
        if b.hang:
            await asyncio.sleep(3600)
        if b.delay:
            await asyncio.sleep(b.delay)
        path = req.url.split(b"?")[0]
        close = b"Connection: close\r\n" if b.close_after else b""
        if path.startswith(b"/big/") or path.startswith(b"/chunked/"):
            size = int(path.rsplit(b"/", 1)[1])
            chunked = path.startswith(b"/chunked/")
            framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
            writer.write(b"HTTP/1.1 200 OK\r\n%b\r\n%b\r\n" % (framing, close))
            block = b"x" * 65536
            sent = 0
            while sent < size and method != b"HEAD":
                piece = block[: min(65536, size - sent)]
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
                await writer.drain()
            if chunked and method != b"HEAD":
                writer.write(b"0\r\n\r\n")
        elif path.startswith(b"/status/"):
            status = int(path[8:11])
            body = b"" if status in (204, 304) else b"status %d\n" % status
            length = b"" if status in (204, 304) else b"Content-Length: %d\r\n" % len(body)
            writer.write(
                b"HTTP/1.1 %d %b\r\n%b%b\r\n%b" % (status, _phrase(status), length, close, body)
            )
        else:
            if path == b"/echo":
                body = b"%b %b len=%d sha=%b\n" % (
                    method,
                    req.url,
                    req.length,
                    req.sha.hexdigest().encode(),
                )
            else:
                body = b"ok %b\n" % self.name.encode()
            writer.write(
                b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nX-Backend: %b\r\n"
                b"Content-Length: %d\r\n%b\r\n%b"
                % (
                    b.status,
                    _phrase(b.status),
                    self.name.encode(),
                    len(body),
                    close,
                    b"" if method == b"HEAD" else body,
                )
            )
        await writer.drain()
        return not b.close_after


def _phrase(status: int) -> bytes:
    return HTTPStatus(status).phrase.encode()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class ScriptedBackend:
    """A backend that misbehaves on purpose: each connection runs ``script``."""

    def __init__(self, loop: LoopThread, script: Script) -> None:
        self.loop = loop
        self.script = script
        self.port = free_port()
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ScriptedBackend:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer, self.connections)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def go() -> None:
            self.server = await asyncio.start_server(serve, "127.0.0.1", self.port)

        self.loop.run(go())
        return self

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        return head

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()

        self.loop.run(go())


# redlb


class Proxy:
    """A real `redlb serve` process."""

    def __init__(self, redis_url: str | None, *args: str, workdir: Path, pool: str = "servers"):
        self.port = free_port()
        self.status_port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.redis_url = redis_url
        self.pool = pool
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redlb-{self.port}.log"
        self.out_path = workdir / f"redlb-{self.port}.out"

    def start(self, ready: bool = True) -> Proxy:
        # free_port() cannot reserve a port: another process may take it before redlb binds
        # it.  That (and only that, on redlb's own two ports) is retried with new ports.
        for _attempt in range(3):
            # Sizes, not reads: a test may make the log a pipe nobody reads (never read it).
            logged = self.log_path.stat().st_size if self.log_path.is_file() else 0
            self.process = subprocess.Popen(
                self._command(),
                stdout=self.out_path.open("ab"),
                stderr=self.log_path.open("ab"),
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
            up = self.ready if ready else self.listening
            process = self.process
            seen: list[
                bool
            ] = []  # up once is up: with 2 workers the next answer may be the other's

            def settled() -> bool:
                if up():
                    seen.append(True)
                    return True
                return process.poll() is not None

            wait_for(settled, 15)
            said = self.log()[logged:] if process.poll() is not None else ""
            taken = "Address already in use" in said and (
                "(--listen)" in said or "(--status-listen)" in said
            )
            if process.poll() is None or not taken:
                break
            self.port, self.status_port = free_port(), free_port()
        assert seen, f"redlb not {'ready' if ready else 'listening'}:\n{self.log()}"
        return self

    def _command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "redlb", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--status-listen", f"127.0.0.1:{self.status_port}",
            "--pool", self.pool, "--state-dir", str(self.workdir / "state"),
        ]  # fmt: skip
        if self.redis_url:
            cmd += ["--redis", self.redis_url]
        if "--workers" not in self.args:
            cmd += ["--workers", "1"]
        return cmd + self.args

    def status(self, path: str) -> tuple[int, bytes]:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return resp.status, body
        except OSError:
            return 0, b""

    def ready(self) -> bool:
        return self.status("/-/ready")[0] == 200

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def access_log(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def get(self, path: str = "/", **kw: Any) -> tuple[int, bytes, http.client.HTTPResponse]:
        return request(self.port, "GET", path, **kw)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, resp
    finally:
        conn.close()


def raw_exchange(
    port: int, data: bytes, timeout: float = 3.0, pause: float = 0.0
) -> tuple[bytes, bool]:
    """Send raw bytes; return everything read and whether the proxy closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
        chunks = []
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks), closed
    finally:
        sock.close()


def read_response(sock: socket.socket) -> bytes:
    """Read one response with a Content-Length body from a socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def statuses(response: bytes) -> list[int]:
    """Status codes of the final responses in a raw byte stream (1xx skipped)."""
    codes = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", response)]
    return [code for code in codes if code >= 200]


# Load


@dataclass
class LoadResult:
    sent: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Load:
    """A bounded client: ``rate`` GETs per second over ``connections`` keep-alive connections.

    Like urllib3 and browsers, a request that fails on a *reused* connection before any
    response byte is retried once on a new connection (the server may close an idle
    keep-alive connection at any time); a second failure counts.
    """

    def __init__(self, port: int, rate: float = 200, connections: int = 4, path: str = "/"):
        self.port = port
        self.rate = rate
        self.connections = connections
        self.path = path
        self.result = LoadResult()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        return self.result

    def _run(self) -> None:
        interval = self.connections / self.rate
        conn: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        while not self.stopping.is_set():
            status = 0
            error = ""
            for attempt in range(2):
                fresh = conn is None
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                try:
                    conn.request("GET", self.path)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                    conn.close()
                    conn = None
                    error = repr(e)
                    if fresh or attempt == 1:
                        break
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = None
                    error = repr(e)
                    break
            with self.lock:
                self.result.sent += 1
                self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
                if status != 200:
                    self.result.failed += 1
                    if len(self.result.errors) < 20:
                        self.result.errors.append(error or f"status {status}")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stopping.wait(delay)
            else:
                next_at = time.monotonic()
        if conn is not None:
            conn.close()


def rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def open_fds(pid: int, but_to_port: int | None = None) -> int:
    """The process's open descriptors; with ``but_to_port``, not counting its TCP connections
    to that port (its Redis's: redis-py keeps as many as it once needed at the same time)."""
    names = os.listdir(f"/proc/{pid}/fd")
    if but_to_port is None:
        return len(names)
    fds = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            fds.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    excluded = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if int(fields[2].rpartition(":")[2], 16) == but_to_port:
                    excluded.add(f"socket:[{fields[9]}]")
    return sum(1 for fd in fds if fd not in excluded)


@contextlib.contextmanager
def peak_rss(pid: int) -> Any:
    """Sample a process's RSS every 20 ms while the block runs; yields a dict with 'peak'."""
    result = {"peak": rss_bytes(pid), "start": rss_bytes(pid)}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                result["peak"] = max(result["peak"], rss_bytes(pid))
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


# Operations: the admin API and /metrics, read as a client would


def admin_call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    """One admin API call; the body is sent as JSON, the answer parsed as JSON when it is."""
    sent = dict(headers or {})
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    status, raw, resp = request(port, method, path, body=data, headers=sent)
    parsed: Any = raw
    if resp.getheader("Content-Type", "").startswith("application/json"):
        parsed = json.loads(raw) if raw else None
    return status, parsed, resp


def scrape(proxy: Proxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):  # a worker killed by the test may take one connection down with it
        status, body = proxy.status("/metrics")
        if status:
            break
        time.sleep(0.1)
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric_sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
               **labels: str) -> float:  # fmt: skip
    """The sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# Observing redlb through Redis and /metrics (state tests)


def command_calls(redis_server: RedisProcess, command: str) -> int:
    """How many times Redis ran ``command`` (INFO commandstats), e.g. ``lrange``."""
    stats = redis_server.client().info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def wait_resyncs(redis_server: RedisProcess, count: int, timeout: float = 10) -> None:
    """Wait until redlb instances read the pool ``count`` more times (a read is one LRANGE)."""
    start = command_calls(redis_server, "lrange")
    assert wait_for(lambda: command_calls(redis_server, "lrange") >= start + count, timeout)


def metric(proxy: Proxy, name: str) -> float | None:
    """A value from the proxy's /metrics (counters with or without ``_total``), or None."""
    status, body = proxy.status("/metrics")
    if status != 200:
        return None
    match = re.search(rb"^%b(?:_total)? ([0-9.e+]+)$" % name.encode(), body, re.M)
    return float(match.group(1)) if match else None


def readiness_during(proxy: Proxy, action: Callable[[], object], join: float = 10) -> list[int]:
    """The readiness probe's answers, asked every 50 ms while ``action`` runs (0: no answer
    within the probe's 2 s): whether the event loop kept answering through it."""
    answered: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            answered.append(proxy.status("/-/ready")[0])
            time.sleep(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        time.sleep(0.3)
        action()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(join)
    return answered


# Strategies: a backend that measures its own concurrency, and closed-loop clients


class CountingBackend:
    """Answers every GET after ``delay`` seconds and integrates its requests in flight.

    ``average()`` is the time-weighted mean number of requests it held since ``reset()``:
    what "its share of in-flight requests" means for a slow backend.
    """

    def __init__(self, loop: LoopThread, name: str, delay: float = 0.0) -> None:
        self.loop = loop
        self.name = name
        self.delay = delay
        self.port = free_port()
        self.server: asyncio.AbstractServer | None = None
        self.count = 0
        self.inflight = 0
        self.peak = 0
        self.area = 0.0
        self.since = time.monotonic()
        self.changed = self.since

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CountingBackend:
        async def go() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

        self.loop.run(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None

        self.loop.run(go())

    def _step(self, delta: int) -> None:
        now = time.monotonic()
        self.area += self.inflight * (now - self.changed)
        self.changed = now
        self.inflight += delta
        self.peak = max(self.peak, self.inflight)

    def reset(self) -> None:
        def go() -> None:
            self._step(0)
            self.area, self.count, self.peak = 0.0, 0, self.inflight
            self.since = time.monotonic()

        self.loop.loop.call_soon_threadsafe(go)
        time.sleep(0.05)

    def average(self) -> float:
        result: Future[float] = Future()

        def go() -> None:
            self._step(0)
            result.set_result(self.area / max(1e-9, time.monotonic() - self.since))

        self.loop.loop.call_soon_threadsafe(go)
        return result.result(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = f"ok {self.name}".encode()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                self._step(+1)
                try:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                finally:
                    self._step(-1)
                self.count += 1
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def closed_loop(
    ports: list[int], clients_per_port: int, seconds: float, headers: dict[str, str] | None = None
) -> Counter[int]:
    """Keep-alive clients, each sending its next GET as soon as the last one is answered."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while time.monotonic() < deadline:
                conn.request("GET", "/", headers=headers or {"Host": "example.com"})
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] += 1
        except (OSError, http.client.HTTPException):
            with lock:
                statuses[0] += 1
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(port,), daemon=True)
        for port in ports
        for _ in range(clients_per_port)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 15)
    return statuses


# WebSocket (issue 11): a real `websockets` echo server, and raw frames for hostile clients


class WsEchoBackend:
    """A `websockets` server on a loopback port: echoes every message.

    ``/close/CODE`` closes with that code at once.  ``open`` counts live connections, ``closes``
    records each connection's close code.  ``pages`` (path -> HTML) are served to plain GETs.
    ``kill`` resets every connection, as a crashed server with bytes in flight does.
    """

    def __init__(self, loop: LoopThread, pages: dict[str, bytes] | None = None) -> None:
        self.loop = loop
        self.pages = pages or {}
        self.port = free_port()
        self.open = 0
        self.closes: list[int | None] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.server: Any = None
        self.live: set[Any] = set()  # the connections open now

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> WsEchoBackend:
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            path = ws.request.path
            self.paths.append(path)
            self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
            self.open += 1
            self.live.add(ws)
            try:
                if path.startswith("/close/"):
                    await ws.close(int(path.rsplit("/", 1)[1]), "bye")
                    return
                async for message in ws:
                    await ws.send(message)
            except Exception:
                pass
            finally:
                self.open -= 1
                self.live.discard(ws)
                self.closes.append(ws.close_code)

        def page(connection: Any, request: Any) -> Any:
            from websockets.datastructures import Headers
            from websockets.http11 import Response

            body = self.pages.get(request.path)
            if body is None or "upgrade" in request.headers.get("Connection", "").lower():
                return None
            headers = Headers([("Content-Type", "text/html; charset=utf-8"),
                               ("Content-Length", str(len(body)))])  # fmt: skip
            return Response(200, "OK", headers, body)

        async def go() -> None:
            self.server = await serve(
                handler, "127.0.0.1", self.port, max_size=None, process_request=page
            )

        self.loop.run(go())
        return self

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()

        self.loop.run(go())

    def kill(self) -> None:
        async def go() -> None:
            self.server.close()
            for ws in list(self.live):
                sock = ws.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                ws.transport.abort()

        self.loop.run(go())


WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's example pair


def ws_handshake(path: bytes = b"/", host: bytes = b"t", key: bytes = WS_KEY) -> bytes:
    return (
        b"GET %b HTTP/1.1\r\nHost: %b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %b\r\n\r\n" % (path, host, key)
    )


def ws_frame(payload: bytes, opcode: int = 2, masked: bool = True) -> bytes:
    """One final frame; masked with a zero key (valid, and the payload stays as is)."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([0x80 | opcode, mask_bit | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, mask_bit | 127]) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


def ws_tunnel(port: int, path: bytes = b"/") -> tuple[socket.socket, bytes]:
    """A raw client socket through the handshake (the 101 checked), and what came after the
    101's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(ws_handshake(path))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"Sec-WebSocket-Accept: " + WS_ACCEPT in head
    return sock, head.partition(b"\r\n\r\n")[2]


def assert_flood_held_back(sock: socket.socket, pid: int) -> None:
    """Send 1 MiB frames into a tunnel whose far side never reads: flow control must stop the
    sender (a send blocked for 5 s) before 400 MiB are out, and redlb must not grow by 64 MiB."""
    limit = 400 << 20
    start = rss_bytes(pid)
    frame = ws_frame(b"z" * (1 << 20))
    sock.settimeout(5)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(frame)
            sent += len(frame)
    except TimeoutError:
        pass
    assert sent < limit  # the sender was stopped, not the test's bound
    assert rss_bytes(pid) - start < 64 << 20
