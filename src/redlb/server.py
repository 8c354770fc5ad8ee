"""Processes and lifecycle: embedded Redis, workers, listeners, signals, graceful drain.

One worker is one process with one event loop (uvloop).  With ``--workers N`` a supervisor
binds the listening sockets once and forks N workers that share them, restarts any that
crash, and on SIGTERM forwards it and waits: each worker stops accepting, finishes what is in
flight (bounded by ``--drain-timeout``) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis
import uvloop

from redlb import build
from redlb.address import parse_listen
from redlb.config import Config
from redlb.fleet import instance as fleet_instance
from redlb.fleet.publisher import Publisher
from redlb.jsonlog import access_log
from redlb.metrics import snapshot
from redlb.proxy.context import ProxyContext
from redlb.proxy.downstream import ClientConnection
from redlb.proxy.poolstate import PoolState
from redlb.routing import RoutingTable
from redlb.slices import slices
from redlb.store.client import auth_problem, make_client, make_sync_client, redact
from redlb.store.embedded import EmbeddedRedis, die_with_parent
from redlb.store.link import RedisLink
from redlb.store.rotation import Cursor
from redlb.store.routes import RouteSync

if TYPE_CHECKING:  # tls/ (and cryptography) are imported only when a TLS listener is asked for
    from redlb.tls.listener import TlsListener, TlsSetup

log = logging.getLogger("redlb")

SWEEP_INTERVAL = 0.5
SWEEP_SLICE = 100  # connections checked between two turns of the loop
# Pools expired between two turns: 200 held a loaded worker's loop for 0.15-0.3 ms (its
# caches cold from the requests), a delay every request in flight waits behind.
SWEEP_POOLS_SLICE = 50
STARTUP_GRACE = 2.0  # for Redis to answer at all
STARTUP_LIMIT = 60.0  # for a Redis that answers to finish the first read (a big table)


def serve(config: Config) -> None:
    """Run redlb until SIGTERM/SIGINT: listeners, embedded Redis if needed, then the worker(s)."""
    # SIGTERM/SIGINT end the process at any point of startup, without a traceback.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    # Bound here, once: this process's workers share these sockets and nobody else can join
    # them (no SO_REUSEPORT), so a second instance on the same port fails with "in use".
    listener = _bind_or_say(config.listen, "--listen") if config.listen else None
    status = _bind_or_say(config.status_listen, "--status-listen") if config.status_listen else None
    tls = _tls_setup(config)
    embedded = None
    url = config.redis_url
    if url is not None:
        check_credentials(url, config.redis_timeout)
    else:
        embedded = EmbeddedRedis(config.state_dir)
        url = embedded.start()
    keeper = embedded.ensure_running if embedded is not None else None
    try:
        fleet_instance.begin(config)  # id, metrics directory, admin socket: shared by workers
        if config.workers == 1:
            run_worker(config, url, Cursor(), 0, listener, status, keeper, tls)
        else:
            supervise(config, url, listener, status, keeper, tls)
    finally:
        fleet_instance.end()
        if embedded is not None:
            embedded.stop()


class CannotStart(Exception):
    """A problem that waiting will not fix; the message is one line for the user."""


def check_credentials(url: str, timeout: float) -> None:
    """Refuse to start when Redis answers but refuses our credentials.

    A Redis that is down is waited for (it may come up later); a wrong password will not
    fix itself, and would otherwise look like an outage in every log line.
    """
    client = make_sync_client(url, max(timeout, 1.0))
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        problem = auth_problem(exc)
        if problem is not None:
            raise CannotStart(f"{problem} (at {redact(url)})") from None
    finally:
        client.close()


def _tls_setup(config: Config) -> TlsSetup | None:
    """The TLS socket and certificates, once for every worker; SIGHUP means reload from now."""
    if config.tls_listen is None:
        return None
    from redlb.tls.certificates import CertificateError
    from redlb.tls.listener import TlsSetup
    from redlb.tls.store import CertificateStore

    sock = _bind_or_say(config.tls_listen, "--tls-listen")
    try:
        store = CertificateStore.load(config.tls_pairs)
    except CertificateError as exc:
        sock.close()
        raise CannotStart(str(exc)) from None
    for certificate in store.certificates:
        if certificate.expired:
            log.warning("TLS certificate %s expired on %s", certificate.cert_path,
                        certificate.not_after.date())  # fmt: skip
    # Until a worker's loop takes it over, a SIGHUP must not end the process (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return TlsSetup(sock, store)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _bind_or_say(address: str, flag: str) -> socket.socket:
    """Bind, or say which flag's address failed (two listeners give the same errno)."""
    try:
        return bind_listener(address)
    except OSError as exc:
        raise CannotStart(f"cannot listen on {address} ({flag}): {exc.strerror or exc}") from None


def bind_listener(address: str) -> socket.socket:
    host, port = parse_listen(address)
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


def supervise(
    config: Config,
    url: str,
    listener: socket.socket | None,
    status: socket.socket | None,
    keeper: Callable[[], None] | None = None,
    tls: TlsSetup | None = None,
) -> None:
    cursor = Cursor(shared=True)  # one rotation for the workers of this machine
    stopping = False
    children: dict[int, int] = {}
    supervisor = os.getpid()
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

    def spawn(slot: int) -> None:
        # Signals stay blocked across fork so that a child never runs the supervisor's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                # The worker's loop takes SIGHUP over (certificate reload) when TLS is on.
                signal.signal(signal.SIGHUP, signal.SIG_IGN if tls else signal.SIG_DFL)
                die_with_parent()  # a SIGKILLed supervisor leaves no worker behind
                if os.getppid() != supervisor:
                    os._exit(0)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                code = 0
                try:
                    run_worker(config, url, cursor, slot, listener, status, keeper, tls)
                except BaseException:
                    log.exception("worker %d crashed", slot)
                    code = 1
                finally:
                    logging.shutdown()  # the last lines reach stderr (bounded: never hangs)
                    os._exit(code)
            children[pid] = slot
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def forward(signum: int, _frame: object) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if tls is not None:
        signal.signal(signal.SIGHUP, forward)  # every worker reloads its certificates
    for slot in range(config.workers):
        if stopping:
            break
        spawn(slot)
    log.info("supervising %d workers", len(children))
    last_restart = 0.0
    while children:
        try:
            pid, status_code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, -1)
        if slot < 0 or stopping:
            continue
        try:  # its counts stay summed, in one file for all
            snapshot.retire(fleet_instance.current(config).metrics_dir, pid)
        except Exception:  # bookkeeping (disk full, a bad file) never stops the supervisor
            log.exception("could not fold the metrics of worker pid %d", pid)
        log.error("worker %d (pid %d) exited with status %d; restarting it", slot, pid, status_code)
        cursor.recover(pid)
        if time.monotonic() - last_restart < 1.0:
            time.sleep(1.0)  # a crash loop must not spin
        last_restart = time.monotonic()
        if not stopping:
            spawn(slot)


def run_worker(
    config: Config,
    url: str,
    cursor: Cursor,
    worker: int = 0,
    listener: socket.socket | None = None,
    status: socket.socket | None = None,
    keeper: Callable[[], None] | None = None,
    tls: TlsSetup | None = None,
) -> None:
    # Requests free their objects by reference counting; the cyclic collector only has
    # long-lived state to scan, so it runs rarely and skips what startup created.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # A proxy holds two sockets per request in flight: take every descriptor allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(
        _worker(
            config, url, cursor, worker, listener=listener, status=status, keeper=keeper, tls=tls
        )
    )


async def _worker(
    config: Config,
    url: str,
    cursor: Cursor,
    worker: int = 0,
    on_listening: Callable[[ProxyContext], Coroutine[Any, Any, None]] | None = None,
    listener: socket.socket | None = None,
    status: socket.socket | None = None,
    keeper: Callable[[], None] | None = None,
    tls: TlsSetup | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    link = RedisLink(make_client(url, config.redis_timeout), redact(url))
    instance_id = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"

    def make_state(name: str) -> PoolState:
        # The --pool rotation is shared by this machine's workers; routed pools lease per worker.
        return PoolState(name, config, link, cursor if name == config.pool else Cursor(),
                         instance_id)  # fmt: skip

    default = make_state(config.pool)
    ctx = ProxyContext(
        config=config,
        table=RoutingTable.default(default, config.pool),
        pools={config.pool: default},
        access_log=access_log(config.access_log, config.log_format),
        loop=loop,
    )

    async def primed() -> None:
        lease = ctx.pools[config.pool].lease if config.pool in ctx.pools else None
        if lease is not None and not lease.cursor.values[1]:
            await lease.refill()

    publisher = Publisher(ctx, link, fleet_instance.current(config), worker)
    tls_listener = _tls_listener(ctx, tls, worker)
    route_sync = RouteSync(link, ctx, make_state, primed)
    background = [
        loop.create_task(route_sync.run()),
        loop.create_task(_sweep(ctx, tls_listener.tick if tls_listener else None)),
        loop.create_task(publisher.run()),
    ]
    if keeper is not None:
        background.append(loop.create_task(_keep_embedded_redis(keeper)))

    # The status listener comes first: /-/live answers while the pool is still unknown.
    status_server = None
    if config.status_listen:
        from redlb.status import StatusProtocol, status_routes  # prometheus only when needed

        routes = status_routes(ctx, publisher)
        status_server = await loop.create_server(
            lambda: StatusProtocol(routes),
            sock=status or bind_listener(config.status_listen),
        )
    admin_server = None
    admin_socket = fleet_instance.current(config).admin_socket
    if admin_socket is not None:
        from redlb.admin.server import admin_protocol

        admin_server = await loop.create_server(admin_protocol(ctx, url), sock=admin_socket)
    # Accept once the pool is known, so that a (re)started worker sharing the listening
    # socket does not answer 503 meanwhile; with Redis down, accept at once (503 quickly
    # beats connections waiting in the shared backlog).  A Redis that answered is waited
    # for while the first read goes on: 10,000 routes can take seconds on a slow machine.
    started = time.monotonic()
    while not ctx.known and not (link.answered_once and not link.up):
        waited = time.monotonic() - started
        if waited > STARTUP_LIMIT or (waited > STARTUP_GRACE and not route_sync.reading):
            break
        await asyncio.sleep(0.01)
    if ctx.known:
        # What the first read made (10,000 routes, 1,000 pools) lives as long as the worker:
        # out of the collector's sight, as the startup's objects are, or every full
        # collection would walk it (100+ ms with the loop held).  Collected first, before
        # accepting, so that no cycle of startup garbage is kept for good.
        gc.collect()
        gc.freeze()
    server = None
    if config.listen is not None:
        server = await loop.create_server(
            _plain_protocol(ctx), sock=listener or bind_listener(config.listen), backlog=4096
        )
    if tls_listener is not None and config.tls_listen is not None:
        await tls_listener.start(tls.sock if tls else bind_listener(config.tls_listen))
    ctx.listening = True
    background.append(loop.create_task(publisher.lag.run()))  # the lag requests can see
    log.info(
        "worker %d listening on %s (%s, strategy %s)%s; hot path %s",
        worker,
        _listening_on(config),
        f"pool {config.pool!r}" if ctx.table.single else f"{len(ctx.table.routes)} routes",
        f"round_robin, rotation {config.rotation}"
        if config.strategy == "round_robin"
        else config.strategy,
        f", status on {config.status_listen}" if config.status_listen else "",
        build.describe(),
    )

    if on_listening is not None:
        background.append(loop.create_task(on_listening(ctx)))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("worker %d draining: %d requests in flight", worker, ctx.active_exchanges)
    if server is not None:
        server.close()
    if tls_listener is not None:
        tls_listener.close()
    ctx.draining = True
    for client in list(ctx.clients):
        client.drain()
    # Done means every response is answered and handed to the kernel: a complete response
    # still buffered for a slow reader is not cut short (the send deadline bounds a reader
    # that stopped, the drain deadline everything).
    deadline = time.monotonic() + config.drain_timeout
    while time.monotonic() < deadline and (
        ctx.active_exchanges or not all(client.flushed() for client in ctx.clients)
    ):
        await asyncio.sleep(0.05)
    for client in list(ctx.clients):
        client.end_drain()
    for state in ctx.pools.values():
        state.close()
    if status_server is not None:
        status_server.close()
    if admin_server is not None:
        admin_server.close()
    await publisher.withdraw()
    await stop_tasks(background)
    ctx.access_log.close()
    with contextlib.suppress(Exception):
        await link.close()
    log.info("worker %d stopped", worker)


async def stop_tasks(tasks: list[asyncio.Task[Any]], attempts: int = 10) -> None:
    """Cancel the background tasks and wait for them, cancelling again those that go on.

    Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives as the call it
    waits for completes (a Redis reply in the same turn): the task then runs its next
    round as if never asked to stop, and a single cancel + gather waited for it forever
    (a worker that never exited after SIGTERM)."""
    pending = set(tasks)
    for _ in range(attempts):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in pending:
        log.warning("background task %s did not stop; leaving it", task.get_coro())


async def _keep_embedded_redis(ensure_running: Callable[[], None]) -> None:
    """Whichever instance notices the shared embedded Redis gone starts it again."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(1.0)
        try:
            await loop.run_in_executor(None, ensure_running)
        except Exception as exc:
            log.error("cannot restart the embedded Redis: %s", exc)


def _plain_protocol(ctx: ProxyContext) -> Callable[[], asyncio.Protocol]:
    config = ctx.config
    if config.redirect_https and config.tls_listen:
        from redlb.tls.listener import https_port
        from redlb.tls.redirect import RedirectProtocol

        port = https_port(config.tls_listen)
        return lambda: RedirectProtocol(config, port)
    return lambda: ClientConnection(ctx)


def _tls_listener(ctx: ProxyContext, tls: TlsSetup | None, worker: int) -> TlsListener | None:
    if ctx.config.tls_listen is None:
        return None
    from redlb.tls.listener import TlsListener

    if tls is not None:
        store = tls.store
    else:
        from redlb.tls.store import CertificateStore

        store = CertificateStore.load(ctx.config.tls_pairs)
    return TlsListener(ctx, store, worker)


def _listening_on(config: Config) -> str:
    plain = config.listen
    if plain is not None and config.redirect_https:
        plain += " (redirecting to https)"
    secure = f"https://{config.tls_listen}" if config.tls_listen else None
    return " and ".join(a for a in (plain, secure) if a)


async def _sweep(ctx: ProxyContext, tick: Callable[[float], None] | None = None) -> None:
    """One timer for every connection: deadlines are checked here, not armed per request.

    In slices, the loop free in between: a thousand pools or ten thousand connections
    checked in one go held it for milliseconds twice a second."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        now = time.monotonic()
        if tick is not None:
            tick(now)
        clients = ctx.clients
        for count, client in enumerate(list(clients), 1):
            if count % SWEEP_SLICE == 0:
                await asyncio.sleep(0)
            if client in clients:  # not closed while the loop ran
                client.check_timeouts(now)
        await asyncio.sleep(0)  # the connections, then each slice of pools: a turn each
        for chunk in slices(ctx.pools, SWEEP_POOLS_SLICE):
            for _, state in chunk:
                state.expire(now)
            await asyncio.sleep(0)
