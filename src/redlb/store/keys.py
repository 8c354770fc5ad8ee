"""The Redis schema: every key redlb reads or writes, in one place.

Given a pool key ``P`` (default ``servers``):

``P`` (LIST, owned by the user)
    Backend entries, ``host:port`` / ``http://host:port`` / ``[::1]:port``.  Edited with plain
    ``redis-cli LPUSH/RPUSH/LREM/DEL``; redlb only ever reads it (``LRANGE`` with a cap), so
    rotation never races an edit and a crashed redlb can never lose a server.
``redlb:{P}:rr`` (STRING, integer)
    The shared round-robin counter.  Default mode leases blocks with ``INCRBY``; strict mode
    takes exactly one number per request (batched ``INCRBY``).  Index = counter mod pool size.
``redlb:{P}:epoch`` (STRING)
    Written by the first instance that reads ``P`` as a real list, and only by such an
    instance: one that knows no pool (new, restarted) never writes it, or it would turn lost
    data into "empty" for the others.  If it vanishes together with ``P``, Redis lost its data
    (restart without persistence, FLUSHALL): keep the last-known pool and say so loudly.  If
    ``P`` is gone but the epoch is present, the pool really is empty: 503.
``redlb:{P}:health:{backend}`` (STRING ``up``/``down``, TTL 5 probe intervals)
    Written by the one elected prober of that backend.  A missing key means "no news", which
    routes normally: a dead prober must never take a healthy backend out.  It outlives the
    lease so that the instance taking over starts from it.
``redlb:{P}:probe:{backend}`` (STRING instance id, TTL 3 probe intervals)
    The prober lease: ``SET NX PX``, renewed by its owner only (Lua compare-and-expire).
``redlb:{P}:ejected:{backend}`` (STRING, TTL = ejection time)
    Passive ejection, keyed by backend identity (never list position) and always with a TTL.
``redlb:{P}:ejections:{backend}`` (STRING integer, TTL)
    How many times the backend was ejected recently; the ejection time doubles with each.
``redlb:{P}:draining`` (SET)
    Backends taking no new requests (``redlb backend drain``).
``redlb:{P}:events`` (pub/sub channel)
    redlb publishes here after changing any of the above, so every instance re-reads at once.
``__keyspace@{db}__:{P}`` (keyspace notifications)
    How plain redis-cli edits of ``P`` (and of the settings, weights and routes hashes) reach
    redlb in milliseconds.  The resync (every ``--resync-interval``, 1 s) is the fallback:
    with notifications off or unknown it compares every pool each time; with them on (one
    ``CONFIG GET`` a resync says so) it is a backstop that compares a slice of the pools
    each time (every pool within 2 minutes) and the routes every 2 minutes, or everything
    at once when ``redlb:routes:epoch`` vanished (FLUSHALL sends no notification).  A drain
    set edited with plain ``redis-cli SADD`` (no notification class redlb turns on) is seen
    by that backstop; ``redlb backend drain`` publishes at once.
``redlb:{P}:settings`` (HASH, owned by the user)
    Per-pool settings over the ``serve`` flags (``redlb pool set``): ``rotation``,
    ``health_path``, ``health_interval``, ``connect_timeout``, ``upstream_timeout``,
    ``retry_attempts``, ``retry_budget``, ``max_conns``, ``max_body``, ``strategy``,
    ``hash_key``, ``hash_balance``, ``sticky``, ``slow_start``.  A bad value is skipped with
    one warning naming the key.
``redlb:{P}:weights`` (HASH, owned by the user)
    field = backend, value = weight 1..1000 (absent: 1); ``redlb backend weight ADDR N`` or
    ``redis-cli HSET redlb:servers:weights 10.0.0.1:8080 3``.  Every strategy that can
    honours it (round robin becomes nginx's smooth weighted round robin).  Edits apply within
    a second (keyspace notification, else the resync).
``redlb:{P}:up-since`` (HASH, written by redlb, only with ``slow_start``)
    field = backend, value = wall-clock seconds it (re)joined the healthy set, ``HSETNX`` by
    the first instance that saw it join, ``HDEL`` when one sees it leave: the fleet ramps
    its weight from one start.
``redlb:{P}:inflight:{instance}`` (STRING ``backend=n,...``, TTL 2 s)
    One instance's mean requests in flight per backend since its last write, rewritten every
    25-100 ms by least_outstanding / peak_ewma / bounded hash pools when other instances
    read them (store/inflight.py: not while alone, not while idle); a crashed instance's
    counts expire.
``redlb:{P}:inflight`` (ZSET instance -> last announce, ms)
    Which instances publish: read once a second, announced every 10 s, pruned of instances
    silent for a minute.  Neither read nor announced by an instance whose pool is dormant
    (no request there for 10 s): its next request announces it again.

Routing (one hash for the whole fleet):

``redlb:routes`` (HASH, owned by the user)
    field = MATCH, value = ``POOL [strip-prefix] [host=NAME]``.  MATCH is ``host/path``,
    ``*.suffix/path`` (any depth of subdomain) or ``/path`` (any host); ``redis-cli HSET
    redlb:routes api.example.com/ api`` sends that host to the pool (list) ``api``.  While the
    hash is empty or missing, everything goes to ``--pool`` (``servers``) as before.
``redlb:routes:epoch`` (STRING)
    Written by redlb when it reads a non-empty routes hash.  Routes and epoch both gone: Redis
    lost its data, the last-known table keeps serving (logged); routes gone, epoch present:
    the routes were deleted, everything goes to ``--pool`` again.
``redlb:routes:events`` (pub/sub channel)
    ``redlb route`` publishes here after an edit; redis-cli edits arrive as keyspace events.
    One pub/sub connection per process listens to this, the routes hash and every routed pool.
``redlb:sticky-secret`` (STRING, written once by redlb)
    The HMAC key of sticky-session cookies, ``SET NX`` by the first instance that needs it;
    ``DEL`` rotates it (every cookie then names nothing and is replaced on the next answer).
``frontend:{HOST}`` (LIST, Hipache's schema, read with ``serve --hipache``)
    First element an identifier, then backend URLs; ``frontend:*.example.com`` for wildcards.

The fleet (fleet/publisher.py writes, fleet/view.py reads; two commands a second a worker):

``redlb:fleet:workers`` (ZSET, member ``INSTANCE/WORKER``, score = last heartbeat, Unix s)
    Who is alive: readers take the members seen in the last few seconds.  Members older than
    a minute are pruned by the publishers.
``redlb:fleet:worker:{INSTANCE}/{WORKER}`` (STRING JSON, TTL 5 s)
    The worker's identity (instance id, host, pid, version, start time, listeners, routes)
    and its counters per backend: the last second and the last minute (latency buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

from redlb.address import Backend

ROUTES = "redlb:routes"
# The sticky-session HMAC secret (STRING), created once with SET NX; SET a new value to rotate it.
STICKY_SECRET = "redlb:sticky-secret"
ROUTES_EVENTS = "redlb:routes:events"
ROUTES_EPOCH = "redlb:routes:epoch"
FLEET_WORKERS = "redlb:fleet:workers"


def fleet_worker(member: str) -> str:
    """The heartbeat document of one worker (``member`` = ``INSTANCE/WORKER``)."""
    return f"redlb:fleet:worker:{member}"


@dataclass(frozen=True, slots=True)
class Keys:
    pool: str

    @property
    def counter(self) -> str:
        return f"redlb:{self.pool}:rr"

    @property
    def epoch(self) -> str:
        return f"redlb:{self.pool}:epoch"

    @property
    def draining(self) -> str:
        return f"redlb:{self.pool}:draining"

    @property
    def events(self) -> str:
        return f"redlb:{self.pool}:events"

    @property
    def settings(self) -> str:
        return f"redlb:{self.pool}:settings"

    @property
    def weights(self) -> str:
        return f"redlb:{self.pool}:weights"

    @property
    def up_since(self) -> str:
        return f"redlb:{self.pool}:up-since"

    @property
    def inflight_index(self) -> str:
        return f"redlb:{self.pool}:inflight"

    def inflight(self, instance: str) -> str:
        return f"redlb:{self.pool}:inflight:{instance}"

    def health(self, backend: Backend) -> str:
        return f"redlb:{self.pool}:health:{backend.key}"

    def probe_lease(self, backend: Backend) -> str:
        return f"redlb:{self.pool}:probe:{backend.key}"

    def ejected(self, backend: Backend) -> str:
        return f"redlb:{self.pool}:ejected:{backend.key}"

    def ejections(self, backend: Backend) -> str:
        return f"redlb:{self.pool}:ejections:{backend.key}"

    def keyspace_channel(self, db: int) -> str:
        return f"__keyspace@{db}__:{self.pool}"
