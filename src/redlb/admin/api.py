"""The admin API's resources.  Every write goes to Redis (and publishes the change), so the
API of any instance changes the whole fleet; reads come from Redis too (fleet/view.py).

Rules:
1. Bodies are JSON objects with known fields only: an unknown field, a wrong type or a value
   redlb's own parsers refuse is a 400 with a message, and nothing is written.
2. A Redis that does not answer is a 503 with a message, never a 500.
3. Names taken from the URL are validated before any key is built from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from redlb.address import InvalidAddress, parse_backend
from redlb.admin.auth import Guard
from redlb.admin.listener import Request, Response, error, json_response
from redlb.fleet import view
from redlb.routing import BadRoute, parse_match, parse_route
from redlb.store.keys import ROUTES, ROUTES_EVENTS, Keys
from redlb.store.weights import MAX_WEIGHT

API = "/api/v1"
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
RESERVED_PREFIXES = ("redlb:", "frontend:", "__")
WATCH_ATTEMPTS = 20  # an add retried while other writers change the same pool
STATIC_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".svg": b"image/svg+xml",
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Route = tuple[str, re.Pattern[str], Callable[..., Awaitable[Response]], bool]


class AdminApi:
    def __init__(self, client: Redis, guard: Guard, default_pool: str, timeout: float) -> None:
        self.client = client
        self.guard = guard
        self.default_pool = default_pool
        self.timeout = timeout
        self.static = _load_static()
        p = r"(?P<pool>[^/]+)"
        b = r"(?P<address>[^/]+)"
        # method, path, handler, whether it writes
        self.routes: list[Route] = [
            ("GET", re.compile(r"^/$"), self.index, False),
            ("GET", re.compile(r"^/static/(?P<name>[A-Za-z0-9_.-]+)$"), self.static_file, False),
            ("GET", re.compile(r"^/favicon\.ico$"), self.favicon, False),
            ("GET", re.compile(rf"^{API}/openapi\.json$"), self.openapi, False),
            ("GET", re.compile(rf"^{API}/overview$"), self.overview, False),
            ("GET", re.compile(rf"^{API}/instances$"), self.instances, False),
            ("GET", re.compile(rf"^{API}/health$"), self.health, False),
            ("GET", re.compile(rf"^{API}/stats$"), self.stats, False),
            ("GET", re.compile(rf"^{API}/routes$"), self.list_routes, False),
            ("PUT", re.compile(rf"^{API}/routes$"), self.put_route, True),
            ("DELETE", re.compile(rf"^{API}/routes$"), self.delete_route, True),
            ("GET", re.compile(rf"^{API}/pools$"), self.list_pools, False),
            ("GET", re.compile(rf"^{API}/pools/{p}$"), self.get_pool, False),
            ("POST", re.compile(rf"^{API}/pools/{p}/backends$"), self.add_backend, True),
            ("DELETE", re.compile(rf"^{API}/pools/{p}/backends/{b}$"), self.remove_backend, True),
            ("POST", re.compile(rf"^{API}/pools/{p}/backends/{b}/drain$"), self.drain, True),
            ("POST", re.compile(rf"^{API}/pools/{p}/backends/{b}/undrain$"), self.undrain, True),
            ("PUT", re.compile(rf"^{API}/pools/{p}/backends/{b}/weight$"), self.set_weight, True),
            ("GET", re.compile(rf"^{API}/ejections$"), self.ejections, False),
            ("DELETE", re.compile(rf"^{API}/pools/{p}/ejections/{b}$"), self.clear_ejection,
             True),
        ]  # fmt: skip
        # Hold no fleet data: served without the token.
        self.public = {self.index, self.static_file, self.favicon, self.openapi}

    async def __call__(self, request: Request) -> Response:
        if not self.guard.host_allowed(request.headers.get(b"host", b"")):
            return error(421, "this admin listener answers only to a loopback Host")
        allowed: list[str] = []
        for method, pattern, handler, writes in self.routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            allowed.append(method)
            if method != request.method and not (method == "GET" and request.method == "HEAD"):
                continue
            # Decided by the resource matched, never by how the path looks: a pool may
            # well be named "openapi.json".
            public = handler in self.public
            if not public and not self.guard.allows(request.headers.get(b"authorization", b"")):
                return json_response(
                    401,
                    {"error": "missing or wrong token (Authorization: Bearer TOKEN)"},
                    headers=[(b"WWW-Authenticate", b'Bearer realm="redlb"')],
                )
            try:
                if writes:
                    _check_content_type(request)
                params = {k: unquote(v) for k, v in match.groupdict().items()}
                response = await asyncio.wait_for(handler(request, **params), self.timeout * 4)
            except BadRequest as exc:
                return error(exc.status, exc.message)
            except (RedisError, OSError, TimeoutError) as exc:
                return error(503, f"Redis did not answer: {exc.__class__.__name__}")
            if request.method == "HEAD":
                response.body = b""
            return response
        if allowed:
            return json_response(
                405,
                {"error": f"method {request.method} not allowed here"},
                headers=[(b"Allow", ", ".join(sorted(set(allowed))).encode())],
            )
        return error(404, f"no resource at {request.path}")

    # Dashboard and document

    async def index(self, request: Request) -> Response:
        return self._static("index.html")

    async def static_file(self, request: Request, name: str) -> Response:
        return self._static(name)

    async def favicon(self, request: Request) -> Response:
        return self._static("favicon.svg")

    async def openapi(self, request: Request) -> Response:
        if self.guard.required:
            return self._static("openapi.json")
        # Without a token, calls need no Authorization: the document says so.
        document = json.loads(self.static["openapi.json"][1])
        document.pop("security", None)
        document["components"].pop("securitySchemes", None)
        return json_response(200, document)

    def _static(self, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            return error(404, f"no file {name}")
        return Response(200, found[1], found[0])

    # Reads

    async def overview(self, request: Request) -> Response:
        _no_query(request)
        return json_response(200, await view.overview(self.client, [self.default_pool]))

    async def instances(self, request: Request) -> Response:
        _no_query(request)
        docs = await view.worker_documents(self.client)
        return json_response(200, {"instances": view.instances(docs)})

    async def health(self, request: Request) -> Response:
        _no_query(request)
        data = await view.overview(self.client, [self.default_pool])
        pools = [
            {
                "name": p["name"],
                "backends": len(p["backends"]),
                "healthy": sum(1 for b in p["backends"] if b["state"] == "healthy"),
                "down": [b["address"] for b in p["backends"] if b["state"] == "down"],
                "ejected": [b["address"] for b in p["backends"] if b["ejected_for"]],
                "draining": [b["address"] for b in p["backends"] if b["draining"]],
            }
            for p in data["pools"]
        ]
        return json_response(200, {"redis": "up", "instances": len(data["instances"]),
                                   "pools": pools})  # fmt: skip

    async def stats(self, request: Request) -> Response:
        _no_query(request)
        docs = await view.worker_documents(self.client)
        rows = [
            {"pool": pool, "address": address, **rates}
            for (pool, address), rates in sorted(view.backend_rates(docs).items())
        ]
        return json_response(200, {"instances": view.instances(docs), "backends": rows})

    async def list_routes(self, request: Request) -> Response:
        _no_query(request)
        good, bad = await view.routes(self.client)
        return json_response(200, {"routes": good, "invalid": bad})

    async def list_pools(self, request: Request) -> Response:
        _no_query(request)
        data = await view.overview(self.client, [self.default_pool])
        return json_response(200, {"pools": data["pools"]})

    async def get_pool(self, request: Request, pool: str) -> Response:
        _no_query(request)
        name = _pool_name(pool)
        docs = await view.worker_documents(self.client)
        return json_response(200, await view.pool(self.client, name, view.backend_rates(docs)))

    async def ejections(self, request: Request) -> Response:
        _no_query(request)
        data = await view.overview(self.client, [self.default_pool])
        rows = [
            {"pool": p["name"], "address": b["address"], "ejected_for": b["ejected_for"]}
            for p in data["pools"]
            for b in p["backends"]
            if b["ejected_for"]
        ]
        return json_response(200, {"ejections": rows})

    # Writes

    async def put_route(self, request: Request) -> Response:
        _no_query(request)
        body = _body(request, required={"match": str, "pool": str},
                     optional={"strip_prefix": bool, "host_header": str})  # fmt: skip
        value = " ".join(
            [body["pool"], *(["strip-prefix"] if body.get("strip_prefix") else [])]
            + ([f"host={body['host_header']}"] if body.get("host_header") else [])
        )
        try:
            _pool_name(body["pool"])
            spec = parse_route(body["match"], value)
        except BadRoute as exc:
            raise BadRequest(400, f"bad route: {exc}") from None
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(ROUTES, str(spec.match), spec.value())
        pipe.publish(ROUTES_EVENTS, "route")
        await pipe.execute()
        route = {"match": str(spec.match), "pool": spec.pool,
                 "strip_prefix": spec.strip_prefix, "host_header": spec.host_header}  # fmt: skip
        return json_response(200, route)

    async def delete_route(self, request: Request) -> Response:
        query = _query(request, required={"match"})
        match = query["match"]
        fields = [match]
        with contextlib.suppress(BadRoute):
            fields.append(str(parse_match(match)))
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(ROUTES, *dict.fromkeys(fields))
        pipe.publish(ROUTES_EVENTS, "route")
        removed, _ = await pipe.execute()
        if not removed:
            raise BadRequest(404, f"no route {match!r}")
        return json_response(200, {"removed": match})

    async def add_backend(self, request: Request, pool: str) -> Response:
        _no_query(request)
        name = _pool_name(pool)
        body = _body(request, required={"address": str}, optional={})
        backend = _backend(body["address"])
        keys = Keys(name)
        for _ in range(WATCH_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                # Check and push as one: two instances adding the same address at once
                # would otherwise both find it absent and both push it.
                await pipe.watch(name)
                if await self._find(name, backend.key, pipe):
                    raise BadRequest(409, f"{backend.key} is already in {name}")
                kind = view.text(await pipe.type(name))
                if kind not in ("list", "none"):
                    raise BadRequest(409, f"the key {name!r} is a {kind}, not a list")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.rpush(name, backend.key)
                pipe.publish(keys.events, "edit")
                try:
                    await pipe.execute()
                except WatchError:
                    continue  # the list changed meanwhile: look again
            return json_response(201, {"pool": name, "address": backend.key})
        raise BadRequest(409, f"{name} kept changing while {backend.key} was added; try again")

    async def remove_backend(self, request: Request, pool: str, address: str) -> Response:
        _no_query(request)
        name = _pool_name(pool)
        backend = _backend(address)
        entries = await self._find(name, backend.key)
        if not entries:
            raise BadRequest(404, f"{backend.key} is not in {name}")
        pipe = self.client.pipeline(transaction=True)
        for raw in entries:
            pipe.lrem(name, 0, raw)
        pipe.srem(Keys(name).draining, backend.key)
        pipe.hdel(Keys(name).weights, backend.key)  # as `redlb backend rm`: added again, it is 1
        pipe.publish(Keys(name).events, "edit")
        await pipe.execute()
        return json_response(200, {"pool": name, "address": backend.key, "removed": True})

    async def drain(self, request: Request, pool: str, address: str) -> Response:
        return await self._drain(request, pool, address, True)

    async def undrain(self, request: Request, pool: str, address: str) -> Response:
        return await self._drain(request, pool, address, False)

    async def _drain(self, request: Request, pool: str, address: str, on: bool) -> Response:
        _no_query(request)
        body = _body(request, required={}, optional={"force": bool} if on else {})
        name = _pool_name(pool)
        backend = _backend(address)
        keys = Keys(name)

        async def not_the_last(pipe: Any) -> None:
            # As `redlb backend drain` without --force: a dashboard click must not turn
            # every request of the pool into a 503.
            if not await self._others_taking_traffic(name, backend.key, pipe):
                raise BadRequest(
                    409,
                    f"{backend.key} is the last backend of {name} taking traffic: every "
                    'request would get a 503 (send {"force": true} to drain it anyway)',
                )

        def write(pipe: Any) -> None:
            if on:
                pipe.sadd(keys.draining, backend.key)
            else:
                pipe.srem(keys.draining, backend.key)
            pipe.publish(keys.events, "drain")

        check = not_the_last if on and not body.get("force", False) else None
        await self._member_write(name, backend.key, write, check)
        return json_response(200, {"pool": name, "address": backend.key, "draining": on})

    async def set_weight(self, request: Request, pool: str, address: str) -> Response:
        _no_query(request)
        body = _body(request, required={"weight": int}, optional={})
        weight = body["weight"]
        if isinstance(weight, bool) or not 1 <= weight <= MAX_WEIGHT:
            raise BadRequest(400, f"weight must be an integer within 1..{MAX_WEIGHT}")
        name = _pool_name(pool)
        backend = _backend(address)
        keys = Keys(name)

        def write(pipe: Any) -> None:
            if weight == 1:
                pipe.hdel(keys.weights, backend.key)  # 1 is the default: keep the hash small
            else:
                pipe.hset(keys.weights, backend.key, str(weight))
            pipe.publish(keys.events, "weight")

        await self._member_write(name, backend.key, write)
        return json_response(200, {"pool": name, "address": backend.key, "weight": weight})

    async def clear_ejection(self, request: Request, pool: str, address: str) -> Response:
        _no_query(request)
        name = _pool_name(pool)
        backend = _backend(address)
        keys = Keys(name)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(keys.ejected(backend))
        pipe.delete(keys.ejections(backend))
        pipe.publish(keys.events, "eject")
        removed, _, _ = await pipe.execute()
        if not removed:
            raise BadRequest(404, f"{backend.key} is not ejected from {name}")
        return json_response(200, {"pool": name, "address": backend.key, "ejected": False})

    async def _member_write(
        self,
        pool: str,
        key: str,
        write: Callable[[Any], None],
        check: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        """``write`` (queued on a transaction) if the backend is in the pool, as one: a
        remove through another instance in between would leave the drain or weight of an
        address the pool no longer has, and it would come back so when re-added.  The
        draining set is watched too: two drains at once cannot both pass ``check``."""
        for _ in range(WATCH_ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(pool, Keys(pool).draining)
                if not await self._find(pool, key, pipe):
                    raise BadRequest(404, f"{key} is not in {pool}")
                if check is not None:
                    await check(pipe)
                pipe.multi()  # type: ignore[no-untyped-call]
                write(pipe)
                try:
                    await pipe.execute()
                except WatchError:
                    continue  # the list changed meanwhile: look again
                return
        raise BadRequest(503, f"{pool} kept changing; try again")  # as documented: retry

    async def _others_taking_traffic(self, pool: str, key: str, watching: Any) -> bool:
        """Whether a member other than ``key`` is neither draining, ejected nor down."""
        keys = Keys(pool)
        draining = {view.text(m) for m in await watching.smembers(keys.draining)}
        others = {}
        for raw in await watching.lrange(pool, 0, view.MAX_POOL_READ - 1):
            try:
                other = parse_backend(raw)
            except InvalidAddress:
                continue
            if other.key != key and other.key not in draining:
                others[other.key] = other
        if not others:
            return False
        reads = self.client.pipeline(transaction=False)  # one round trip for them all
        for other in others.values():
            reads.exists(keys.ejected(other))
            reads.get(keys.health(other))
        answers = await reads.execute()
        return any(
            not ejected and view.text(health or b"") != "down"
            for ejected, health in zip(answers[::2], answers[1::2], strict=True)
        )

    async def _find(self, pool: str, key: str, reader: Any = None) -> list[Any]:
        """The raw entries of the pool list that name this backend (read through ``reader``,
        a watching pipeline, when given)."""
        reader = reader or self.client
        if view.text(await reader.type(pool)) != "list":
            return []
        found = []
        for raw in set(await reader.lrange(pool, 0, view.MAX_POOL_READ - 1)):
            try:
                if parse_backend(raw).key == key:
                    found.append(raw)
            except InvalidAddress:
                continue
        return found


def _load_static() -> dict[str, tuple[bytes, bytes]]:
    """Name -> (content type, bytes), read once from the package (they ship in the wheel)."""
    out = {}
    package = resources.files("redlb.admin")
    for name in ("openapi.json",):
        out[name] = (STATIC_TYPES[".json"], package.joinpath(name).read_bytes())
    for item in package.joinpath("static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in STATIC_TYPES:
            out[item.name] = (STATIC_TYPES[suffix], item.read_bytes())
    return out


def _check_content_type(request: Request) -> None:
    if request.method in ("POST", "PUT"):
        kind = request.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            raise BadRequest(415, "send the body as Content-Type: application/json")


def _body(
    request: Request,
    required: dict[str, type],
    optional: dict[str, type],
) -> dict[str, Any]:
    try:
        value = json.loads(request.body)
    except (ValueError, RecursionError):  # 64 KiB of "[" nests deeper than the parser goes
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "the body must be a JSON object")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(unknown)}")
    for name, kind in {**required, **optional}.items():
        if name not in value:
            if name in required:
                raise BadRequest(400, f"missing field: {name}")
            continue
        if not isinstance(value[name], kind):
            raise BadRequest(400, f"field {name} must be a {kind.__name__}")
    return value


def _query(request: Request, required: set[str]) -> dict[str, str]:
    try:
        parsed = parse_qs(request.query, keep_blank_values=True, strict_parsing=bool(request.query))
    except ValueError:
        raise BadRequest(400, "malformed query string") from None
    unknown = sorted(set(parsed) - required)
    if unknown:
        raise BadRequest(400, f"unknown query parameter(s): {', '.join(unknown)}")
    out = {}
    for name in required:
        values = parsed.get(name)
        if not values or len(values) != 1 or not values[0]:
            raise BadRequest(400, f"give exactly one non-empty query parameter {name}")
        out[name] = values[0]
    return out


def _no_query(request: Request) -> None:
    if request.query:
        _query(request, set())


def _pool_name(name: str) -> str:
    if not POOL_NAME.match(name) or name.startswith(RESERVED_PREFIXES):
        raise BadRequest(
            400,
            "a pool name is 1-200 characters of letters, digits and _.:- "
            "(and not redlb:..., frontend:... or __...)",
        )
    return name


def _backend(address: str) -> Any:
    try:
        return parse_backend(address)
    except InvalidAddress as exc:
        raise BadRequest(400, f"{address[:100]!r} is not a backend address: {exc}") from None
