"""Per-pool settings (``HSET redlb:{P}:settings key value``) over the ``serve`` flags.

Each key is parsed on its own: a bad value is reported (naming the key) and left out, so the
pool runs on the flag's value for it; the result is a whole new Config, swapped in at once,
never a pool with some settings of the old set and some of the new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from redlb.balancer.requestkey import parse_cookie_name, parse_key_spec
from redlb.config import ROTATIONS, STRATEGIES, Config


def _float(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"must be within {low:g}..{high:g}")
        return value

    return parse


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be within {low}..{high}")
        return value

    return parse


def _rotation(text: str) -> str:
    if text not in ROTATIONS:
        raise ValueError(f"must be one of {', '.join(ROTATIONS)}")
    return text


def _strategy(text: str) -> str:
    if text not in STRATEGIES:
        raise ValueError(f"must be one of {', '.join(STRATEGIES)}")
    return text


def _hash_key(text: str) -> str:
    return str(parse_key_spec(text))


def _sticky(text: str) -> str | None:
    return None if text in ("", "off") else parse_cookie_name(text)


def _health_path(text: str) -> str | None:
    if text in ("", "off"):
        return None
    if not text.startswith("/") or len(text) > 1024 or any(c <= " " or c > "~" for c in text):
        raise ValueError("must be a path starting with / (or 'off')")
    return text


# key -> (Config field, parser, help)
SETTINGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "rotation": ("rotation", _rotation, "lease or strict"),
    "strategy": ("strategy", _strategy, "how a backend is picked (README: Strategies)"),
    "hash_key": ("hash_key", _hash_key, "ip, path, header:NAME, cookie:NAME or query:NAME"),
    "hash_balance": ("hash_balance", _float(0, 10), "bounded loads epsilon, 0 = off"),
    "sticky": ("sticky", _sticky, "sticky-session cookie name, or off"),
    "slow_start": ("slow_start", _float(0, 3600), "seconds a joining backend ramps over"),
    "health_path": ("health_path", _health_path, "active health check path, or off"),
    "health_interval": ("health_interval", _float(0.05, 3600), "seconds between probes"),
    "connect_timeout": ("connect_timeout", _float(0.001, 3600), "seconds"),
    "upstream_timeout": ("upstream_timeout", _float(0.001, 86400), "seconds"),
    "retry_attempts": ("max_connect_attempts", _int(1, 10), "attempts per request"),
    "retry_budget": ("retry_budget_percent", _float(0, 100), "percent of requests"),
    "max_conns": ("max_conns_per_backend", _int(0, 1_000_000), "per backend, 0 = no cap"),
    "max_body": ("max_body", _int(0, 1 << 40), "request body bytes, 0 = unlimited"),
}


def parse_setting(key: str, value: str) -> tuple[str, Any]:
    """(Config field, parsed value); ValueError with a sentence naming what is wrong."""
    known = SETTINGS.get(key)
    if known is None:
        raise ValueError(f"unknown pool setting {key!r} (known: {', '.join(SETTINGS)})")
    field, parse, _ = known
    try:
        return field, parse(value)
    except ValueError as exc:
        raise ValueError(f"pool setting {key}={value[:80]!r}: {exc}") from None


def parse_settings(raw: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The overrides that parse, and one problem sentence for each key that does not."""
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in sorted(raw.items()):
        try:
            field, parsed = parse_setting(key, value)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        overrides[field] = parsed
    return overrides, problems


def resolve(base: Config, overrides: Mapping[str, Any]) -> Config:
    return dataclasses.replace(base, **overrides) if overrides else base
