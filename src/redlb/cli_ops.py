"""``redlb status``, ``redlb top`` and ``redlb config``: the fleet from Redis, the config file.

status and top read exactly what the admin API serves (fleet/view.py), so the terminal, the
API and the dashboard never disagree.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from redlb.cli import _redis_options, build_config, serve
from redlb.fleet import view
from redlb.store.client import make_client, redact
from redlb.store.embedded import running_url

STATE_STYLE = {"healthy": "green", "down": "bold red", "ejected": "red", "draining": "yellow"}


def _url(redis_url: str | None, state_dir: str) -> str:
    url = redis_url or running_url(state_dir)
    if url is None:
        raise click.ClickException(
            f"no --redis given and no embedded Redis is running in {state_dir}/ "
            "(start `redlb serve` first, or pass --redis URL)"
        )
    return url


async def _overview(url: str, pool: str) -> dict[str, Any]:
    client = make_client(url, 2.0)
    try:
        return await view.overview(client, [pool])
    finally:
        await client.aclose()


def fetch(url: str, pool: str) -> dict[str, Any]:
    try:
        return asyncio.run(_overview(url, pool))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the fleet from {redact(url)}: {exc}") from None
    except Exception as exc:  # redis errors
        if exc.__class__.__module__.startswith("redis"):
            raise click.ClickException(
                f"cannot read the fleet from {redact(url)}: {exc.__class__.__name__}: {exc}"
            ) from None
        raise


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(data: dict[str, Any]) -> Group:
    now = data["time"]
    instances = Table(title=f"Instances ({len(data['instances'])})", title_justify="left")
    for name in ("instance", "host", "version", "workers", "listen", "up", "req/s",
                 "in flight", "5xx", "redis ms"):  # fmt: skip
        instances.add_column(name, justify="right" if name in ("workers", "req/s") else "left")
    for i in data["instances"]:
        instances.add_row(
            i["id"], i["host"], i["version"], str(i["workers"]), " ".join(i["listen"]),
            f"{now - i['started']:.0f}s", f"{i['requests_per_second']:.1f}",
            str(i["active_requests"]), f"{i['error_rate']:.1%}", f"{i['redis_latency_ms']:.1f}",
        )  # fmt: skip
    routes = Table(title=f"Routes ({len(data['routes'])})", title_justify="left")
    for name in ("match", "pool", "options"):
        routes.add_column(name)
    for r in data["routes"]:
        options = " ".join(
            (["strip-prefix"] if r["strip_prefix"] else [])
            + ([f"host={r['host_header']}"] if r["host_header"] else [])
        )
        routes.add_row(r["match"], r["pool"], options)
    for bad in data["invalid_routes"]:
        routes.add_row(bad["match"], bad["value"], f"[red]INVALID: {bad['error']}[/red]")
    backends = Table(title="Backends", title_justify="left")
    for name in ("pool", "backend", "state", "weight", "in flight", "req/s", "5xx (1 min)",
                 "p50 ms", "p99 ms"):  # fmt: skip
        backends.add_column(
            name, justify="left" if name in ("pool", "backend", "state") else "right"
        )
    for pool in data["pools"]:
        if pool.get("error"):
            backends.add_row(
                pool["name"], "-", f"[red]{pool['error']}[/red]", "", "", "", "", "", ""
            )
        if not pool["backends"] and not pool.get("error"):
            backends.add_row(pool["name"], "-", "[red]empty (503)[/red]", "", "", "", "", "", "")
        for b in pool["backends"]:
            state = b["state"]
            if b["ejected_for"]:
                state += f" {b['ejected_for']:.0f}s"
            backends.add_row(
                pool["name"], b["address"], f"[{STATE_STYLE[b['state']]}]{state}[/]",
                str(b["weight"]), str(b["in_flight"]), f"{b['requests_per_second']:.1f}",
                f"{b['error_rate']:.1%}", _ms(b["p50_ms"]), _ms(b["p99_ms"]),
            )  # fmt: skip
        for bad in pool["invalid"]:
            backends.add_row(pool["name"], bad["entry"], f"[red]INVALID: {bad['error']}[/red]",
                             "", "", "", "", "", "")  # fmt: skip
    return Group(instances, routes, backends)


@click.command()
@_redis_options
@click.option("--json", "as_json", is_flag=True, help="The same data as the admin API.")
def status(redis_url: str | None, pool: str, state_dir: str, as_json: bool) -> None:
    """The fleet: instances, routes, pools and backends with their state and live rates."""
    data = fetch(_url(redis_url, state_dir), pool)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    Console().print(render(data))


@click.command()
@_redis_options
@click.option("--interval", type=click.FloatRange(0.2, 60), default=1.0, show_default=True)
@click.option("--count", type=click.IntRange(0), default=0, help="Refreshes, then exit (0: ∞).")
def top(redis_url: str | None, pool: str, state_dir: str, interval: float, count: int) -> None:
    """`redlb status`, refreshed every second until Ctrl-C."""
    url = _url(redis_url, state_dir)
    console = Console()
    shown = 0
    last: Group | None = None

    def frame() -> Group:
        # A failed read after the first is shown over the last good view, and the next
        # refresh tries again: top is for watching an incident, Redis failing included.
        nonlocal last
        try:
            last = render(fetch(url, pool))
            return last
        except click.ClickException as exc:
            if last is None:
                raise
            return Group(Text(f"{exc.format_message()} (retrying)", style="bold red"), last)

    with Live(frame(), console=console, auto_refresh=False) as live:
        try:
            while True:
                shown += 1
                if count and shown >= count:
                    break
                time.sleep(interval)
                live.update(frame(), refresh=True)
        except KeyboardInterrupt:
            pass


@click.group("config")
def config_group() -> None:
    """Check a config file, or show the settings serve would use."""


def _resolve(path: str | None) -> Any:
    """Flags none, then env REDLB_*, then the file, then defaults: what serve would run with."""
    args = ["--config", path] if path else []
    with serve.make_context("serve", args) as ctx:
        options = dict(ctx.params)
    options.pop("verbose", None)
    return build_config(options)


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Exit 0 if FILE is a valid serve configuration, else name the line that is not."""
    _resolve(path)
    click.echo(f"{path}: ok")


@config_group.command("show")
@click.option("--config", "path", type=click.Path(dir_okay=False), envvar="REDLB_CONFIG")
def config_show(path: str | None) -> None:
    """The effective serve settings (env REDLB_*, then the file, then defaults); secrets hidden."""
    config = _resolve(path)
    for name in config.__dataclass_fields__:
        value = getattr(config, name)
        if name == "admin_token":
            value = "(set)" if value else None
        elif name == "redis_url" and value:
            value = redact(value)
        elif isinstance(value, frozenset):
            value = sorted(value)
        click.echo(f"{name} = {json.dumps(value)}")
