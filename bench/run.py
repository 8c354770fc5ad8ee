"""redlb side by side with nginx and HAProxy, in the same run, on the same pinned cores.

Layout (2 cores): every proxy under test runs alone on CPU 0; wrk (1 thread) and the
backends (one nginx worker answering on three ports) share CPU 1.  Rounds are interleaved
(each round runs every proxy once, in the opposite order every other round) and the table
shows medians.  CPU time per request is read from /proc for all of a proxy's processes,
user and system apart; Redis commands per request from INFO.

Ratios to nginx are paired by round.  A p99 is the figure machine noise moves most (a
neighbour's burst, a timer of the host): three runs of the main scenario gave redlb's p99
1.27x, 1.56x and 0.97x nginx's, while each round's redlb and nginx, measured seconds apart,
mostly share their noise.  So the "vs nginx" columns are the median of each round's ratio
(a noisy round counts once, for both, rather than nginx's median coming from a quiet round
and redlb's from a noisy one, or the reverse), the p99 column with the range of the rounds'
ratios so that the reader sees how firm it is, and the main scenario runs more rounds
(BENCH_MAIN_ROUNDS, 2 x BENCH_ROUNDS - 1 by default: 5).  The alternating order keeps a
drift over the round (a machine warming up or quietening) from always favouring the proxy
measured first.  The raw figures are the medians of the rounds, as before, and every
round's figures are in latest.json ("rounds").

redlb runs with every feature on (issue "Performance II"): routing through the 10,000-route
table (wrk sends Host host77.example.com to every proxy; nginx and HAProxy ignore it), the
per-route/backend metrics with the status listener, and the access log (to a file).
bench/relay.py, the uvloop floor that copies bytes without HTTP, runs beside them.  After the
pinned tables, "2 workers" runs nginx and redlb with two workers each, unpinned, wrk -t2 on
the same machine.  bench/readme.py then writes the summary into the README.

    make bench                       # or: .venv/bin/python bench/run.py
    BENCH_SECONDS=5 BENCH_ROUNDS=3   # per measurement, and rounds (defaults)
    BENCH_MAIN_ROUNDS=5              # rounds of the main scenario, "ok, 50 conns"
    BENCH_TARGETS=nginx,redlb,relay  # a subset (default: every proxy and the relay)
    BENCH_ONLY=routing               # only the routing scenario (10,000 routes vs one pool)
    BENCH_ONLY=tls                   # only TLS termination (bench/tls.py)
    BENCH_ONLY=websocket             # only WebSocket echo throughput (bench/ws_echo.py)
    BENCH_ONLY="2 workers"           # only the two-worker comparison
    BENCH_PURE=1                     # add "redlb (pure)": REDLB_PURE=1, interleaved with the rest
    BENCH_STRATEGIES=only            # just the strategy table (CPU per request vs round robin)
    BENCH_STRATEGIES=off             # skip it

After the proxy tables, every strategy runs the same scenario (STRATEGY_SCENARIO) as plain
round robin, interleaved in the same rounds, and the table shows its CPU per request and
Redis commands per request against round robin's.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# The scenario the goals are read from: more rounds (the module's docstring says why).
MAIN_ROUNDS = int(os.environ.get("BENCH_MAIN_ROUNDS", str(2 * ROUNDS - 1)))
MAIN_SCENARIO = "ok, 50 conns"
PROXY_CPU = "0"
LOAD_CPU = "1" if (os.cpu_count() or 1) > 1 else "0"
TICKS = os.sysconf("SC_CLK_TCK")

SCENARIOS = [
    # name, path, connections
    ("ok, 50 conns", "/ok", 50),
    ("1 KB, 50 conns", "/1k", 50),
    ("100 KB, 50 conns", "/100k", 50),
    ("ok, 1000 conns", "/ok", 1000),
]
STRATEGY_SCENARIO = ("ok, 50 conns", "/ok", 50)
TWO_WORKERS = "2 workers"  # nginx and redlb, two workers each, unpinned; wrk -t2
SHARED_CURSOR_BASE = "redlb, 2 workers, random (no shared cursor)"
REDLB_FEATURES = (
    "one worker; routing through 10,000 routes over 1,000 pools (Host host77.example.com); "
    "per-route/backend metrics with the status listener on; access log on (to a file)"
)
# --strategy arguments compared with round robin (hash: on the client address; sticky: a
# cookie wrk never sends back, so every answer also carries a Set-Cookie: the worst case).
STRATEGY_VARIANTS = [
    ("round_robin", []),
    ("round_robin, weights 1:2:3", ["--strategy", "round_robin"]),
    ("least_outstanding", ["--strategy", "least_outstanding"]),
    ("least_conn", ["--strategy", "least_conn"]),
    ("peak_ewma", ["--strategy", "peak_ewma"]),
    ("hash (ip, bounded)", ["--strategy", "hash"]),
    ("random", ["--strategy", "random"]),
    ("first", ["--strategy", "first", "--max-conns-per-backend", "20"]),
    ("round_robin + sticky", ["--sticky-cookie", "lb"]),
]


def ensure_tools() -> None:
    missing = [t for t in ("wrk", "nginx", "haproxy", "taskset") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(
            f"bench needs {', '.join(missing)}: run as root, or apt-get install wrk nginx haproxy"
        )
    print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk", "nginx", "haproxy", "util-linux"],
                   check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def pinned(cpu: str, cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], **kw)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live descendants, plus reaped children."""
    user = system = 0.0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += (int(fields[11]) + int(fields[13])) / TICKS
            system += (int(fields[12]) + int(fields[14])) / TICKS
        except (FileNotFoundError, ProcessLookupError):
            pass
    return user, system


def backends_conf(tmp: Path, ports: list[int]) -> Path:
    servers = "\n".join(
        f"""server {{ listen 127.0.0.1:{p} reuseport; keepalive_requests 1000000;
            access_log off;
            location = /ok {{ return 200 "ok\\n"; }}
            location = /1k {{ alias {tmp}/1k.bin; }}
            location = /100k {{ alias {tmp}/100k.bin; }} }}"""
        for p in ports
    )
    (tmp / "1k.bin").write_bytes(b"k" * 1024)
    (tmp / "100k.bin").write_bytes(b"h" * 100 * 1024)
    return _nginx_conf(tmp, "backends", f"http {{ default_type text/plain; {servers} }}")


def _nginx_conf(tmp: Path, name: str, http: str, workers: int = 1) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(
        f"""worker_processes {workers}; daemon off; pid {tmp}/{name}.pid; error_log {tmp}/{name}.err;
events {{ worker_connections 4096; }}
{http}
"""
    )
    return conf


def nginx_proxy_conf(tmp: Path, port: int, backends: list[int], workers: int = 1) -> Path:
    upstream = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    return _nginx_conf(
        tmp, f"proxy{workers}",
        f"""http {{ access_log off; upstream pool {{ {upstream} keepalive 64; }}
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ proxy_pass http://pool; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }} }}""",
        workers,
    )  # fmt: skip


def haproxy_conf(tmp: Path, port: int, backends: list[int]) -> Path:
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option forwardfor
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""
    )
    return conf


def run_wrk(
    port: int,
    path: str,
    connections: int,
    seconds: int = SECONDS,
    host: str | None = None,
    threads: int = 1,
    cpus: str = LOAD_CPU,
    scheme: str = "http",
    close: bool = False,
) -> dict[str, float]:
    out = subprocess.run(
        ["taskset", "-c", cpus, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
         *(["-H", f"Host: {host}"] if host else []),
         *(["-H", "Connection: close"] if close else []), f"{scheme}://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))

    def latency(pct: str) -> float:
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {"requests": requests, "rps": rps, "p50_ms": latency("50"), "p99_ms": latency("99"),
            "errors": errors}  # fmt: skip


def wait_routed(port: int, timeout: float = 30.0) -> None:
    """Until a request routed by the 10,000-route table is answered 200 (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ok", headers={"Host": ROUTED_HOST})
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


def wait_redis_quiet(client: redis.Redis, timeout: float = 20.0) -> None:
    """Until Redis serves fewer than 200 commands in each of three half seconds in a row (or
    the timeout).  A starting redlb reads the whole table once more after subscribing (its
    first pub/sub session trusts nothing read before it), a burst of some 20,000 commands
    that belongs to startup, not to the requests measured after it.  One quiet half second
    is not enough: between its first read and the second the worker subscribes to every
    pool's channel and freezes the first read out of the collector's sight, a lull that
    used to end the wait early and put the second read, 5,000 commands, in the measured
    window."""
    deadline = time.monotonic() + timeout
    before = int(client.info("stats")["total_commands_processed"])
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        time.sleep(0.5)
        now = int(client.info("stats")["total_commands_processed"])
        quiet = quiet + 1 if now - before < 200 else 0
        before = now
    if quiet < 3:
        print(f"  warning: Redis still busy after {timeout:.0f} s; startup traffic may be in "
              "the measured window", file=sys.stderr, flush=True)  # fmt: skip


class Target:
    def __init__(self, name: str, start, redis_client: redis.Redis | None = None,
                 threads: int = 1, cpus: str = LOAD_CPU, settle: float = 0.5,
                 routed: bool = True):  # fmt: skip
        self.name = name
        self._start = start
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.redis = redis_client
        self.threads = threads  # wrk's, and where it runs
        self.cpus = cpus
        self.settle = settle  # seconds between the port opening and the warm-up
        self.routed = routed  # a redlb with the 10,000-route table: wait until it has read it

    def start(self) -> None:
        self.port = free_port()
        self.process = self._start(self.port)
        wait_port(self.port)
        time.sleep(self.settle)
        if self.redis is not None and self.routed:  # its port opens before the routes are read
            wait_routed(self.port)
            wait_redis_quiet(self.redis)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def measure(
        self, path: str, connections: int, host: str | None = None, **wrk: object
    ) -> dict[str, float]:
        assert self.process is not None
        pid = self.process.pid
        # Warm-up: pools, leases, caches.
        run_wrk(self.port, path, min(connections, 50), 1, host, self.threads, self.cpus,
                **wrk)  # type: ignore[arg-type]  # fmt: skip
        cmds0 = int(self.redis.info("stats")["total_commands_processed"]) if self.redis else 0
        user0, system0 = cpu_seconds(pid)
        result = run_wrk(self.port, path, connections, host=host, threads=self.threads,
                         cpus=self.cpus, **wrk)  # type: ignore[arg-type]  # fmt: skip
        user1, system1 = cpu_seconds(pid)
        cmds = (
            (int(self.redis.info("stats")["total_commands_processed"]) - cmds0) if self.redis else 0
        )
        per_request = 1e6 / max(result["requests"], 1)
        result["cpu_us_per_req"] = (user1 - user0 + system1 - system0) * per_request
        result["user_us_per_req"] = (user1 - user0) * per_request
        result["system_us_per_req"] = (system1 - system0) * per_request
        # INFO itself is one command on each side of the run.
        result["redis_per_req"] = max(cmds - 1, 0) / max(result["requests"], 1)
        return result


def main() -> None:
    ensure_tools()
    from redlb.store.embedded import redis_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="redlb-bench-"))
    tmp.chmod(0o755)  # nginx workers (www-data) serve the response files from here
    backend_ports = [free_port() for _ in range(3)]
    procs: list[subprocess.Popen] = []
    backends = pinned(
        LOAD_CPU, ["nginx", "-c", str(backends_conf(tmp, backend_ports)), "-e", str(tmp / "b.err")]
    )
    procs.append(backends)
    redis_port = free_port()
    redis_proc = pinned(LOAD_CPU, [redis_server_binary(), "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
    procs.append(redis_proc)
    for p in backend_ports:
        wait_port(p)
    wait_port(redis_port)
    client = redis.Redis(port=redis_port)
    client.delete("servers")
    client.rpush("servers", *[f"127.0.0.1:{p}" for p in backend_ports])
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    log = (tmp / "access.log").open("ab")
    seed_routes(redis_port, backend_ports)

    def redlb(*extra: str, cpus: str | None = PROXY_CPU, pure: bool = False):
        env = {**os.environ, "REDLB_PURE": "1"} if pure else None

        def start(port: int) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "redlb", "serve", "--listen", f"127.0.0.1:{port}",
                   "--redis", redis_url, "--workers", "1", "--status-listen", "off", *extra]  # fmt: skip
            if cpus is None:
                return subprocess.Popen(cmd, stdout=log, stderr=subprocess.DEVNULL, env=env)
            return pinned(cpus, cmd, stdout=log, stderr=subprocess.DEVNULL, env=env)

        return start

    # Every feature on (the module's docstring): the routed database, metrics served.
    full = ("--redis", f"redis://127.0.0.1:{redis_port}/1", "--status-listen", "127.0.0.1:0")
    targets = [
        Target("nginx", lambda port: pinned(PROXY_CPU, ["nginx", "-c", str(nginx_proxy_conf(tmp, port, backend_ports)), "-e", str(tmp / "p.err")])),
        Target("haproxy", lambda port: pinned(PROXY_CPU, ["haproxy", "-f", str(haproxy_conf(tmp, port, backend_ports))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)),
        Target("redlb", redlb(*full), client),
        Target("redlb --rotation strict", redlb(*full, "--rotation", "strict"), client),
    ]  # fmt: skip
    if os.environ.get("BENCH_EXTRA"):  # e.g. "--no-access-log": one more redlb variant
        extra = os.environ["BENCH_EXTRA"].split()
        targets.append(Target(f"redlb {' '.join(extra)}", redlb(*full, *extra), client))
    if os.environ.get("BENCH_PURE"):  # the same redlb pure, in the same rounds: what mypyc buys
        targets.append(Target("redlb (pure)", redlb(*full, pure=True), client))
    relay = [sys.executable, str(ROOT / "bench" / "relay.py")]
    backends_arg = ",".join(map(str, backend_ports))
    targets.append(Target("relay", lambda port: pinned(PROXY_CPU, [*relay, str(port), backends_arg],
                                                       stderr=subprocess.DEVNULL)))  # fmt: skip
    if os.environ.get("BENCH_TARGETS"):  # e.g. "nginx,redlb"
        keep = os.environ["BENCH_TARGETS"].split(",")
        targets = [t for t in targets if t.name in keep or t.name.startswith("redlb --no")]
    only = os.environ.get("BENCH_ONLY")  # e.g. "ok, 50 conns" for a quick look
    wanted = [s for s in SCENARIOS if not only or s[0] == only]
    strategies_mode = os.environ.get("BENCH_STRATEGIES", "on")
    if strategies_mode == "only":
        wanted = []
    results: dict[str, dict[str, dict[str, float]]] = {}
    strategy_rows: dict[str, dict[str, float]] = {}
    routing: dict[str, float] = {}
    tls: dict[str, dict[str, dict[str, float]]] = {}
    websocket: dict[str, dict[str, float]] = {}
    two_workers: dict[str, dict[str, float]] = {}
    by_round: dict[str, dict[str, list[dict[str, float]]]] = {}  # scenario -> proxy -> rounds
    try:
        if only == "tls" or (not only and strategies_mode != "only"):
            import tls as tls_bench

            tls = tls_bench.rows(sys.modules[__name__], tmp, backend_ports, redis_url, client, log)
            if only == "tls":
                wanted = []
        if (not only or only == "routing") and strategies_mode != "only":
            routing = routing_scenario(redis_port, backend_ports, redlb)
        if (not only or only == "websocket") and strategies_mode != "only":
            from ws_echo import scenario as websocket_scenario

            websocket = websocket_scenario(tmp, client, redlb, SECONDS, ROUNDS)
        for scenario, path, connections in wanted:
            count = MAIN_ROUNDS if scenario == MAIN_SCENARIO else ROUNDS
            rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for r in range(count):
                for target in targets if r % 2 == 0 else targets[::-1]:
                    target.start()
                    try:
                        rounds[target.name].append(target.measure(path, connections, ROUTED_HOST))
                    finally:
                        target.stop()
                print(f"  {scenario}: round {r + 1}/{count} done", file=sys.stderr, flush=True)
            results[scenario] = medians(rounds)
            by_round[scenario] = rounds
            print_table(scenario, results[scenario], rounds)
        if (not only or only == TWO_WORKERS) and strategies_mode != "only":
            two_workers, by_round["two_workers"] = two_worker_scenario(
                tmp, backend_ports, redlb, full, client
            )
        if strategies_mode == "only" or (strategies_mode != "off" and not only):
            strategy_rows = compare_strategies(redlb, client)
    finally:
        for target in targets:
            target.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()
    machine = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
        "seconds": SECONDS, "rounds": ROUNDS, "main_rounds": MAIN_ROUNDS,
        "layout": f"proxy on CPU {PROXY_CPU}; wrk -t1 and nginx backends on CPU {LOAD_CPU}",
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    if strategies_mode == "only":  # a partial run: leave the full run's results alone
        (RESULTS / "strategies.json").write_text(
            json.dumps({"machine": machine, "strategies": strategy_rows}, indent=2)
        )
        return
    if only == "routing":
        (RESULTS / "routing.json").write_text(json.dumps({"machine": machine, "routing": routing}))
        return
    if only == "tls":
        (RESULTS / "tls.json").write_text(json.dumps({"machine": machine, "tls": tls}, indent=2))
        return
    if only == "websocket":
        (RESULTS / "websocket.json").write_text(
            json.dumps({"machine": machine, "websocket": websocket}, indent=2)
        )
        return
    if only == TWO_WORKERS:
        (RESULTS / "two_workers.json").write_text(
            json.dumps(
                {"machine": machine, "two_workers": two_workers, "rounds": by_round}, indent=2
            )
        )
        return
    if only:  # one scenario: a look, not the run the README quotes
        (RESULTS / "partial.json").write_text(
            json.dumps({"machine": machine, "results": results, "rounds": by_round}, indent=2)
        )
        return
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "results": results,
                "routing": routing,
                "websocket": websocket,
                "tls": tls,
                "two_workers": two_workers,
                "strategies": strategy_rows,
                "rounds": by_round,
                "build": _build(),
                "redlb_features": REDLB_FEATURES,
            },
            indent=2,
        )
    )
    if results:
        chart(results)
    print(f"\nwrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.png'}")


def two_worker_scenario(
    tmp: Path, backend_ports: list[int], redlb, full: tuple[str, ...], client: redis.Redis
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]]]:
    """nginx and redlb with two workers each, nothing pinned, wrk -t2 on the same machine
    (with the backends): the rate each gets out of both cores, interleaved rounds, medians."""
    both = "0,1" if LOAD_CPU != PROXY_CPU else "0"
    targets = [
        Target("nginx, 2 workers", lambda port: subprocess.Popen(
            ["nginx", "-c", str(nginx_proxy_conf(tmp, port, backend_ports, workers=2)),
             "-e", str(tmp / "p2.err")]), threads=2, cpus=both),
        # The supervisor opens the port before its workers have read the 10,000 routes.
        Target("redlb, 2 workers", redlb(*full, "--workers", "2", cpus=None), client,
               threads=2, cpus=both, settle=4.0),
        # The same without the shared cursor (random needs no rotation): the difference in
        # CPU and Redis commands per request is what sharing one rotation costs.
        Target(SHARED_CURSOR_BASE, redlb(*full, "--workers", "2", "--strategy", "random",
               cpus=None), client, threads=2, cpus=both, settle=4.0),
    ]  # fmt: skip
    rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    for r in range(ROUNDS):
        for target in targets if r % 2 == 0 else targets[::-1]:
            target.start()
            try:
                rounds[target.name].append(target.measure("/ok", 100, ROUTED_HOST))
            finally:
                target.stop()
        print(f"  {TWO_WORKERS}: round {r + 1}/{ROUNDS} done", file=sys.stderr, flush=True)
    rows = medians(rounds)
    print_table(f"{TWO_WORKERS}, unpinned, ok, 100 conns", rows, rounds)
    return rows, rounds


def medians(rounds: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each proxy's figures: the median of its rounds, figure by figure."""
    return {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rounds.items()
    }


def _build() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import redlb.build as b; print(b.describe())"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() or "unknown"


def compare_strategies(redlb, client: redis.Redis) -> dict[str, dict[str, float]]:
    """Every strategy against round robin: the same scenario, interleaved rounds, medians."""
    _, path, connections = STRATEGY_SCENARIO
    weighted = "round_robin, weights 1:2:3"
    variants = [Target(name, redlb(*args), client) for name, args in STRATEGY_VARIANTS]
    rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in variants}
    members = [m.decode() for m in client.lrange("servers", 0, -1)]
    for r in range(ROUNDS):
        for target in variants:
            if target.name == weighted:
                client.hset(
                    "redlb:servers:weights", mapping=dict(zip(members, "123", strict=False))
                )
            target.start()
            try:
                rounds[target.name].append(target.measure(path, connections))
            finally:
                target.stop()
                client.delete("redlb:servers:weights")
        print(f"  strategies: round {r + 1}/{ROUNDS} done", file=sys.stderr, flush=True)
    rows = {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rounds.items()
    }
    base = rows["round_robin"]
    print(f"\n## strategies ({STRATEGY_SCENARIO[0]}): CPU per request against round robin")
    print(
        "| strategy | req/s | p99 ms | errors | CPU µs/req | CPU vs round robin | Redis cmds/req |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['errors']:.0f} | "
            f"{r['cpu_us_per_req']:.1f} | {r['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}x | "
            f"{r['redis_per_req']:.4f} |"
        )
    sys.stdout.flush()
    return rows


# The routing scenario: 5,000 exact hosts, 1,000 wildcards, 4,000 path prefixes, 1,000 pools.
ROUTE_POOLS = 1000
ROUTED_HOST = "host77.example.com"


def _routes(generation: int) -> dict[str, str]:
    """The whole table; each generation sends every route to another pool."""
    routes = {}
    for i in range(5000):
        routes[f"host{i}.example.com/"] = f"pool{(i + generation) % ROUTE_POOLS}"
    for i in range(1000):
        routes[f"*.wild{i}.example.org/"] = f"pool{(i * 7 + generation) % ROUTE_POOLS}"
    for i in range(4000):
        routes[f"/svc{i}/v{i % 3}"] = f"pool{(i * 13 + generation) % ROUTE_POOLS}"
    return routes


def seed_routes(redis_port: int, backend_ports: list[int]) -> redis.Redis:
    """Database 1: the 10,000 routes over 1,000 pools of the three backends."""
    routed_db = redis.Redis(port=redis_port, db=1)
    routed_db.flushdb()
    pipe = routed_db.pipeline(transaction=False)
    members = [f"127.0.0.1:{p}" for p in backend_ports]
    for p in range(ROUTE_POOLS):
        pipe.rpush(f"pool{p}", *members)
    pipe.hset("redlb:routes", mapping=_routes(0))
    pipe.execute()
    return routed_db


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def routing_scenario(redis_port: int, backend_ports: list[int], redlb) -> dict[str, float]:
    """One pool against 10,000 routes over 1,000 pools, same run, interleaved rounds.

    The routed instance uses Redis database 1 (the single-pool one keeps database 0), so the
    two never see each other's keys.  Reported: CPU per request of each and their ratio, the
    worker's RSS of each, and p99 latency while the whole table is replaced every 0.5 s.
    """
    routed_db = seed_routes(redis_port, backend_ports)
    client = redis.Redis(port=redis_port)
    single = Target("redlb, one pool", redlb(), client)
    routed = Target("redlb, 10,000 routes", redlb("--redis", f"redis://127.0.0.1:{redis_port}/1"),
                    client)  # fmt: skip
    rounds: dict[str, list[dict[str, float]]] = {single.name: [], routed.name: []}
    for r in range(ROUNDS):
        for target in (single, routed):
            target.start()
            try:
                time.sleep(1.0)  # the table is loaded before the listener opens; let it settle
                host = ROUTED_HOST if target is routed else None
                result = target.measure("/ok", 50, host)
                assert target.process is not None
                result["rss_mb"] = _rss_mb(target.process.pid)
                rounds[target.name].append(result)
            finally:
                target.stop()
        print(f"  routing: round {r + 1}/{ROUNDS} done", file=sys.stderr, flush=True)
    med = {
        name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in rounds.items()
    }
    # Replacing the whole table (10,000 HSET fields in one command) every 0.5 s under load.
    routed.start()
    stop = threading.Event()
    reloads = 0

    def reload() -> None:
        nonlocal reloads
        while not stop.wait(0.5):
            reloads += 1
            routed_db.hset("redlb:routes", mapping=_routes(reloads))

    try:
        time.sleep(1.0)
        steady = run_wrk(routed.port, "/ok", 50, host=ROUTED_HOST)
        thread = threading.Thread(target=reload, daemon=True)
        thread.start()
        during = run_wrk(routed.port, "/ok", 50, host=ROUTED_HOST)
        stop.set()
        thread.join()
    finally:
        routed.stop()
    one, many = med[single.name], med[routed.name]
    summary = {
        "cpu_us_per_req_one_pool": one["cpu_us_per_req"],
        "cpu_us_per_req_10k_routes": many["cpu_us_per_req"],
        "cpu_ratio": many["cpu_us_per_req"] / one["cpu_us_per_req"],
        "rps_one_pool": one["rps"],
        "rps_10k_routes": many["rps"],
        "redis_per_req_10k_routes": many["redis_per_req"],
        "rss_mb_one_pool": one["rss_mb"],
        "rss_mb_10k_routes": many["rss_mb"],
        "rss_delta_mb": many["rss_mb"] - one["rss_mb"],
        "p99_ms_steady": steady["p99_ms"],
        "p99_ms_during_reloads": during["p99_ms"],
        "p99_ratio": during["p99_ms"] / max(steady["p99_ms"], 1e-9),
        "reloads": reloads,
        "errors_during_reloads": during["errors"],
    }
    print("\n## routing: 10,000 routes over 1,000 pools vs one pool")
    for key, value in summary.items():
        print(f"{key:28} {value:10.3f}")
    return summary


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def print_table(
    scenario: str,
    rows: dict[str, dict[str, float]],
    rounds: dict[str, list[dict[str, float]]] | None = None,
) -> None:
    """Medians of the rounds; ratios to nginx paired by round (readme.vs_nginx), p99's with
    the range of its rounds' ratios."""
    from readme import vs_nginx

    print(f"\n## {scenario}" + (f" ({len(next(iter(rounds.values())))} rounds)" if rounds else ""))
    print(
        "| proxy | req/s | p50 ms | p99 ms | errors | CPU µs/req | user µs/req | system µs/req | Redis cmds/req | req/s vs nginx | CPU vs nginx | p99 vs nginx | p99 vs nginx, range |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p99, low, high = vs_nginx(rows, name, "p99_ms", rounds)
        print(
            f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']:.0f} | "
            f"{r['cpu_us_per_req']:.1f} | {r['user_us_per_req']:.1f} | {r['system_us_per_req']:.1f} | "
            f"{r['redis_per_req']:.4f} | {vs_nginx(rows, name, 'rps', rounds)[0]:.2f}x | "
            f"{vs_nginx(rows, name, 'cpu_us_per_req', rounds)[0]:.2f}x | {p99:.2f}x | {low:.2f}-{high:.2f}x |"
        )
    sys.stdout.flush()


def chart(results: dict[str, dict[str, dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results)
    names = list(results[scenarios[0]])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(scenarios))]
        axes[0].bar(xs, [results[s][name]["rps"] for s in scenarios], width, label=name)
        axes[1].bar(xs, [results[s][name]["cpu_us_per_req"] for s in scenarios], width, label=name)
    for ax, title in zip(axes, ("requests/s (one pinned core)", "CPU µs per request"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))], scenarios, fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("redlb vs nginx vs HAProxy — make bench")
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=100)


if __name__ == "__main__":
    main()
