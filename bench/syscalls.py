"""System calls per proxied request, by kind: redlb beside nginx and the relay floor.

The same set-up as bench/run.py's "ok, 50 conns" row (10,000 routes, metrics with the status
listener, access log to a file; one worker pinned to CPU 0, wrk and the backends on CPU 1).
After a warm-up, ``strace -c -f`` is attached to the serving process(es) for one wrk run:
counts are deterministic enough to compare where timings are not (strace slows the proxy
down, which changes how many events one wakeup sees, so compare at equal connections).

    .venv/bin/python bench/syscalls.py                   # redlb, nginx, relay
    SYSCALLS_TARGETS=redlb,redlb-pure SYSCALLS_SECONDS=3 .venv/bin/python bench/syscalls.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the same backends, route table and wrk as make bench

SECONDS = int(os.environ.get("SYSCALLS_SECONDS", "3"))
CONNECTIONS = int(os.environ.get("SYSCALLS_CONNECTIONS", "50"))
TARGETS = os.environ.get("SYSCALLS_TARGETS", "redlb,nginx,relay").split(",")
# A syscall name: instead of counting, print its most frequent call stacks (strace -k).
STACKS = os.environ.get("SYSCALLS_STACKS", "")
# Set: no load at all, the background's calls over SYSCALLS_SECONDS (shown as "per request").
IDLE = bool(os.environ.get("SYSCALLS_IDLE"))


def serving_pids(pid: int, name: str) -> list[int]:
    """The processes that serve: nginx's worker (not its master), else the process itself."""
    if name != "nginx":
        return [pid]
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()] or [pid]


def parse_summary(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$", line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    return calls


def measure(target: bench.Target, name: str, tmp: Path) -> tuple[int, dict[str, int]]:
    assert target.process is not None
    bench.run_wrk(target.port, "/ok", CONNECTIONS, 1, bench.ROUTED_HOST)  # warm-up
    out = tmp / f"strace-{name}.txt"
    pids = serving_pids(target.process.pid, name)
    mode = ["-k", "-e", f"trace={STACKS}"] if STACKS else ["-c"]
    strace = subprocess.Popen(
        ["strace", *mode, "-f", "-o", str(out), *[a for p in pids for a in ("-p", str(p))]],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached
    if IDLE:
        time.sleep(SECONDS)
        result = {"requests": 1}
    else:
        result = bench.run_wrk(target.port, "/ok", CONNECTIONS, SECONDS, bench.ROUTED_HOST)
    strace.send_signal(signal.SIGINT)
    strace.wait(30)
    if STACKS:
        print_stacks(name, int(result["requests"]), out.read_text())
        return int(result["requests"]), {}
    return int(result["requests"]), parse_summary(out.read_text())


def print_stacks(name: str, requests: int, text: str) -> None:
    stacks: dict[str, int] = {}
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith(">"):
            frame = line.split(">", 1)[1].strip()
            current.append(re.sub(r"\s*\[0x[0-9a-f]+\]$", "", frame.rsplit("/", 1)[-1]))
        else:
            if current:
                key = " < ".join(current[1:9])
                stacks[key] = stacks.get(key, 0) + 1
            current = []
    print(f"\n{name}: {STACKS} stacks per request ({requests:,} requests)")
    for key, n in sorted(stacks.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {n / max(requests, 1):.3f}  {key}")


def main() -> None:
    from redlb.store.embedded import redis_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="redlb-syscalls-"))
    tmp.chmod(0o755)
    backend_ports = [bench.free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    conf = bench.backends_conf(tmp, backend_ports)
    procs.append(bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(conf), "-e", str(tmp / "b.err")]))
    redis_port = bench.free_port()
    procs.append(
        bench.pinned(bench.LOAD_CPU, [redis_server_binary(), "--port", str(redis_port), "--save",
                                      "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    )  # fmt: skip
    for p in [*backend_ports, redis_port]:
        bench.wait_port(p)
    bench.seed_routes(redis_port, backend_ports)
    log = (tmp / "access.log").open("ab")
    full = ["--redis", f"redis://127.0.0.1:{redis_port}/1", "--status-listen", "127.0.0.1:0"]

    def redlb(pure: bool):  # type: ignore[no-untyped-def]
        env = {**os.environ, "REDLB_PURE": "1"} if pure else None
        return lambda port: bench.pinned(bench.PROXY_CPU, [
            sys.executable, "-m", "redlb", "serve", "--listen", f"127.0.0.1:{port}",
            "--workers", "1", *full], stdout=log, stderr=subprocess.DEVNULL, env=env)  # fmt: skip

    starters = {
        "redlb": (redlb(False), True),
        "redlb-pure": (redlb(True), True),
        "nginx": (lambda port: bench.pinned(bench.PROXY_CPU, ["nginx", "-c", str(
            bench.nginx_proxy_conf(tmp, port, backend_ports)), "-e", str(tmp / "p.err")]), False),
        "relay": (lambda port: bench.pinned(bench.PROXY_CPU, [
            sys.executable, str(bench.ROOT / "bench" / "relay.py"), str(port),
            ",".join(map(str, backend_ports))], stderr=subprocess.DEVNULL), False),
    }  # fmt: skip
    rows: dict[str, tuple[int, dict[str, int]]] = {}
    try:
        for name in TARGETS:
            start, routed = starters[name]
            target = bench.Target(name, start, routed=routed)
            if routed:
                target.redis = object()  # type: ignore[assignment]  # only "wait until routed"
            target.start()
            try:
                rows[name] = measure(target, name, tmp)
            finally:
                target.stop()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()
    kinds = sorted({k for _, calls in rows.values() for k in calls},
                   key=lambda k: -max(c.get(k, 0) / max(n, 1) for n, c in rows.values()))  # fmt: skip
    print(f"\nsystem calls per request (strace -c -f, wrk {CONNECTIONS} conns, {SECONDS} s, /ok)")
    print("| syscall | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| requests | " + " | ".join(f"{n:,}" for n, _ in rows.values()) + " |")
    totals = [sum(c.values()) / max(n, 1) for n, c in rows.values()]
    print("| **total** | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")
    for kind in kinds:
        values = [c.get(kind, 0) / max(n, 1) for n, c in rows.values()]
        if max(values) >= 0.005:
            print(f"| {kind} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
