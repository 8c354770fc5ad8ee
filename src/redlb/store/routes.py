"""Routes, pools and pool settings from Redis -> the routing table the data path asks.

Rules:
1. One pub/sub connection per process listens to everything: the routes hash, its events
   channel, and the list, events channel and settings hash of every routed pool.  A message
   re-reads only what it names.  The resync every ``resync_interval`` is the fallback for
   what no message announces; it compares digests computed inside Redis (the routes; each
   pool's list, drain set, settings, weights, health and ejections) and re-reads only what
   moved.  How much it checks depends on whether edits are pushed:
   - Keyspace notifications on (checked each resync with one CONFIG GET) and subscribed:
     every redis-cli edit arrives as a message, so the resync is a slow backstop: a slice
     of the pools each time (every pool within BACKSTOP seconds, all of them each time
     while there are at most RESYNC_POOLS) and the routes every BACKSTOP seconds, or at once
     when the routes' epoch vanished (FLUSHALL, a restart without persistence: no message).
     An idle instance with 1,000 pools sends tens of commands a second, not thousands.
   - Notifications off or unknown (a Redis that refuses CONFIG): every pool and the routes
     each resync (one EVAL per DIGEST_SLICE pools), so an edit is seen within a resync.
   Without scripts (an ACL user) it re-reads a rotating slice of the pools instead (all of
   them while there are at most RESYNC_POOLS; a fleet of 1,000 in about 2 minutes).
2. A new table is complete before it is swapped in (one assignment): every pool it routes to
   has been read, so a request sees the old table or the new one, never a route without its
   pool.  Big tables are parsed in slices with the event loop free in between.
3. Bad data never stops the rest: a malformed route or a bad setting is skipped with one
   warning (again only if it goes away and comes back); a pool that is empty or missing
   answers 503.
4. No route configured: the table is the seed's single pool (``--pool``), untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from redlb.address import Backend
from redlb.routing import BadRoute, Match, RouteSpec, RoutingTable, parse_match
from redlb.routing.hipache import SCAN_PATTERN, frontend_route
from redlb.routing.match import with_value
from redlb.routing.settings import parse_settings, resolve
from redlb.store.keys import ROUTES, ROUTES_EPOCH, ROUTES_EVENTS
from redlb.store.link import RedisLink
from redlb.store.sync import PoolSync, _text
from redlb.store.weights import parse_up_since, parse_weights, queue_up_since

if TYPE_CHECKING:
    from redlb.proxy.context import ProxyContext
    from redlb.proxy.poolstate import PoolState

log = logging.getLogger("redlb.routes")

SLICE = 100  # routes parsed or indexed between two yields to the event loop (about 0.5 ms)
POOL_SLICE = 100  # pools read (and parsed, without a yield) in one pipeline
# Pools digested by one script: ~7 us each in Redis (more with many members), so one EVAL
# holds Redis about a millisecond, and building its keys holds the loop no longer.
DIGEST_SLICE = 100
# Pools parsed or applied between two yields: each is atomic on its own, and a thousand new
# members (with a log line each) must not hold the loop for tens of ms.
YIELD_POOLS = 10
MAX_ROUTES = 100_000
CHANNEL_SLICE = 400  # channels (un)subscribed by one command, the loop free between two
# Without scripts, pools re-read per resync: all of them up to this many, else this many or a
# 200th.  Edits arrive by notification in milliseconds; the resync is the fallback (lost
# messages, health verdicts expiring), and a thousand pools re-read every second would cost
# more Redis commands than the requests themselves.
RESYNC_POOLS = 8
# With keyspace notifications on, the resync checks every pool and the routes once in this
# many seconds (a slice each resync): the fallback for a message lost on a live connection.
BACKSTOP = 120.0
# The notification classes redlb needs: K (keyspace channels), l (lists), g (DEL, EXPIRE...),
# h (hashes); s (sets) for drain sets edited with redis-cli is covered by the backstop.
_PUSH_FLAGS = "lgh"

# The routes hash is re-read only when this changes (10,000 routes: 40 bytes, not 600 KB).
# Like a pool's epoch, the routes' epoch is written by whoever reads a real hash: routes gone
# with their epoch mean Redis lost its data (keep the last-known table), not "no routes".
_ROUTES_DIGEST = """
local all = redis.call('HGETALL', KEYS[1])
if #all > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], '1')
end
return {redis.sha1hex(table.concat(all, '\\n')), redis.call('EXISTS', KEYS[2]), #all}
"""

# One digest per pool (DIGEST_SLICE pools a script) over everything a pool read fetches (type
# and capped list, epoch, drain set, settings, weights, health and ejection of the members
# known here, the slow-start hash when ramping): the resync re-reads only the pools whose
# digest moved.  An ejection counts by the second it ends (server time + PTTL), stable
# while it runs.  ARGV per pool: first, last (the LRANGE of a read), members known, ramp
# (1: the up_since hash counts).
# KEYS per pool: list, epoch, draining, settings, weights, up_since, then health and
# ejected of each member.
_POOLS_DIGEST = """
local function flat(r)
  if type(r) ~= 'table' then return tostring(r) end
  if r.err then return 'E' end
  if r.ok then return r.ok end
  local out = {}
  for i, v in ipairs(r) do out[i] = tostring(v) end
  return table.concat(out, '\\n')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local digests = {}
local k = 1
for p = 1, #ARGV, 4 do
  local n = tonumber(ARGV[p + 2])
  -- A list with entries in range is a list; else its type says empty, absent or wrong.
  local entries = redis.pcall('LRANGE', KEYS[k], ARGV[p], ARGV[p + 1])
  local kind = 'list'
  if entries.err or #entries == 0 then kind = flat(redis.call('TYPE', KEYS[k])) end
  local parts = {kind, tostring(redis.call('EXISTS', KEYS[k + 1])), flat(entries)}
  -- Most pools have no drain set, settings or weights: one EXISTS says so for all three.
  if redis.call('EXISTS', KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]) > 0 then
    local drained = redis.pcall('SMEMBERS', KEYS[k + 2])
    if not drained.err then table.sort(drained) end
    parts[#parts + 1] = flat(drained)
    parts[#parts + 1] = flat(redis.pcall('HGETALL', KEYS[k + 3]))
    parts[#parts + 1] = flat(redis.pcall('HGETALL', KEYS[k + 4]))
  end
  if ARGV[p + 3] == '1' then parts[#parts + 1] = flat(redis.pcall('HGETALL', KEYS[k + 5])) end
  k = k + 6
  if n > 0 then
    for from = 0, n - 1, 1000 do  -- unpack's stack is limited: MGET a thousand at a time
      local health = {}
      for i = from, math.min(from + 999, n - 1) do health[#health + 1] = KEYS[k + i] end
      parts[#parts + 1] = flat(redis.pcall('MGET', unpack(health)))
    end
    local ejected = {}
    for i = 0, n - 1 do ejected[i + 1] = KEYS[k + n + i] end
    if n > 1000 or redis.call('EXISTS', unpack(ejected)) > 0 then  -- none ejected: one call
      for i = 1, n do
        local ms = redis.pcall('PTTL', ejected[i])
        if type(ms) == 'number' and ms > 0 then
          parts[#parts + 1] = tostring(math.floor((now + ms) / 1000))
        else
          parts[#parts + 1] = '-'
        end
      end
    end
    k = k + 2 * n
  end
  digests[#digests + 1] = redis.sha1hex(table.concat(parts, '\\0'))
end
return digests
"""


def _wrapping(names: list[str], start: int, count: int) -> list[str]:
    """``count`` names from ``start``, going on from the first past the end (without
    copying the whole list)."""
    chosen = names[start : start + count]
    return chosen + names[: count - len(chosen)]


def _one_spelling(
    kept: tuple[bytes, RouteSpec], other: tuple[bytes, RouteSpec]
) -> tuple[bytes, RouteSpec]:
    """Two fields of one match (``/api`` and ``/api/``, ``API.x/`` and ``api.x/``): the same
    one wins whatever the hash order (lower case, then the shortest, then the first in
    byte order), said when they disagree."""
    first, second = sorted((kept, other), key=lambda f: (f[0] != f[0].lower(), len(f[0]), f[0]))
    if first[1].value() != second[1].value():
        log.warning(
            "routes %r and %r are the same match %s: using %r",
            first[0][:80].decode("utf-8", "backslashreplace"),
            second[0][:80].decode("utf-8", "backslashreplace"),
            first[1].match,
            first[0][:80].decode("utf-8", "backslashreplace"),
        )
    return first


class RouteSync(PoolSync):
    def __init__(
        self,
        link: RedisLink,
        ctx: ProxyContext,
        make_state: Callable[[str], PoolState],
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        default = ctx.table.routes[0].target
        super().__init__(link, default.keys, default.pool, ctx.config, on_connected)
        self.ctx = ctx
        self.make_state = make_state
        self.hipache = ctx.config.hipache
        self.states: dict[str, PoolState] = dict(ctx.pools)
        self.specs: list[RouteSpec] = []
        self.raw_routes: Any = None  # what was last read, to skip identical rebuilds
        self.parsed: dict[tuple[bytes, bytes], RouteSpec | str] = {}
        self.matches: dict[bytes, Match] = {}  # field -> its parsed match
        self.warned_routes: set[tuple[bytes, bytes]] = set()
        self.warned_settings: dict[str, set[str]] = {}
        self.raw_settings: dict[str, Any] = {}
        self.warned_weights: dict[str, set[str]] = {}
        self.raw_weights: dict[str, Any] = {}  # as last parsed: unchanged, not parsed again
        # What the messages since the last sync named.
        self.routes_dirty = True
        self.dirty_pools: set[str] = set()
        self.last_full = 0.0
        self.routes_digest: Any = None
        # New routes or pools read but not yet in a table: a sync cut short (Redis lost
        # between) leaves the next one, whose digest and pools are all known, to build it.
        self.table_owed = False
        self.scripts = True  # False once EVAL is refused (an ACL user): no digest, read whole
        self.routes_lost = False
        self.routes_problem: str | None = None  # the wrong type the routes key held, if any
        self.resync_cursor = 0  # where the next resync's slice of pools starts
        self.pool_digests: dict[str, Any] = {}  # pool -> its digest when the resync last read it
        self.backstop_cursor = 0  # where the next backstop slice of pools starts
        # Pools just read: their digest covers the members known here, so the one taken
        # before the read is stale.  The next resync takes it again (and reads the pool
        # again if it moved): after that the backstop compares like with like.
        self.undigested: set[str] = set()
        self.routes_checked = 0.0  # monotonic time the routes' digest was last compared
        self.routes_odd = False  # the routes key is not a hash: check it every resync
        self.starts: dict[str, int] = {}  # _list_starts() of the routes in starts_of
        self.starts_of: list[RouteSpec] | None = None
        self.wanted: list[str] = []  # _wanted_pools() of the routes in wanted_of
        self.wanted_of: list[RouteSpec] | None = None
        self.covered: list[str] | None = None  # a wanted list whose pools all have a state
        # Subscriptions
        self.pubsub: PubSub | None = None
        self.db = 0
        self.subscribed: set[str] = set()
        self.channel_pool: dict[bytes, str] = {}

    # Subscriptions (PoolSync's session calls these)

    async def subscribe(self, pubsub: PubSub, db: int) -> None:
        self.pubsub = pubsub
        self.db = db
        self.subscribed = set()
        self.pool_digests = {}  # a new session re-reads every pool once: nothing read is trusted
        self.undigested = set()
        if self.hipache:
            await pubsub.psubscribe(f"__keyspace@{db}__:{SCAN_PATTERN}")
        await self._resubscribe()

    def _channels(self) -> dict[str, str | None]:
        """channel -> the pool it concerns (None: the routes)."""
        db = self.db
        channels: dict[str, str | None] = {
            f"__keyspace@{db}__:{ROUTES}": None,
            ROUTES_EVENTS: None,
        }
        for name, state in self.states.items():
            keys = state.keys
            channels[keys.keyspace_channel(db)] = name
            channels[keys.events] = name
            channels[f"__keyspace@{db}__:{keys.settings}"] = name
            channels[f"__keyspace@{db}__:{keys.weights}"] = name
        return channels

    async def _resubscribe(self) -> None:
        pubsub = self.pubsub
        if pubsub is None:
            return
        channels = self._channels()
        self.channel_pool = {k.encode(): v for k, v in channels.items() if v is not None}
        wanted = set(channels)
        new = wanted - self.subscribed
        gone = self.subscribed - wanted
        # Four channels a pool: a thousand pools' command packed in one go held the loop.
        fresh, old = list(new), list(gone)
        for start in range(0, len(fresh), CHANNEL_SLICE):
            await pubsub.subscribe(*fresh[start : start + CHANNEL_SLICE])
            await asyncio.sleep(0)
        for start in range(0, len(old), CHANNEL_SLICE):
            await pubsub.unsubscribe(*old[start : start + CHANNEL_SLICE])
            await asyncio.sleep(0)
        self.subscribed = wanted

    def note(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        pool = self.channel_pool.get(channel) if isinstance(channel, bytes) else None
        if pool is None or message.get("type") == "pmessage":
            self.routes_dirty = True  # the routes, or (Hipache) any frontend list
        else:
            self.dirty_pools.add(pool)

    # Reading

    async def sync_once(self) -> None:
        now = time.monotonic()
        full = now - self.last_full >= self.config.resync_interval
        if not (full or self.routes_dirty or self.dirty_pools):
            return  # a subscribe confirmation, not an edit
        if full:
            self.last_full = now
        # Edits pushed (notifications on, subscribed, data not lost): a backstop slice only.
        backstop = full and self.scripts and await self._pushed()
        check_routes = not backstop or self.routes_odd or now - self.routes_checked >= BACKSTOP
        if self.routes_dirty or (full and check_routes):
            self.routes_dirty = False
            if full:
                self.routes_checked = now
            specs = await self._read_routes()
            if specs is not None:
                self.specs = specs
                self.table_owed = True
        wanted = self._wanted_pools()
        # Every pool of the same routes has its state since the last sync: looked up again
        # only for new routes (1,000 lookups a resync, a cache miss each in a busy worker).
        fresh = [] if wanted is self.covered else [n for n in wanted if n not in self.states]
        if fresh:
            self.table_owed = True
        for count, name in enumerate(fresh, 1):
            self.states[name] = self.make_state(name)
            if count % (5 * YIELD_POOLS) == 0:
                await asyncio.sleep(0)  # a thousand new pools' objects: not in one turn
        self.covered = wanted
        if fresh:  # listen before reading: an edit in between is a message, not lost
            await self._resubscribe()
        dirty, self.dirty_pools = self.dirty_pools, set()
        new = dirty.union(fresh)  # a set: a list here made the first read quadratic
        to_read = [n for n in wanted if n in new] if new else []
        if full:
            again, self.undigested = self.undigested, set()
            checked = self._backstop_slice(wanted) if backstop else wanted
            if again:
                checked = list(dict.fromkeys(checked + [n for n in wanted if n in again]))
            moved = await self._changed_pools(checked) if self.scripts else None
            if moved is None:  # no scripts (ACL): a rotating slice, read whole
                moved = self._resync_slice(wanted)
            to_read = list(dict.fromkeys(to_read + moved))
        self.undigested.update(to_read)
        for start in range(0, len(to_read), POOL_SLICE):
            chunk = to_read[start : start + POOL_SLICE]
            await self._read_pools([self.states[n] for n in chunk])
        await self.link.check_master(self.config.redis_timeout)
        self.link.mark_up()
        if self.table_owed or not self.ctx.known:
            await self._swap(wanted)
        self.ctx.known = True

    async def _pushed(self) -> bool:
        """Whether every edit reaches us as a message: keyspace notifications on, our
        subscriptions live, and Redis still holding the routes' epoch (a FLUSHALL or a
        restart without persistence sends no message: then check everything now)."""
        if not self.listening:
            return False
        client = self.link.client
        pipe = client.pipeline(transaction=False)
        pipe.config_get("notify-keyspace-events")
        pipe.exists(ROUTES_EPOCH)
        pipe.type(ROUTES)
        config, epoch, kind = await asyncio.wait_for(
            pipe.execute(raise_on_error=False), self.config.redis_timeout
        )
        if isinstance(epoch, Exception):
            raise epoch
        # SET (or any write of another type) sends no notification redlb turns on.
        self.routes_odd = _text(kind) not in ("hash", "none") or self.routes_problem is not None
        if isinstance(config, Exception):  # CONFIG refused (ACL, managed Redis): unknown
            return False
        flags = _text(
            config.get(b"notify-keyspace-events") or config.get("notify-keyspace-events", "")
        )
        if "K" not in flags or not ("A" in flags or all(c in flags for c in _PUSH_FLAGS)):
            return False
        return bool(epoch) or not self.specs

    def _backstop_slice(self, wanted: list[str]) -> list[str]:
        """The pools this resync checks when edits are pushed: all within BACKSTOP seconds."""
        count = max(RESYNC_POOLS, -(-len(wanted) * self.config.resync_interval // BACKSTOP))
        count = int(count)
        if count >= len(wanted):
            return wanted
        start = self.backstop_cursor % len(wanted)
        self.backstop_cursor = start + count
        return _wrapping(wanted, start, count)

    def _resync_slice(self, wanted: list[str]) -> list[str]:
        count = max(RESYNC_POOLS, len(wanted) // 200)
        if count >= len(wanted):
            return wanted
        start = self.resync_cursor % len(wanted)
        self.resync_cursor = start + count
        return _wrapping(wanted, start, count)

    async def _changed_pools(self, wanted: list[str]) -> list[str] | None:
        """The pools whose digest moved since the last resync, or None if scripts are refused."""
        client = self.link.client
        start_of = self._list_starts()
        cap = self.config.max_pool_entries
        changed: list[str] = []
        for start in range(0, len(wanted), DIGEST_SLICE):
            await asyncio.sleep(0)  # building the keys and the round trip's start: two turns
            names = wanted[start : start + DIGEST_SLICE]
            keys: list[str] = []
            args: list[int] = []
            for name in names:
                state = self.states[name]
                pk = state.keys
                known = list(dict.fromkeys(state.pool.members))
                first = start_of.get(name, 0)
                keys += [pk.pool, pk.epoch, pk.draining, pk.settings, pk.weights, pk.up_since]
                keys += [pk.health(b) for b in known] + [pk.ejected(b) for b in known]
                args += [first, first + cap - 1, len(known), int(state.pool.slow_start > 0)]
            try:
                digests = await asyncio.wait_for(
                    client.eval(_POOLS_DIGEST, len(keys), *keys, *args),
                    self.config.redis_timeout + 0.002 * len(names),
                )
            except ResponseError as exc:  # scripting not allowed (ACL): read slices whole
                log.warning("cannot run a script (%s): pools are re-read in slices", exc)
                self.scripts = False
                return None
            for name, digest in zip(names, digests, strict=True):
                if self.pool_digests.get(name) != digest:
                    self.pool_digests[name] = digest
                    changed.append(name)
        return changed

    def _list_starts(self) -> dict[str, int]:
        """Pool -> the first list index its routes read, made again only for new routes."""
        if self.starts_of is not self.specs:
            self.starts_of = self.specs
            self.starts = {spec.pool: spec.list_start for spec in self.specs}
        return self.starts

    def _wanted_pools(self) -> list[str]:
        """The pools the routes name, in order; made again only for new routes (10,000
        routes walked every resync held the loop for over a millisecond)."""
        if not self.specs and not self.hipache:
            return [self.config.pool]
        if self.wanted_of is not self.specs:
            self.wanted_of = self.specs
            self.wanted = list(dict.fromkeys(spec.pool for spec in self.specs))
        # Not a copy (1,000 names copied and freed each resync, a cache miss each in a busy
        # worker): never edited, a new table makes a new list.
        return self.wanted

    async def _read_routes(self) -> list[RouteSpec] | None:
        """The routes as now in Redis, or None when they did not change."""
        client = self.link.client
        timeout = self.config.redis_timeout
        if self.hipache:
            keys = sorted(
                [k async for k in client.scan_iter(match=SCAN_PATTERN, count=1000)][:MAX_ROUTES]
            )
            raw: Any = keys
        else:
            raw = await self._read_routes_hash(timeout)
            if raw is None:
                return None
        if raw == self.raw_routes:
            return None
        self.raw_routes = raw
        items: Iterable[tuple[bytes, bytes]] = (
            ((k, b"") for k in raw) if self.hipache else raw.items()
        )
        chosen: dict[Match, tuple[bytes, RouteSpec]] = {}
        parsed: dict[tuple[bytes, bytes], RouteSpec | str] = {}
        bad: set[tuple[bytes, bytes]] = set()
        for count, item in enumerate(items, 1):
            spec = self.parsed.get(item)
            if spec is None:
                spec = self._parse(*item)
            parsed[item] = spec
            if isinstance(spec, str):
                bad.add(item)
                if item not in self.warned_routes:
                    log.warning("skipping route %s", spec)
            elif spec.match in chosen:
                chosen[spec.match] = _one_spelling(chosen[spec.match], (item[0], spec))
            else:
                chosen[spec.match] = (item[0], spec)
            if count % SLICE == 0:
                await asyncio.sleep(0)
        specs = [spec for _, spec in chosen.values()]
        self.parsed = parsed
        self.warned_routes = bad
        if len(self.matches) > 2 * len(parsed) + 100:
            self.matches = {f: s.match for (f, _), s in parsed.items() if not isinstance(s, str)}
        return specs

    async def _read_routes_hash(self, timeout: float) -> Any:
        """The routes hash, or None to keep the table (unchanged, or Redis lost its data)."""
        client = self.link.client
        digest: Any = None
        kind = _text(await asyncio.wait_for(client.type(ROUTES), timeout))
        if kind not in ("hash", "none"):
            if self.routes_problem != kind:
                log.error("%s holds a %s, not a hash: keeping the last-known routes", ROUTES, kind)
                self.routes_problem = kind
            return None
        if self.routes_problem is not None:
            log.info("%s is a hash again", ROUTES)
            self.routes_problem = None
        if self.scripts:
            try:
                digest, epoch, fields = await asyncio.wait_for(
                    client.eval(_ROUTES_DIGEST, 2, ROUTES, ROUTES_EPOCH), timeout
                )
            except ResponseError as exc:  # scripting not allowed (ACL): read the hash whole
                log.warning("cannot run a script (%s): the routes are read whole each resync", exc)
                self.scripts = False
        raw = None
        if not self.scripts:
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(ROUTES)
            pipe.exists(ROUTES_EPOCH)
            raw, epoch = await asyncio.wait_for(pipe.execute(), timeout + 1e-5 * len(self.parsed))
            fields = len(raw)
            if raw and not epoch:
                await asyncio.wait_for(client.set(ROUTES_EPOCH, "1", nx=True), timeout)
        elif digest == self.routes_digest:
            return None
        if not fields and not epoch and self.specs:
            if not self.routes_lost:
                log.error(
                    "Redis lost its data (%s and its epoch are both gone): keeping the "
                    "last-known %d routes until routes are written again",
                    ROUTES,
                    len(self.specs),
                )
                self.routes_lost = True
            return None
        self.routes_lost = False
        if raw is None:
            raw = await asyncio.wait_for(client.hgetall(ROUTES), timeout + 1e-5 * len(self.parsed))
            self.routes_digest = digest  # once read: a read cut short is not the routes seen
        return raw

    def _parse(self, field: bytes, value: bytes) -> RouteSpec | str:
        shown = field[:80].decode("utf-8", "backslashreplace")
        try:
            if self.hipache:
                return frontend_route(field.decode("utf-8"))
            match = self.matches.get(field)  # a reload that only moves routes to other pools
            if match is None:  # parses no match again
                match = self.matches[field] = parse_match(field.decode("utf-8"))
            return with_value(match, value.decode("utf-8"))
        except UnicodeDecodeError:
            return f"{shown!r}: not UTF-8"
        except BadRoute as exc:
            return f"{shown!r}: {exc}"

    async def _read_pools(self, states: list[PoolState]) -> None:
        """List, epoch, drain set and settings of each pool, then health and ejections."""
        client = self.link.client
        timeout = self.config.redis_timeout + 0.002 * len(states)
        cap = self.config.max_pool_entries
        start_of = self._list_starts()
        pipe = client.pipeline(transaction=False)
        for state in states:
            keys = state.keys
            first = start_of.get(state.name, 0)
            pipe.type(keys.pool)
            pipe.lrange(keys.pool, first, first + cap - 1)
            pipe.exists(keys.epoch)
            pipe.smembers(keys.draining)
            pipe.hgetall(keys.settings)
            pipe.hgetall(keys.weights)
        replies = await asyncio.wait_for(pipe.execute(raise_on_error=False), timeout)
        read: list[tuple[PoolState, list[Backend] | None, Any]] = []
        epochs: list[str] = []
        for i, state in enumerate(states):
            kind_raw, entries, epoch, draining_raw, settings_raw, weights_raw = replies[
                6 * i : 6 * i + 6
            ]
            if isinstance(kind_raw, Exception):
                raise kind_raw
            kind = _text(kind_raw)
            members = state.sync._members(kind, entries, bool(epoch))
            if kind == "list" and not epoch:  # only a real list vouches for Redis's data
                epochs.append(state.keys.epoch)
            if members is not None:
                # Kept pool (Redis lost its data, or the key is of another type): its
                # settings and weights are kept with it, not reset to the flags' and 1.
                self._apply_settings(state, settings_raw)
                self._apply_weights(state, weights_raw)
            read.append((state, members, draining_raw))
            if i % YIELD_POOLS == YIELD_POOLS - 1:
                await asyncio.sleep(0)
        pipe = client.pipeline(transaction=False)
        for key in epochs:
            pipe.set(key, "1", nx=True)
        plan: list[tuple[PoolState, list[Backend] | None, Any, list[Backend]]] = []
        for state, members, draining_raw in read:
            known = members if members is not None else list(state.pool.members)
            unique = list(dict.fromkeys(known))
            if unique:
                pipe.mget([state.keys.health(b) for b in unique])
                for backend in unique:
                    pipe.pttl(state.keys.ejected(backend))
            plan.append((state, members, draining_raw, unique))
        ramps: list[tuple[PoolState, int]] = []
        for state, *_ in plan:
            if state.pool.slow_start > 0:
                ramps.append((state, queue_up_since(pipe, state.keys, state.pool)))
        status = await asyncio.wait_for(pipe.execute(), timeout) if len(pipe) else []
        at = len(epochs)
        for count, (state, members, draining_raw, unique) in enumerate(plan, 1):
            if count % YIELD_POOLS == 0:
                await asyncio.sleep(0)
            down: list[Backend] = []
            ejected: dict[Backend, float] = {}
            if unique:
                health = status[at]
                ttls = status[at + 1 : at + 1 + len(unique)]
                at += 1 + len(unique)
                down = [b for b, s in zip(unique, health, strict=True) if s == b"down"]
                ejected = {b: ms / 1000.0 for b, ms in zip(unique, ttls, strict=True) if ms > 0}
            state.pool.update(
                members=members,
                down=down,
                draining=state.sync._parse_set(draining_raw),
                ejected=ejected,
            )
            state.sync.log_changes()
        for state, queued in ramps:
            at += queued
            state.pool.update(up_since=parse_up_since(status[at - 1]))

    def log_changes(self) -> None:
        for state in list(self.states.values()):
            state.sync.log_changes()

    def _apply_weights(self, state: PoolState, raw: Any) -> None:
        warned = self.warned_weights.get(state.name, set())
        if isinstance(raw, Exception):
            if "unreadable" not in warned:  # said once; the last-known weights are kept
                log.error("cannot read %s (%s): keeping its weights", state.keys.weights, raw)
                self.warned_weights[state.name] = {"unreadable"}
            self.raw_weights.pop(state.name, None)  # readable again: parsed again
            return
        if raw == self.raw_weights.get(state.name):
            return  # most resyncs: parsing thousands of fields again would block the loop
        self.raw_weights[state.name] = raw
        weights, problems = parse_weights(raw)
        for problem in problems:
            if problem not in warned:
                log.warning("pool %r: skipping %s", state.name, problem)
        self.warned_weights[state.name] = set(problems)
        if weights != state.pool.weights:
            state.pool.weights = weights  # the update below rebuilds the snapshot

    def _apply_settings(self, state: PoolState, raw: Any) -> None:
        if isinstance(raw, Exception):
            if self.raw_settings.get(state.name) != "unreadable":  # said once
                log.error("cannot read %s (%s): keeping its settings", state.keys.settings, raw)
                self.raw_settings[state.name] = "unreadable"
            return
        if raw == self.raw_settings.get(state.name):
            return
        self.raw_settings[state.name] = raw
        text = {_text(k): v.decode("utf-8", "replace") for k, v in raw.items()}
        overrides, problems = parse_settings(text)
        warned = self.warned_settings.get(state.name, set())
        for problem in problems:
            if problem not in warned:
                log.warning("pool %r: skipping %s", state.name, problem)
        self.warned_settings[state.name] = set(problems)
        state.reconfigure(resolve(self.config, overrides))

    async def _swap(self, wanted: list[str]) -> None:
        ctx = self.ctx
        targets = {name: self.states[name] for name in wanted}
        if not self.specs and not self.hipache:
            table = RoutingTable.default(targets[self.config.pool], self.config.pool)
        else:
            version = ctx.table.version + 1
            for step in RoutingTable.build_in_steps(self.specs, targets, version, SLICE):
                if step is None:
                    await asyncio.sleep(0)  # requests keep flowing on the old table meanwhile
                else:
                    table = step
        for state in targets.values():
            state.start_prober()
        ctx.table = table  # the one assignment every request sees either side of
        ctx.pools = targets
        self.table_owed = False
        for name in [n for n in self.states if n not in targets]:
            self.states.pop(name).retire()
            self.raw_settings.pop(name, None)
            self.pool_digests.pop(name, None)
            self.undigested.discard(name)
            self.warned_settings.pop(name, None)
            self.warned_weights.pop(name, None)
            self.raw_weights.pop(name, None)
        if not table.single:
            log.info("routing table %d: %d routes over %d pools", table.version,
                     len(table.routes), len(targets))  # fmt: skip
        await self._resubscribe()
