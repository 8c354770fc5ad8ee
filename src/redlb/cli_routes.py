"""``redlb route`` and ``redlb pool``: edit the routes hash and per-pool settings in Redis.

They write exactly what a redis-cli user would (``HSET redlb:routes MATCH POOL``), after
checking it with the parser every redlb uses, then publish on the routes' events channel.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click
import redis

from redlb.address import InvalidAddress, parse_backend
from redlb.cli import _connect, _redis_options
from redlb.routing import BadRoute, RouteSpec, parse_match, parse_route
from redlb.routing.match import check_pool
from redlb.routing.settings import SETTINGS, parse_setting
from redlb.store.keys import ROUTES, ROUTES_EVENTS, Keys

P = ParamSpec("P")
R = TypeVar("R")


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _redis_errors(command: Callable[P, R]) -> Callable[P, R]:
    """A refusal from Redis (a key of the wrong type, a lost connection) is an error message,
    not a traceback."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except redis.ResponseError as exc:
            raise click.ClickException(
                f"Redis refused the command: {exc} (see `redis-cli TYPE KEY`)"
            ) from None
        except redis.RedisError as exc:
            raise click.ClickException(f"Redis failed: {exc}") from None

    return run


def _pool_name(name: str) -> str:
    try:
        check_pool(name)
    except BadRoute as exc:
        raise click.UsageError(f"{exc} (one Redis list key, no spaces)") from None
    return name


@click.group()
def route() -> None:
    """Route requests by host and path to pools (the hash redlb:routes)."""


@route.command("add")
@click.argument("match")
@click.argument("pool_name", metavar="POOL")
@click.option("--strip-prefix", is_flag=True, help="Remove the matched path prefix upstream.")
@click.option("--host-header", default=None, help="The Host header sent to the pool.")
@_redis_options
@_redis_errors
def route_add(
    match: str,
    pool_name: str,
    strip_prefix: bool,
    host_header: str | None,
    redis_url: str | None,
    pool: str,
    state_dir: str,
) -> None:
    """Send MATCH (host/path, *.example.com/, /api ...) to the list POOL."""
    _pool_name(pool_name)
    value = " ".join([pool_name, *(["strip-prefix"] if strip_prefix else [])]
                     + ([f"host={host_header}"] if host_header else []))  # fmt: skip
    try:
        spec = parse_route(match, value)
    except BadRoute as exc:
        raise click.UsageError(f"bad route {match!r} -> {value!r}: {exc}") from None
    client = _connect(redis_url, state_dir)
    field = str(spec.match)
    client.hset(ROUTES, field, spec.value())
    client.publish(ROUTES_EVENTS, "route")
    size = int(client.llen(spec.pool))
    note = "" if size else f" (the list {spec.pool!r} is empty: requests get 503 until filled)"
    click.echo(f"route {field} -> {spec.value()}{note}")


@route.command("rm")
@click.argument("match")
@_redis_options
@_redis_errors
def route_rm(match: str, redis_url: str | None, pool: str, state_dir: str) -> None:
    """Remove the route for MATCH."""
    client = _connect(redis_url, state_dir)
    fields = [match]
    with contextlib.suppress(BadRoute):
        wanted = parse_match(match)
        fields.append(str(wanted))
        # Also the fields a redis-cli user spelled otherwise (/api/, API.example.com/).
        for raw in client.hkeys(ROUTES):
            field = _text(raw)
            with contextlib.suppress(BadRoute):
                if parse_match(field) == wanted:
                    fields.append(field)
    removed = int(client.hdel(ROUTES, *dict.fromkeys(fields)))
    client.publish(ROUTES_EVENTS, "route")
    if not removed:
        raise click.ClickException(f"no route {match!r}")
    click.echo(f"removed route {match}")


@route.command("ls")
@_redis_options
@_redis_errors
def route_ls(redis_url: str | None, pool: str, state_dir: str) -> None:
    """List the routes, most specific first, with each pool's size and health."""
    client = _connect(redis_url, state_dir)
    raw = client.hgetall(ROUTES)
    specs: list[RouteSpec] = []
    for field, value in raw.items():
        try:
            specs.append(parse_route(_text(field), _text(value)))
        except BadRoute as exc:
            click.echo(f"{_text(field)[:60]:40} INVALID ({exc})")
    if not specs and not raw:
        click.echo(f"no routes: everything goes to the pool {pool!r}")
        return
    health: dict[str, str] = {}  # many routes share a pool: ask Redis once per pool
    for spec in sorted(specs, key=lambda s: s.match.priority, reverse=True):
        if spec.pool not in health:
            health[spec.pool] = _pool_health(client, spec.pool)
        click.echo(f"{spec.match!s:40} {spec.value():30} {health[spec.pool]}")


def _pool_health(client: Any, name: str) -> str:
    keys = Keys(name)
    backends = []
    for raw in client.lrange(name, 0, -1) if client.type(name) == b"list" else []:
        try:
            backends.append(parse_backend(raw))
        except InvalidAddress:
            continue
    if not backends:
        return "0 backends (503)"
    draining = {_text(m) for m in client.smembers(keys.draining)}
    health = client.mget([keys.health(b) for b in backends])
    ejected = [client.exists(keys.ejected(b)) for b in backends]
    usable = sum(
        1
        for b, h, e in zip(backends, health, ejected, strict=True)
        if h != b"down" and not e and b.key not in draining
    )
    return f"{len(backends)} backends, {usable} usable"


@click.group("pool")
def pool_group() -> None:
    """Per-pool settings over the serve flags (the hash redlb:POOL:settings)."""


@pool_group.command("set")
@click.argument("pool_name", metavar="POOL")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@_redis_options
@_redis_errors
def pool_set(
    pool_name: str, assignments: tuple[str, ...], redis_url: str | None, pool: str, state_dir: str
) -> None:
    """Set settings of POOL (KEY= with no value removes one); all or nothing."""
    _pool_name(pool_name)
    to_set: dict[str, str] = {}
    to_clear: list[str] = []
    for item in assignments:
        key, eq, value = item.partition("=")
        if not eq:
            raise click.UsageError(f"{item!r}: write KEY=VALUE (keys: {', '.join(SETTINGS)})")
        if not value:
            if key not in SETTINGS:
                raise click.UsageError(f"unknown pool setting {key!r}")
            to_clear.append(key)
            continue
        try:
            parse_setting(key, value)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        to_set[key] = value
    client = _connect(redis_url, state_dir)
    keys = Keys(pool_name)
    pipe = client.pipeline(transaction=True)  # every key or none
    if to_set:
        pipe.hset(keys.settings, mapping=to_set)  # type: ignore[arg-type]
    if to_clear:
        pipe.hdel(keys.settings, *to_clear)
    pipe.publish(keys.events, "settings")
    pipe.execute()
    shown = [f"{k}={v}" for k, v in to_set.items()] + [f"{k} unset" for k in to_clear]
    click.echo(f"pool {pool_name}: {', '.join(shown)}")


@pool_group.command("show")
@click.argument("pool_name", metavar="POOL")
@_redis_options
@_redis_errors
def pool_show(pool_name: str, redis_url: str | None, pool: str, state_dir: str) -> None:
    """Show POOL's settings (unset ones follow the serve flags) and its backends."""
    _pool_name(pool_name)
    client = _connect(redis_url, state_dir)
    keys = Keys(pool_name)
    raw = {_text(k): _text(v) for k, v in client.hgetall(keys.settings).items()}
    for key, (_, _, help_text) in SETTINGS.items():
        value = raw.pop(key, None)
        if value is None:
            click.echo(f"{key:18} (serve flag)      {help_text}")
            continue
        try:
            parse_setting(key, value)
            click.echo(f"{key:18} {value:16} {help_text}")
        except ValueError as exc:
            click.echo(f"{key:18} {value[:16]:16} INVALID, skipped: {exc}")
    for key, value in raw.items():
        click.echo(f"{key[:18]:18} {value[:16]:16} INVALID, skipped: unknown setting")
    click.echo(f"backends: {_pool_health(client, pool_name)}")
