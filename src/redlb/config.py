"""Every knob in one Config, resolved once; the CLI only builds one of these."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from redlb.address import parse_listen
from redlb.balancer.requestkey import parse_cookie_name, parse_key_spec

ROTATIONS = ("lease", "strict")
LOG_FORMATS = ("text", "json")
# How a pool picks a backend (README "Strategies"); round_robin uses --rotation.
STRATEGIES = (
    "round_robin",
    "least_outstanding",
    "least_conn",
    "peak_ewma",
    "hash",
    "random",
    "first",
)


@dataclass(slots=True)
class Config:
    # Listeners
    listen: str | None = "127.0.0.1:8000"  # None: no plain-HTTP listener (--listen off)
    status_listen: str | None = "127.0.0.1:8100"  # loopback only: /-/ready, /-/live, /metrics
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    # TLS termination (tls/): one more listener, certificate pairs in order (first = default)
    tls_listen: str | None = None
    tls_pairs: tuple[tuple[str, str], ...] = ()  # (cert file, key file)
    redirect_https: bool = False  # the plain listener redirects to https instead of proxying

    # Redis
    redis_url: str | None = None  # None: start an embedded redis-server
    state_dir: str = ".redlb"
    pool: str = "servers"
    rotation: str = "lease"

    # Strategy (per pool through redlb:{P}:settings; these are the defaults)
    strategy: str = "round_robin"
    hash_key: str = "ip"  # ip, path, header:NAME, cookie:NAME, query:NAME
    hash_balance: float = 0.25  # bounded loads: no backend over (1 + this) x average; 0 = off
    sticky: str | None = None  # sticky-session cookie name; None = off
    slow_start: float = 0.0  # seconds a joining backend ramps its weight over; 0 = off
    redis_timeout: float = 0.25
    resync_interval: float = 1.0
    max_pool_entries: int = 10_000
    hipache: bool = False  # route by Hipache's frontend:HOST lists instead of redlb:routes

    # Logging
    access_log: bool = True
    log_format: str = "text"  # or "json": access log and events, one JSON object a line

    # Operations (admin/): API + dashboard listener; off unless given.
    admin_listen: str | None = None
    admin_token: str | None = field(default=None, repr=False)  # from a file or the env only

    # Request limits (0 = unlimited for max_body only)
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_body: int = 10 * 1024 * 1024
    # Host names this balancer answers for (lower case, no port); empty = any Host.
    allowed_hosts: frozenset[str] = frozenset()

    # Timeouts, seconds
    header_timeout: float = 10.0
    body_min_rate: int = 500  # bytes/s, enforced after body_rate_grace
    body_rate_grace: float = 10.0
    keepalive_timeout: float = 15.0
    connect_timeout: float = 3.0
    upstream_timeout: float = 60.0
    # A client that leaves its socket full this long is cut off (nginx send_timeout: 60 s).
    send_timeout: float = 60.0
    drain_timeout: float = 30.0
    # A WebSocket tunnel with no byte either way this long is closed (common LB default: 1 h).
    tunnel_timeout: float = 3600.0

    # Upstream
    max_idle_per_backend: int = 1024  # idle ones expire after 20 s; churn costs more
    # Envoy's circuit-breaker defaults: 1024 connections and 1024 waiting requests.
    max_conns_per_backend: int = 1024
    max_queue_per_backend: int = 1024
    queue_timeout: float = 3.0
    # https:// backends: verified against the system store, or only this CA bundle
    upstream_ca: str | None = None
    upstream_insecure: bool = False  # no verification at all (logged at startup)

    # Retries
    max_connect_attempts: int = 3
    retry_budget_percent: float = 20.0
    retry_min_concurrency: int = 3

    # Active health checks (off unless health_path is set)
    health_path: str | None = None
    health_interval: float = 2.0
    health_timeout: float = 1.0
    health_rise: int = 2
    health_fall: int = 3

    # Passive ejection
    eject_consecutive: int = 5
    eject_on_5xx: bool = True  # False: only connect failures and timeouts count
    eject_base_time: float = 30.0
    eject_max_time: float = 300.0
    eject_max_percent: float = 50.0

    def validate(self) -> None:
        """Raise ValueError with one clear sentence for a bad combination."""
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; choose one of {ROTATIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        parse_key_spec(self.hash_key)
        if not 0 <= self.hash_balance <= 10:
            raise ValueError("--hash-balance must be within 0..10")
        if self.sticky is not None:
            parse_cookie_name(self.sticky)
        if not 0 <= self.slow_start <= 3600:
            raise ValueError("--slow-start must be within 0..3600 seconds")
        if self.listen is not None:
            try:
                parse_listen(self.listen)
            except ValueError as exc:
                raise ValueError(f"--listen: {exc}") from None
        self._validate_tls()
        if self.status_listen:
            try:
                host, _ = parse_listen(self.status_listen)
            except ValueError as exc:
                raise ValueError(f"--status-listen: {exc}") from None
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError("the status listener must be on loopback (127.0.0.1 or ::1)")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {self.log_format!r}; choose one of {LOG_FORMATS}")
        if self.admin_listen:
            try:
                host, _ = parse_listen(self.admin_listen)
            except ValueError as exc:
                raise ValueError(f"--admin-listen: {exc}") from None
            if host not in ("127.0.0.1", "::1", "localhost") and not self.admin_token:
                raise ValueError(
                    "the admin listener is off loopback: give a token (--admin-token-file "
                    "or REDLB_ADMIN_TOKEN) or listen on 127.0.0.1 / ::1"
                )
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError("--health-path must start with /")
        if self.health_path is not None and any(c <= " " or c == "\x7f" for c in self.health_path):
            # It is written into the probe's request line as is.
            raise ValueError("--health-path must not contain spaces or control characters")
        if not 0 <= self.eject_max_percent <= 100:
            raise ValueError("--eject-max-percent must be within 0..100")
        if self.send_timeout <= 0:
            raise ValueError("--send-timeout must be > 0")
        if self.max_body < 0:
            raise ValueError("--max-body must be >= 0")
        if self.upstream_insecure and self.upstream_ca:
            raise ValueError("--upstream-insecure verifies nothing: it cannot take --upstream-ca")

    def _validate_tls(self) -> None:
        if self.tls_listen is not None:
            try:
                parse_listen(self.tls_listen)
            except ValueError as exc:
                raise ValueError(f"--tls-listen: {exc}") from None
            if not self.tls_pairs:
                raise ValueError("--tls-listen needs a certificate: --tls-cert FILE --tls-key FILE")
        elif self.tls_pairs:
            raise ValueError("--tls-cert/--tls-key given without --tls-listen")
        if self.listen is None and self.tls_listen is None:
            raise ValueError("--listen off needs --tls-listen: nothing would be served")
        if self.redirect_https and (self.listen is None or self.tls_listen is None):
            raise ValueError("--redirect-https needs both --listen and --tls-listen")
