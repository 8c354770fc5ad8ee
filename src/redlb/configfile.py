"""``redlb serve --config redlb.toml``: every serve flag in a TOML file.

Rules:
1. One precedence order: command-line flags > ``REDLB_*`` environment variables > the file
   > built-in defaults (click's own order, with the file as its ``default_map``).
2. A key is a flag's name without the dashes (``max-body = 1048576``; a switch is
   ``eject-on-5xx = false``).  An unknown key, a wrong type or a refused value stops
   everything, naming the file and the line: nothing starts half-configured.
3. No secret belongs in argv: the admin token only comes from ``admin-token-file`` or
   ``REDLB_ADMIN_TOKEN``; a Redis password is best kept in ``REDLB_REDIS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Not settable from a file: the file itself.
NOT_IN_FILE = frozenset({"config"})


class ConfigFileError(click.ClickException):
    """A file that cannot be used, with its name and (when known) the line."""

    exit_code = 2  # a usage error, as the same value given as a flag or REDLB_* variable


def file_keys(command: click.Command) -> dict[str, tuple[click.Option, bool]]:
    """TOML key -> (option, whether the key is the negative spelling of a switch)."""
    keys: dict[str, tuple[click.Option, bool]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_IN_FILE:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = (param, False)
        for opt in param.secondary_opts:
            if opt.startswith("--"):
                keys[opt[2:]] = (param, True)
    return keys


def load(path: str, command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """The file as click parameter values (the ``default_map``), every value checked."""
    import tomllib  # only with --config: a worker started without one never needs it

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    keys = file_keys(command)
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}:{_line_of(text, key)}"
        if key not in keys:
            close = _suggest(key, keys)
            raise ConfigFileError(f"{where}: unknown key {key!r}{close}")
        option, negative = keys[key]
        if isinstance(value, dict):
            raise ConfigFileError(f"{where}: {key} must be a value, not a table")
        values[option.name or key] = _convert(where, key, option, negative, value, ctx)
    return values


def _convert(
    where: str, key: str, option: click.Option, negative: bool, value: Any, ctx: click.Context
) -> Any:
    kind = option.type
    if option.is_flag and option.is_bool_flag:
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: {key} must be true or false")
        return not value if negative else value
    if option.multiple:
        if not isinstance(value, list):
            value = [value]
        return tuple(_scalar(where, key, option, kind, item, ctx) for item in value)
    return _scalar(where, key, option, kind, value, ctx)


def _scalar(where: str, key: str, option: click.Option, kind: Any, value: Any, ctx: Any) -> Any:
    if isinstance(value, bool | list | dict):
        raise ConfigFileError(f"{where}: {key} must be a {kind.name}, not {value!r}")
    if isinstance(kind, click.types.IntParamType) and not isinstance(value, int):
        raise ConfigFileError(f"{where}: {key} must be an integer, not {value!r}")
    numeric = isinstance(kind, click.types.FloatParamType) or kind.name == "number"
    if numeric and not isinstance(value, int | float):
        raise ConfigFileError(f"{where}: {key} must be a number, not {value!r}")
    # Every other option (text, choices, paths, addresses) is a TOML string: a number or
    # a date is not silently turned into a pool name or handed to os.stat.
    textual = not numeric and not isinstance(kind, click.types.IntParamType)
    if textual and not isinstance(value, str):
        raise ConfigFileError(f"{where}: {key} must be a string, not {value!r}")
    try:
        return kind.convert(value, option, ctx)
    except click.BadParameter as exc:
        raise ConfigFileError(f"{where}: {key}: {exc.message}") from None


def _line_of(text: str, key: str) -> int:
    name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
    pattern = re.compile(rf"^\s*(?:{name}\s*[=.]|\[+\s*{name}\s*[.\]])")  # a=, a.b=, [a], [[a.b]]
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 0


def _suggest(key: str, keys: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key.replace("_", "-"), list(keys), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_option(command_ref: Callable[[], click.Command]) -> Callable[..., Any]:
    """``--config FILE`` (or ``REDLB_CONFIG``): read first, it sets the other options' defaults."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value:
            ctx.default_map = {**(ctx.default_map or {}), **load(value, command_ref(), ctx)}
        return value

    return click.option(
        "--config",
        "config",
        envvar="REDLB_CONFIG",
        is_eager=True,
        expose_value=True,
        callback=callback,
        type=click.Path(dir_okay=False),
        help="A TOML file holding serve flags (key = flag name); flags and REDLB_* env win.",
    )
