from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  # imported before any test thread: CPython 3.11's AST
import pytest  # recursion counter trips if the plugin first imports it at session end

from support import CountingBackend, HttpBackend, LoopThread, Proxy, RedisProcess, WsEchoBackend


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture
def backends(loop_thread: LoopThread) -> Iterator[list[HttpBackend]]:
    started = [HttpBackend(loop_thread, f"b{i}").start() for i in range(3)]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def echo(loop_thread: LoopThread) -> Iterator[WsEchoBackend]:
    """A WebSocket echo server (a real `websockets` one)."""
    backend = WsEchoBackend(loop_thread).start()
    yield backend
    backend.stop()


@pytest.fixture
def fast_fast_slow(
    redis_server: RedisProcess, loop_thread: LoopThread
) -> Iterator[list[CountingBackend]]:
    """The pool for the latency-aware strategies: two backends answering in 20 ms, then one
    in 200 ms (the slow one last), listed in that order."""
    started = [
        CountingBackend(loop_thread, "fast0", 0.02).start(),
        CountingBackend(loop_thread, "fast1", 0.02).start(),
        CountingBackend(loop_thread, "slow", 0.2).start(),
    ]
    for backend in started:
        redis_server.cli("RPUSH", "servers", backend.address)
    yield started
    for backend in started:
        backend.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[Proxy]]:
    """Proxies started by a test are registered here and always stopped."""
    started: list[Proxy] = []
    yield started
    for p in started:
        if p.alive():
            p.stop(timeout=10)


@pytest.fixture
def start_proxy(proxies: list[Proxy], tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(
        redis_url: str | None, *args: str, ready: bool = True, pool: str = "servers"
    ) -> Proxy:
        proxy = Proxy(redis_url, *args, workdir=tmp_path / f"p{len(proxies)}", pool=pool)
        proxies.append(proxy)
        return proxy.start(ready=ready)

    return start
