"""The whole fleet, read back from Redis: instances, routes, pools, backends and live rates.

Shared by the admin API, the dashboard (through the API) and ``redlb status``/``redlb top``:
one reader, so they can never disagree.  Nothing here keeps state; every call reads Redis.
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis.asyncio import Redis

from redlb.address import Backend, InvalidAddress, parse_backend
from redlb.fleet.publisher import B_IN, B_OUT, E4, E5, LAT, REQ, WIDTH
from redlb.metrics.recorder import BUCKETS
from redlb.routing import BadRoute, parse_route
from redlb.store.keys import FLEET_WORKERS, ROUTES, Keys, fleet_worker
from redlb.store.weights import parse_weights

STALE_AFTER = 5.0  # seconds without a heartbeat: the worker is gone
MAX_POOL_READ = 10_000


def text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


async def worker_documents(client: Redis, now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    members = await client.zrangebyscore(FLEET_WORKERS, now - STALE_AFTER, "+inf")
    if not members:
        return []
    raw = await client.mget([fleet_worker(text(m)) for m in members])
    docs = []
    for item in raw:
        if item is None:
            continue
        try:
            doc = json.loads(item)
        except (ValueError, RecursionError):
            continue
        if well_formed(doc):
            docs.append(doc)
    return docs


# What the readers below take from a worker document (fleet/publisher.py writes it).
_NUMBER = (int, float)
_FIELDS: dict[str, Any] = {
    "instance": str, "host": str, "pid": int, "version": str, "started": _NUMBER,
    "listen": list, "worker": int, "time": _NUMBER, "interval": _NUMBER, "pools": list,
    "routes": list, "route_count": int, "active_requests": int, "open_connections": int,
    "redis_latency": _NUMBER, "draining": bool, "backends": list,
}  # fmt: skip


def well_formed(doc: Any) -> bool:
    """A document of another shape (another redlb version mid-upgrade, a key written by
    hand) is left out of the view rather than failing every read of the fleet."""
    if not isinstance(doc, dict):
        return False
    for name, kind in _FIELDS.items():
        value = doc.get(name)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            return False
    if not all(isinstance(p, str) for p in doc["pools"]):
        return False
    for row in doc["backends"]:
        if not (
            isinstance(row, list)
            and len(row) == 5
            and isinstance(row[0], str)
            and isinstance(row[1], str)
            and isinstance(row[2], int)
            and all(_counts(series) for series in row[3:])
        ):
            return False
    return True


def _counts(series: Any) -> bool:
    return (
        isinstance(series, list)
        and len(series) == WIDTH
        and all(isinstance(v, int) and not isinstance(v, bool) for v in series)
    )


def instances(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        grouped.setdefault(doc["instance"], []).append(doc)
    out = []
    for inst_id, workers in sorted(grouped.items()):
        first = workers[0]
        interval = max(float(first.get("interval", 1.0)), 0.001)
        last = sum(b[3][REQ] for w in workers for b in w["backends"])
        errors = sum(b[4][E5] for w in workers for b in w["backends"])
        minute = sum(b[4][REQ] for w in workers for b in w["backends"])
        out.append(
            {
                "id": inst_id,
                "host": first["host"],
                "pid": first["pid"],
                "version": first["version"],
                "started": first["started"],
                "listen": first["listen"],
                "admin": first.get("admin"),
                "workers": len(workers),
                "last_seen": max(w["time"] for w in workers),
                "pools": sorted({p for w in workers for p in w["pools"]}),
                "routes": first["routes"],
                "route_count": first["route_count"],
                "active_requests": sum(w["active_requests"] for w in workers),
                "open_connections": sum(w["open_connections"] for w in workers),
                "requests_per_second": last / interval,
                "error_rate": errors / minute if minute else 0.0,
                "redis_latency_ms": max(w["redis_latency"] for w in workers) * 1000,
                "draining": any(w["draining"] for w in workers),
            }
        )
    return out


def backend_rates(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (pool, backend), summed over every worker of every instance."""
    acc: dict[tuple[str, str], tuple[list[int], list[int], list[int]]] = {}
    interval = 1.0
    for doc in docs:
        interval = max(float(doc.get("interval", 1.0)), 0.001)
        for pool, backend, in_flight, last, minute in doc["backends"]:
            a = acc.setdefault((pool, backend), ([0], [0] * WIDTH, [0] * WIDTH))
            a[0][0] += in_flight
            for i in range(WIDTH):
                a[1][i] += last[i]
                a[2][i] += minute[i]
    out = {}
    for key, (in_flight, last, minute) in acc.items():
        out[key] = {
            "in_flight": in_flight[0],
            "requests_per_second": last[REQ] / interval,
            "errors_per_second": last[E5] / interval,
            "bytes_in_per_second": last[B_IN] / interval,
            "bytes_out_per_second": last[B_OUT] / interval,
            "requests_last_minute": minute[REQ],
            "error_rate": minute[E5] / minute[REQ] if minute[REQ] else 0.0,
            "client_error_rate": minute[E4] / minute[REQ] if minute[REQ] else 0.0,
            "p50_ms": _quantile(0.5, minute[LAT:]),
            "p99_ms": _quantile(0.99, minute[LAT:]),
        }
    return out


def _quantile(q: float, buckets: list[int]) -> float | None:
    """Prometheus' histogram_quantile over one minute of buckets, in milliseconds."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    running = 0
    lower = 0.0
    for i, count in enumerate(buckets):
        upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
        if running + count >= rank and count:
            if i == len(BUCKETS):
                return BUCKETS[-1] * 1000
            return (lower + (upper - lower) * (rank - running) / count) * 1000
        running += count
        lower = upper
    return BUCKETS[-1] * 1000


async def routes(client: Redis) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The routes hash: parsed routes (most specific first) and the entries that are invalid."""
    raw = await client.hgetall(ROUTES)
    good = []
    bad = []
    for field, value in raw.items():
        try:
            spec = parse_route(text(field), text(value))
        except BadRoute as exc:
            bad.append({"match": text(field), "value": text(value), "error": str(exc)})
            continue
        good.append(
            (
                spec.match.priority,
                {
                    "match": str(spec.match),
                    "pool": spec.pool,
                    "strip_prefix": spec.strip_prefix,
                    "host_header": spec.host_header,
                },
            )
        )
    good.sort(key=lambda item: item[0], reverse=True)
    return [route for _, route in good], bad


async def pool(
    client: Redis, name: str, rates: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """One pool as Redis has it: each backend's state, plus the fleet's live rates for it."""
    keys = Keys(name)
    pipe = client.pipeline(transaction=False)
    pipe.type(name)
    pipe.lrange(name, 0, MAX_POOL_READ - 1)
    pipe.smembers(keys.draining)
    pipe.hgetall(keys.settings)
    pipe.hgetall(keys.weights)
    # One key of the wrong type (WRONGTYPE) marks this pool, not the whole view.
    kind, entries, draining_raw, settings, weights_raw = await pipe.execute(raise_on_error=False)
    if text(kind) not in ("list", "none"):
        problem: str | None = f"the key {name!r} is a {text(kind)}, not a list"
    else:
        problem = next(
            (
                f"the key {key!r} is not a {want}"
                for key, want, answer in (
                    (keys.draining, "set", draining_raw),
                    (keys.settings, "hash", settings),
                    (keys.weights, "hash", weights_raw),
                )
                if isinstance(answer, Exception)
            ),
            None,
        )
    if problem is not None:
        return {"name": name, "error": problem, "backends": [], "invalid": [], "settings": {}}
    backends: list[Backend] = []
    invalid = []
    for raw in entries:
        try:
            backend = parse_backend(raw)
        except InvalidAddress as exc:
            invalid.append({"entry": text(raw), "error": str(exc)})
            continue
        if backend not in backends:
            backends.append(backend)
    draining = {text(m) for m in draining_raw}
    weights = {b.key: w for b, w in parse_weights(weights_raw)[0].items()}
    pipe = client.pipeline(transaction=False)
    for b in backends:
        pipe.get(keys.health(b))
        pipe.pttl(keys.ejected(b))
    answers = await pipe.execute(raise_on_error=False) if backends else []
    rows = []
    for i, b in enumerate(backends):
        health = answers[2 * i]
        if isinstance(health, Exception):  # a health key of another type: no verdict
            health = None
        ttl = int(answers[2 * i + 1])
        row: dict[str, Any] = {
            "address": b.key,
            "health": text(health) if health is not None else None,
            "ejected_for": ttl / 1000 if ttl > 0 else None,
            "draining": b.key in draining,
            "weight": weights.get(b.key, 1),
        }
        row["state"] = (
            "draining" if row["draining"]
            else "down" if row["health"] == "down"
            else "ejected" if row["ejected_for"]
            else "healthy"
        )  # fmt: skip
        row.update(rates.get((name, b.key), _NO_RATES))
        rows.append(row)
    return {
        "name": name,
        "backends": rows,
        "invalid": invalid,
        "settings": {text(k): text(v) for k, v in settings.items()},
    }


_NO_RATES: dict[str, Any] = {
    "in_flight": 0,
    "requests_per_second": 0.0,
    "errors_per_second": 0.0,
    "bytes_in_per_second": 0.0,
    "bytes_out_per_second": 0.0,
    "requests_last_minute": 0,
    "error_rate": 0.0,
    "client_error_rate": 0.0,
    "p50_ms": None,
    "p99_ms": None,
}


def pool_names(
    docs: list[dict[str, Any]], route_list: list[dict[str, Any]], extra: list[str]
) -> list[str]:
    names = {p for doc in docs for p in doc["pools"]} | {r["pool"] for r in route_list}
    return sorted(names | set(extra))


async def overview(client: Redis, extra_pools: list[str] | None = None) -> dict[str, Any]:
    """Everything at once: what the dashboard polls and ``redlb status`` prints."""
    docs = await worker_documents(client)
    route_list, bad_routes = await routes(client)
    rates = backend_rates(docs)
    names = pool_names(docs, route_list, extra_pools or [])
    pools = [await pool(client, name, rates) for name in names]
    return {
        "time": time.time(),
        "instances": instances(docs),
        "routes": route_list,
        "invalid_routes": bad_routes,
        "pools": pools,
    }
