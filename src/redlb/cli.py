"""The command line: parse arguments into a Config and hand it over; no logic of its own."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from redlb import __version__
from redlb.address import InvalidAddress, parse_backend
from redlb.config import STRATEGIES, Config
from redlb.configfile import config_option
from redlb.logs import setup_logging
from redlb.store.client import auth_problem, make_sync_client, redact
from redlb.store.embedded import running_url
from redlb.store.keys import Keys


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    setup_logging(verbose)
    if log_format == "json":
        import logging

        from redlb.jsonlog import JsonFormatter

        for handler in logging.getLogger().handlers:
            target = getattr(handler, "target", handler)  # the writer thread's handler
            target.setFormatter(JsonFormatter())


class Finite(click.ParamType):  # type: ignore[type-arg]
    """A finite number (seconds, percent) within [low, high]; nan and inf are refused."""

    name = "number"

    def __init__(self, low: float, high: float = 86_400.0, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        too_low = number <= self.low if self.low_open else number < self.low
        if not math.isfinite(number) or too_low or number > self.high:
            low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
            self.fail(f"{value} is not {low} and <= {self.high:g}", param, ctx)
        return number


class NonEmpty(click.ParamType):  # type: ignore[type-arg]
    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip():
            self.fail("must not be empty", param, ctx)
        return text


def _count(low: int, high: int = 1 << 31) -> click.IntRange:
    return click.IntRange(low, high)


MAX_WORKERS_PER_CPU = 4


# Commands in modules of their own, imported when named (or listed by --help): a worker
# (`redlb serve`) never carries their imports (rich, the fleet view, the route editor).
LAZY_COMMANDS = {
    "config": ("redlb.cli_ops", "config_group"),
    "pool": ("redlb.cli_routes", "pool_group"),
    "route": ("redlb.cli_routes", "route"),
    "status": ("redlb.cli_ops", "status"),
    "top": ("redlb.cli_ops", "top"),
}


class OneLineErrors(click.Group):
    """Every usage or runtime error is one line on stderr (exit 2 for usage, 1 otherwise)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in LAZY_COMMANDS:
            module, name = LAZY_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), name)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            sys.exit(130)
        except redis.RedisError as exc:  # e.g. WRONGTYPE on a key redlb did not check first
            click.echo(f"Error: Redis answered: {_first_line(exc)}", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _first_line(exc: BaseException) -> str:
    """redis-py's message without the client repr some errors append (" : <redis.client...")."""
    return str(exc).partition(" : <")[0].strip().splitlines()[0] if str(exc) else repr(exc)


def _redis_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--state-dir", default=".redlb", type=NonEmpty(), show_default=True,
        help="Where the embedded Redis keeps its data.",
    )(func)  # fmt: skip
    func = click.option(
        "--pool", default="servers", type=NonEmpty(), show_default=True, help="The Redis list key."
    )(func)
    func = click.option(
        "--redis", "redis_url", envvar="REDLB_REDIS", default=None,
        help="redis://, rediss://, unix:// or redis+sentinel://h:p,h:p/master "
        "(env REDLB_REDIS keeps a password off the command line). "
        "Default: an embedded redis-server.",
    )(func)  # fmt: skip
    return func


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="redlb", message="%(prog)s %(version)s")
def main() -> None:
    """redlb: an HTTP load balancer whose backend pool lives in a Redis list."""


# Every serve flag can come from REDLB_<NAME> (REDLB_MAX_BODY=...) or a --config file.
@main.command(context_settings={"auto_envvar_prefix": "REDLB"})
@config_option(lambda: serve_command())
@click.option(
    "--listen",
    default="127.0.0.1:8000",
    show_default=True,
    help="host:port to serve plain HTTP on; 'off' to serve only --tls-listen.",
)
# TLS termination (tls/)
@click.option("--tls-listen", default=None, help="host:port to serve HTTPS on (TLS termination).")
@click.option(
    "--tls-cert",
    "tls_certs",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="PEM certificate (then its chain) for --tls-listen; repeatable, paired in order with "
    "--tls-key. SNI picks by the names in each certificate; the first is the default.",
)
@click.option(
    "--tls-key",
    "tls_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="PEM private key of the --tls-cert at the same position (unencrypted).",
)
@click.option(
    "--redirect-https",
    is_flag=True,
    help="The --listen listener redirects every request to https (301, 308 for non-GET).",
)
@_redis_options
@click.option(
    "--rotation",
    type=click.Choice(["lease", "strict"]),
    default="lease",
    show_default=True,
    help="lease: shared counter leased in blocks, no Redis on the request path; "
    "strict: exact shared rotation, one counter value per request.",
)
@click.option(
    "--strategy",
    type=click.Choice(list(STRATEGIES)),
    default="round_robin",
    show_default=True,
    help="How the default pool picks a backend (README: Strategies); per pool: redlb pool set.",
)
@click.option(
    "--hash-key",
    default="ip",
    show_default=True,
    help="What --strategy hash hashes: ip, path, header:NAME, cookie:NAME or query:NAME.",
)
@click.option(
    "--hash-balance",
    type=Finite(0, 10),
    default=0.25,
    show_default=True,
    help="Bounded loads for hash: no backend over (1 + this) x the average load; 0 = off.",
)
@click.option(
    "--sticky-cookie",
    "sticky",
    default=None,
    help="Sticky sessions: the name of the cookie that sends a client back to its backend.",
)
@click.option(
    "--slow-start",
    type=Finite(0, 3600),
    default=0.0,
    show_default=True,
    help="Seconds over which a backend that joins or recovers ramps up to its weight.",
)
@click.option(
    "--workers",
    type=_count(1),
    default=None,
    help=f"Worker processes (default: CPU count; more than {MAX_WORKERS_PER_CPU} per CPU "
    "needs --force-workers).",
)
@click.option("--force-workers", is_flag=True, help="Allow --workers beyond 4 per CPU.")
@click.option(
    "--hipache",
    is_flag=True,
    help="Route by Hipache's frontend:HOST lists (identifier, then backend URLs).",
)
@click.option(
    "--status-listen",
    default="127.0.0.1:8100",
    show_default=True,
    help="Loopback host:port for /-/ready, /-/live, /metrics; 'off' to disable.",
)
@click.option("--no-access-log", is_flag=True, help="Do not log one line per request.")
@click.option(
    "--max-body",
    type=_count(0),
    default=10 * 1024 * 1024,
    show_default=True,
    help="Largest request body in bytes (413 beyond); 0 = unlimited.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    type=NonEmpty(),
    help="Answer only for this Host (repeatable); others get 421. Default: any.",
)
@click.option("--max-request-line", type=_count(16, 1 << 20), default=8192, show_default=True)
@click.option("--max-header-bytes", type=_count(64, 1 << 24), default=16384, show_default=True)
@click.option("--max-headers", type=_count(1, 10_000), default=100, show_default=True)
@click.option(
    "--header-timeout",
    type=Finite(0, low_open=True),
    default=10.0,
    show_default=True,
    help="Seconds for the whole request header phase (408 after).",
)
@click.option(
    "--body-min-rate",
    type=_count(0),
    default=500,
    show_default=True,
    help="Minimum upload rate in bytes/s after the grace period (0 = off).",
)
@click.option("--body-rate-grace", type=Finite(0), default=10.0, show_default=True)
@click.option("--keepalive-timeout", type=Finite(0, low_open=True), default=15.0, show_default=True)
@click.option("--connect-timeout", type=Finite(0, low_open=True), default=3.0, show_default=True)
@click.option(
    "--upstream-timeout",
    type=Finite(0, low_open=True),
    default=60.0,
    show_default=True,
    help="Seconds a backend may take to answer (and between body reads).",
)
@click.option(
    "--send-timeout",
    type=Finite(0, low_open=True),
    default=60.0,
    show_default=True,
    help="Seconds a client may leave a response unread before it is cut off.",
)
@click.option(
    "--max-conns-per-backend",
    type=_count(0),
    default=1024,
    show_default=True,
    help="Connections per backend (0 = no cap); past it, requests wait in line.",
)
@click.option(
    "--max-queue-per-backend",
    type=_count(0),
    default=1024,
    show_default=True,
    help="Requests that may wait for a backend connection; beyond, 503.",
)
@click.option(
    "--queue-timeout",
    type=Finite(0, low_open=True),
    default=3.0,
    show_default=True,
    help="Seconds a request may wait for a backend connection (503 after).",
)
@click.option(
    "--drain-timeout",
    type=Finite(0),
    default=30.0,
    show_default=True,
    help="Seconds in-flight requests get to finish after SIGTERM.",
)
@click.option(
    "--tunnel-timeout",
    type=Finite(0, low_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds a WebSocket tunnel may carry no byte either way before it is closed.",
)
@click.option("--redis-timeout", type=Finite(0.01), default=0.25, show_default=True)
@click.option("--resync-interval", type=Finite(0.05), default=1.0, show_default=True)
@click.option("--health-path", default=None, help="Enable active health checks on this path.")
@click.option("--health-interval", type=Finite(0.1), default=2.0, show_default=True)
@click.option("--health-timeout", type=Finite(0.01), default=1.0, show_default=True)
@click.option("--health-rise", type=_count(1, 1000), default=2, show_default=True)
@click.option("--health-fall", type=_count(1, 1000), default=3, show_default=True)
@click.option(
    "--eject-consecutive",
    type=_count(0),
    default=5,
    show_default=True,
    help="Consecutive connect failures/5xx that eject a backend (0 = never).",
)
@click.option(
    "--eject-on-5xx/--no-eject-on-5xx",
    default=True,
    show_default=True,
    help="Whether 5xx answers count toward ejection (connect failures always do).",
)
@click.option("--eject-base-time", type=Finite(0, low_open=True), default=30.0, show_default=True)
@click.option("--eject-max-percent", type=Finite(0, 100), default=50.0, show_default=True)
@click.option("--retry-budget-percent", type=Finite(0, 100), default=20.0, show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Access log and event log lines as text or one JSON object each.",
)
@click.option(
    "--admin-listen",
    default=None,
    help="host:port for the admin API and dashboard (off by default); off loopback it "
    "needs a token.",
)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding the admin API token (or env REDLB_ADMIN_TOKEN; never a flag).",
)
# TLS to https:// backends
@click.option(
    "--upstream-ca",
    type=click.Path(dir_okay=False),
    default=None,
    help="Trust only this CA bundle (PEM) for https:// backends (default: the system store).",
)
@click.option(
    "--upstream-insecure",
    is_flag=True,
    help="Do not verify https:// backends' certificates at all (warned at startup).",
)
@click.option("-v", "--verbose", is_flag=True)
def serve(**options: Any) -> None:
    """Serve HTTP, balancing over the backends in the Redis list."""
    _setup_logging(options.pop("verbose"), options["log_format"])
    config = build_config(options)
    if config.upstream_insecure:
        import logging

        logging.getLogger("redlb.backend_tls").warning(
            "--upstream-insecure: the certificates of https:// backends are NOT verified"
        )
    from redlb.server import CannotStart
    from redlb.server import serve as run

    try:
        run(config)
    except CannotStart as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot serve: {exc}") from None


def build_config(options: dict[str, Any]) -> Config:
    """The serve options (flags, env, file, defaults already merged by click) -> a Config."""
    from redlb.admin.auth import TokenError, load_token

    # An empty value is a mistake (`--flag "$UNSET"`), not "off": refused like --listen's.
    for key in ("status_listen", "admin_listen", "admin_token_file", "config"):
        value = options.get(key)
        if value is not None and not str(value).strip():
            flag = "--" + key.replace("_", "-")
            raise click.BadParameter("must not be empty ('off' turns a listener off)",
                                     param_hint=f"'{flag}'")  # fmt: skip
    options.pop("config", None)
    try:
        admin_token = load_token(options.pop("admin_token_file", None))
    except TokenError as exc:
        raise click.UsageError(str(exc)) from None
    status = options.pop("status_listen")
    hosts = options.pop("hosts")
    workers = options.pop("workers")
    admin = options.pop("admin_listen")
    force_workers = options.pop("force_workers")
    listen, tls_pairs = _listeners(options)
    cpus = os.cpu_count() or 1
    if workers is not None and workers > MAX_WORKERS_PER_CPU * cpus and not force_workers:
        raise click.BadParameter(
            f"{workers} is more than {MAX_WORKERS_PER_CPU} per CPU ({cpus} CPUs); "
            "add --force-workers if you mean it",
            param_hint="'--workers'",
        )
    config = Config(
        **{k: v for k, v in options.items() if k != "no_access_log"},
        access_log=not options["no_access_log"],
        status_listen=None if status == "off" else status,
        allowed_hosts=frozenset(h.lower() for h in hosts),
        admin_listen=None if admin in (None, "off") else _admin_address(admin),
        admin_token=admin_token,
        listen=listen,
        tls_pairs=tls_pairs,
    )
    if workers is not None:
        config.workers = workers
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if config.redis_url is not None:
        _check_url(config.redis_url)
    _check_certificates(config)
    _check_upstream_tls(config)
    return config


def _listeners(options: dict[str, Any]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """--listen (off = none) and the --tls-cert/--tls-key pairs, popped from ``options``."""
    listen = options.pop("listen")
    certs, keys = options.pop("tls_certs"), options.pop("tls_keys")
    if len(certs) != len(keys):
        raise click.BadParameter(
            f"{len(certs)} --tls-cert and {len(keys)} --tls-key: give them in pairs",
            param_hint="'--tls-cert'/'--tls-key'",
        )
    return (None if listen == "off" else listen), tuple(zip(certs, keys, strict=True))


def _check_certificates(config: Config) -> None:
    """A pair that cannot serve is a usage error, said before anything starts."""
    if not config.tls_pairs:
        return
    from redlb.tls.certificates import CertificateError, load

    for cert, key in config.tls_pairs:
        try:
            load(cert, key)
        except CertificateError as exc:
            raise click.BadParameter(str(exc), param_hint="'--tls-cert'/'--tls-key'") from None


def _check_upstream_tls(config: Config) -> None:
    """A CA file that cannot be loaded stops serve (and config check) before it starts."""
    import ssl

    from redlb.backend_tls import client_context

    if config.upstream_ca is not None:
        try:
            client_context(config.upstream_ca, False)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise click.BadParameter(
                f"cannot load {config.upstream_ca!r}: {reason}", param_hint="'--upstream-ca'"
            ) from None


def serve_command() -> click.Command:
    return serve


def _admin_address(text: str) -> str:
    """A bare port means loopback: ``--admin-listen 8200`` is 127.0.0.1:8200."""
    return f"127.0.0.1:{text}" if text.isdigit() else text


def _check_url(url: str) -> None:
    """A malformed --redis is a usage error, said before anything starts (no traceback)."""
    try:
        make_sync_client(url, 1.0).close()
    except (ValueError, redis.RedisError) as exc:
        raise click.BadParameter(f"{redact(url)!r}: {exc}", param_hint="'--redis'") from None


@main.group()
def backend() -> None:
    """Edit the pool: the same Redis list redis-cli sees."""


def _connect(redis_url: str | None, state_dir: str) -> redis.Redis:
    url = redis_url or running_url(state_dir)
    if url is None:
        raise click.ClickException(
            f"no --redis given and no embedded Redis is running in {state_dir}/ "
            "(start `redlb serve` first, or pass --redis URL)"
        )
    try:
        client = make_sync_client(url, 2.0)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        problem = auth_problem(exc)
        if problem is not None:
            raise click.ClickException(f"{problem} (at {redact(url)})") from None
        raise click.ClickException(
            f"cannot reach Redis at {redact(url)}: {_first_line(exc)}"
        ) from None
    return client


def _validated(addr: str) -> str:
    try:
        return parse_backend(addr).key
    except InvalidAddress as exc:
        raise click.UsageError(f"{addr!r} is not a backend address: {exc}") from None


def _entries(client: redis.Redis, pool: str) -> list[bytes]:
    """The pool's raw entries; a key of another type is one clear error, not a traceback."""
    keys = Keys(pool)
    for key, wanted in ((pool, b"list"), (keys.draining, b"set"), (keys.weights, b"hash")):
        kind = client.type(key)
        if kind not in (wanted, b"none"):
            text = kind.decode() if isinstance(kind, bytes) else str(kind)
            raise click.ClickException(
                f"{key!r} is a Redis {text}, not a {wanted.decode()}: "
                "fix it with redis-cli (or use another --pool)"
            )
    return [bytes(e) for e in client.lrange(pool, 0, -1)]  # type: ignore[arg-type]


def _readable(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _key_of(raw: str | bytes) -> str | None:
    try:
        return parse_backend(raw).key
    except InvalidAddress:
        return None


def _taking_traffic(client: redis.Redis, pool: str, entries: list[bytes]) -> set[str]:
    """Pool members that are neither draining, ejected nor reported down."""
    keys = Keys(pool)
    draining = {_readable(m) for m in client.smembers(keys.draining)}  # type: ignore[arg-type]
    found = set()
    for raw in entries:
        try:
            b = parse_backend(raw)
        except InvalidAddress:
            continue
        if (
            b.key in draining
            or client.exists(keys.ejected(b))
            or client.get(keys.health(b)) == b"down"
        ):
            continue
        found.add(b.key)
    return found


@backend.command("add")
@click.argument("addr")
@click.option("--allow-duplicate", is_flag=True, help="Add ADDR again (it gets another share).")
@_redis_options
def backend_add(
    addr: str, allow_duplicate: bool, redis_url: str | None, pool: str, state_dir: str
) -> None:
    """Append ADDR (host:port, http://host:port, https://host:port or [::1]:port) to the pool."""
    key = _validated(addr)
    client = _connect(redis_url, state_dir)
    if not allow_duplicate and key in {_key_of(raw) for raw in _entries(client, pool)}:
        raise click.ClickException(
            f"{key} is already in {pool} (--allow-duplicate gives it a second share)"
        )
    client.rpush(pool, key)
    client.publish(Keys(pool).events, "edit")
    click.echo(f"added {key} to {pool}")


@backend.command("rm")
@click.argument("addr")
@click.option("--raw", is_flag=True, help="Remove entries whose text is exactly ADDR.")
@_redis_options
def backend_rm(addr: str, raw: bool, redis_url: str | None, pool: str, state_dir: str) -> None:
    """Remove every entry of the pool that names ADDR (or, malformed, reads exactly ADDR)."""
    client = _connect(redis_url, state_dir)
    entries = _entries(client, pool)
    exact = {entry for entry in entries if _readable(entry) == addr}
    if raw or (exact and _key_of(addr.encode()) is None):
        targets, name = exact, addr
    else:
        name = _validated(addr)
        targets = {entry for entry in entries if _key_of(entry) == name} | exact
    removed = 0
    for entry in targets:
        removed += int(client.lrem(pool, 0, entry))  # type: ignore[arg-type]
    if removed and name in {_key_of(entry) for entry in targets}:
        client.hdel(Keys(pool).weights, name)  # gone from the list: its weight goes too
    client.publish(Keys(pool).events, "edit")
    if not removed:
        raise click.ClickException(f"{name} is not in {pool}")
    click.echo(f"removed {name} from {pool} ({removed} entr{'y' if removed == 1 else 'ies'})")
    if not client.llen(pool):
        click.echo(f"warning: {pool} is now empty (requests get 503)", err=True)


@backend.command("ls")
@_redis_options
def backend_ls(redis_url: str | None, pool: str, state_dir: str) -> None:
    """List the pool with each entry's state."""
    client = _connect(redis_url, state_dir)
    keys = Keys(pool)
    entries = _entries(client, pool)
    draining = set(client.smembers(keys.draining))
    weights = {_key_of(k): int(v) for k, v in client.hgetall(keys.weights).items() if v.isdigit()}
    for raw in entries:
        try:
            b = parse_backend(raw)
        except InvalidAddress as exc:
            click.echo(f"{_readable(raw):30} INVALID ({exc}; remove with: rm --raw TEXT)")
            continue
        state = []
        if client.exists(keys.ejected(b)):
            state.append(f"ejected {client.pttl(keys.ejected(b)) / 1000:.0f}s")
        health = client.get(keys.health(b))
        if health:
            state.append(health.decode() if isinstance(health, bytes) else str(health))
        if b.key.encode() in draining:
            state.append("draining")
        if weights.get(b.key, 1) != 1:
            state.append(f"weight {weights[b.key]}")
        click.echo(f"{b.key:30} {', '.join(state) or 'ok'}")
    if not entries:
        click.echo(f"warning: {pool} is empty (requests get 503)", err=True)
    elif not _taking_traffic(client, pool, entries):
        click.echo(f"warning: no backend in {pool} takes traffic (requests get 503)", err=True)


@backend.command("weight")
@click.argument("addr")
@click.argument("weight", type=int)
@_redis_options
def backend_weight(
    addr: str, weight: int, redis_url: str | None, pool: str, state_dir: str
) -> None:
    """Give ADDR a weight of WEIGHT (1..1000; 1 is the default) in the pool."""
    from redlb.store.weights import parse_weight

    key = _validated(addr)
    try:
        parse_weight(str(weight))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    client = _connect(redis_url, state_dir)
    _entries(client, pool)  # a pool or weights key of the wrong type: one line, nothing written
    keys = Keys(pool)
    if weight == 1:
        client.hdel(keys.weights, key)
    else:
        client.hset(keys.weights, key, str(weight))
    client.publish(keys.events, "weight")
    click.echo(f"{key} has weight {weight} in {pool}")


@backend.command("drain")
@click.argument("addr")
@click.option("--force", is_flag=True, help="Drain even the last backend taking traffic.")
@_redis_options
def backend_drain(addr: str, force: bool, redis_url: str | None, pool: str, state_dir: str) -> None:
    """Stop new traffic to ADDR; its in-flight requests finish."""
    key = _validated(addr)
    client = _connect(redis_url, state_dir)
    keys = Keys(pool)
    # Checked and written as one (WATCH, as the admin API): two drains of the last two
    # backends at once must not both find the other one taking traffic.
    for _ in range(10):
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(pool, keys.draining)  # type: ignore[no-untyped-call]
            entries = _entries(pipe, pool)  # immediate mode while watching
            if key not in {_key_of(raw) for raw in entries}:
                raise click.ClickException(f"{key} is not in {pool}")
            if _taking_traffic(pipe, pool, entries) <= {key} and not force:
                raise click.ClickException(
                    f"{key} is the last backend taking traffic in {pool}; draining it means "
                    "503 for every request (--force to drain it anyway)"
                )
            pipe.multi()
            pipe.sadd(keys.draining, key)
            pipe.publish(keys.events, "drain")
            try:
                pipe.execute()
            except redis.WatchError:
                continue  # the pool or the draining set changed meanwhile: look again
        click.echo(f"draining {key}")
        return
    raise click.ClickException(f"{pool} kept changing; try again")


@backend.command("undrain")
@click.argument("addr")
@_redis_options
def backend_undrain(addr: str, redis_url: str | None, pool: str, state_dir: str) -> None:
    """Send traffic to ADDR again."""
    key = _validated(addr)
    client = _connect(redis_url, state_dir)
    _entries(client, pool)
    if not client.sismember(Keys(pool).draining, key):
        raise click.ClickException(f"{key} is not draining in {pool}")
    _set_draining(client, pool, key, draining=False)
    click.echo(f"{key} takes traffic again")


def _set_draining(client: redis.Redis, pool: str, key: str, draining: bool) -> None:
    keys = Keys(pool)
    if draining:
        client.sadd(keys.draining, key)
    else:
        client.srem(keys.draining, key)
    client.publish(keys.events, "drain")


@main.command()
@click.option("--listen", default="127.0.0.1:8000", show_default=True)
@click.option("--state-dir", default=".redlb/demo", show_default=True)
@click.option("--requests", "count", type=_count(0, 10_000), default=10, show_default=True)
@click.option("--exit", "exit_after", is_flag=True, help="Stop after the requests (no serving).")
def demo(listen: str, state_dir: str, count: int, exit_after: bool) -> None:
    """Embedded Redis, three demo backends, the balancer, and ten requests to watch rotate."""
    _setup_logging(False)
    from redlb.demo import run_demo

    run_demo(listen, state_dir, count, exit_after)
