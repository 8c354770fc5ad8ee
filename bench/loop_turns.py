"""Who holds redlb's event loop, and for how long: every callback timed under the bench's load.

The tail latency of a proxy with one event loop is made by the turns that hold the loop: a
callback that runs for 0.8 ms delays every request in flight by 0.8 ms.  This runs the main
scenario of bench/run.py ("ok, 50 conns": the proxy alone on CPU 0, wrk -t1 -c50 with Host
host77.example.com, the nginx backends and Redis on CPU 1, the 10,000-route table, metrics
with the status listener, the access log to a file) with a probe in the worker:

- every callback the loop runs through ``call_soon`` / ``call_later`` / ``call_at`` (task
  steps, timers, future callbacks: all the work that is not a socket's event) is timed with
  ``time.thread_time`` (CPU of the loop's thread: what other callbacks wait behind, machine
  noise left out) and named (a task step by its coroutine, and where it stopped);
- every collection of the cyclic garbage collector, by generation;
- the CPU and context switches of the worker's other threads (the access-log writer), the
  CPU of the loop thread, and the Redis commands a second (INFO commandstats);
- the long turns one by one (in --json): with their page faults and context switches.

Printed: per name, calls, CPU per second, and turns a second over 100/200/500 µs, plus the
long turns' total.  The socket events (the requests) are not timed: what is timed is the
work that is not a request's.  The probe lives only here (a wrapper that patches uvloop.Loop
before redlb starts); the product carries none of it.  Nothing here asserts a timing: it
counts.  thread_time leaves other processes' time out, not their effect on the caches: on
a busy machine the same turns measure longer.

    .venv/bin/python bench/loop_turns.py                 # 5 s of load, wrk's p50/p99 too
    TURNS_SECONDS=10 .venv/bin/python bench/loop_turns.py --json out.json
    .venv/bin/python bench/loop_turns.py -- --no-access-log   # more serve flags
    TURNS_FUNCS="redlb.metrics.snapshot:_rss redlb.fleet.publisher:Publisher.document" \
        .venv/bin/python bench/loop_turns.py             # these functions timed too ("fn")
    PYTHONPATH=/elsewhere/src .venv/bin/python bench/loop_turns.py   # another checkout's redlb
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECONDS = int(os.environ.get("TURNS_SECONDS", "5"))
THRESHOLDS_US = (100, 200, 500)


# The child: redlb serve with uvloop.Loop patched; SIGUSR1 starts a window, SIGUSR2 ends it
# and writes the figures to the file named by the first argument.


def child(out: str, args: list[str]) -> None:
    import asyncio
    import gc
    import resource

    import uvloop

    cpu = time.thread_time_ns
    usage = resource.getrusage
    thread = resource.RUSAGE_THREAD
    # name -> [calls, total ns, over 100 µs, over 200 µs, over 500 µs, max ns]
    stats: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0])
    # (monotonic, name, ns, minor faults, preempted, voluntary switches) of those over 100 µs
    long_turns: list[tuple[float, str, int, int, int, int]] = []
    window: dict[str, float] = {"on": 0.0, "start": 0.0, "cpu0": 0.0}
    gc_start = [0]

    def record(name: str, dt: int) -> None:
        """One timed call into its row of ``stats``."""
        row = stats[name]
        row[0] += 1
        row[1] += dt
        for i, bound in enumerate(THRESHOLDS_US):
            if dt > bound * 1000:
                row[2 + i] += 1
        row[5] = max(row[5], dt)

    def chain(coro: Any) -> str:
        """Where a coroutine stands: each awaiting coroutine with its line, outermost first."""
        parts = []
        while coro is not None and hasattr(coro, "cr_frame"):
            frame = coro.cr_frame
            parts.append(f"{getattr(coro, '__qualname__', '?')}:{frame.f_lineno if frame else '-'}")
            coro = getattr(coro, "cr_await", None)
        return " > ".join(parts)

    def where(callback: Any) -> str:
        owner = getattr(callback, "__self__", None)
        if isinstance(owner, asyncio.Task):
            return "task " + chain(owner.get_coro())
        if owner is not None:
            return f"{type(owner).__qualname__}.{getattr(callback, '__name__', '?')}"
        return getattr(callback, "__qualname__", None) or repr(callback)

    def task_of(callback: Any) -> Any:
        owner = getattr(callback, "__self__", None)
        return owner if isinstance(owner, asyncio.Task) else None

    def timed(callback: Any) -> Any:
        def run(*args: Any) -> None:
            if not window["on"]:
                callback(*args)
                return
            before = where(callback)
            u0 = usage(thread)
            t0 = cpu()
            try:
                callback(*args)
            finally:
                dt = cpu() - t0
                u1 = usage(thread)
                task = task_of(callback)
                after = chain(task.get_coro()) if task is not None and not task.done() else "end"
                name = before if task is None else f"{before}  ==>  {after}"
                record(name, dt)
                if dt > THRESHOLDS_US[0] * 1000:
                    # Page faults and context switches (involuntary: preempted) within it.
                    long_turns.append(
                        (
                            time.monotonic(),
                            name,
                            dt,
                            u1.ru_minflt - u0.ru_minflt,
                            u1.ru_nivcsw - u0.ru_nivcsw,
                            u1.ru_nvcsw - u0.ru_nvcsw,
                        )
                    )

        return run

    base = uvloop.Loop
    call_soon, call_later, call_at = base.call_soon, base.call_later, base.call_at

    def patched_call_soon(self: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        return call_soon(self, timed(callback), *args, context=context)

    def patched_call_later(
        self: Any, delay: float, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        return call_later(self, delay, timed(callback), *args, context=context)

    def patched_call_at(
        self: Any, when: float, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        return call_at(self, when, timed(callback), *args, context=context)

    base.call_soon = patched_call_soon  # type: ignore[method-assign]
    base.call_later = patched_call_later  # type: ignore[method-assign]
    base.call_at = patched_call_at  # type: ignore[method-assign]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not window["on"]:
            return
        if phase == "start":
            gc_start[0] = cpu()
            return
        dt = cpu() - gc_start[0]
        record(f"gc generation {info['generation']}", dt)
        if dt > THRESHOLDS_US[0] * 1000:
            long_turns.append(
                (time.monotonic(), f"gc generation {info['generation']}", dt, 0, 0, 0)
            )

    gc.callbacks.append(on_gc)

    def threads_cpu() -> dict[str, float]:
        out: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for task in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
                status = Path(f"/proc/self/task/{task}/status").read_text()
            except OSError:
                continue
            switches = [int(line.split()[1]) for line in status.splitlines()
                        if line.endswith("ctxt_switches") or "ctxt_switches:" in line]  # fmt: skip
            out[task] = (int(fields[11]) + int(fields[12])) / tick
            out[task + " ctxt switches"] = float(sum(switches))
        return out

    def start(_signum: int, _frame: object) -> None:
        stats.clear()
        long_turns.clear()
        window["start"] = time.monotonic()
        window["cpu0"] = cpu()
        window["threads0"] = threads_cpu()  # type: ignore[assignment]
        window["on"] = 1.0

    def stop(_signum: int, _frame: object) -> None:
        window["on"] = 0.0
        seconds = time.monotonic() - window["start"]
        before: dict[str, float] = window["threads0"]  # type: ignore[assignment]
        after = threads_cpu()
        report = {
            "seconds": seconds,
            "loop_thread_cpu": (cpu() - window["cpu0"]) / 1e9,
            "threads": {k: v - before.get(k, 0.0) for k, v in after.items()},
            "switch_interval": sys.getswitchinterval(),
            "stats": dict(stats),
            "long_turns": long_turns,
        }
        Path(out + ".tmp").write_text(json.dumps(report))
        os.replace(out + ".tmp", out)

    # TURNS_FUNCS="redlb.metrics.snapshot:write redlb.fleet.publisher:Publisher.document":
    # functions timed on their own (rows "fn ..."), to see inside a long turn.
    import importlib

    for spec in os.environ.get("TURNS_FUNCS", "").split():
        module_name, _, path = spec.partition(":")
        owner: Any = importlib.import_module(module_name)
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        original = getattr(owner, attr)

        def wrapper(*args: Any, _f: Any = original, _n: str = "fn " + spec, **kw: Any) -> Any:
            if not window["on"]:
                return _f(*args, **kw)
            t0 = cpu()
            try:
                return _f(*args, **kw)
            finally:
                record(_n, cpu() - t0)

        setattr(owner, attr, wrapper)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from redlb.cli import main

    main(["serve", *args], prog_name="redlb")


# The driver: the bench's backends, Redis and routes; the probed worker on CPU 0; wrk.


def drive(serve_extra: list[str]) -> dict[str, Any]:
    import redis

    import run as bench
    from redlb.store.embedded import redis_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="redlb-turns-"))
    tmp.chmod(0o755)
    ports = [bench.free_port() for _ in range(3)]
    procs = [bench.pinned(bench.LOAD_CPU, ["nginx", "-c", str(bench.backends_conf(tmp, ports)),
                                           "-e", str(tmp / "b.err")])]  # fmt: skip
    redis_port = bench.free_port()
    procs.append(bench.pinned(bench.LOAD_CPU, [redis_server_binary(), "--port", str(redis_port),
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))  # fmt: skip
    worker = None
    out = str(tmp / "turns.json")
    try:
        for p in ports:
            bench.wait_port(p)
        bench.wait_port(redis_port)
        client = redis.Redis(port=redis_port)
        bench.seed_routes(redis_port, ports)
        port = bench.free_port()
        log = (tmp / "access.log").open("ab")
        cmd = [sys.executable, __file__, "--child", out, "--listen", f"127.0.0.1:{port}",
               "--redis", f"redis://127.0.0.1:{redis_port}/1", "--workers", "1",
               "--status-listen", "127.0.0.1:0", *serve_extra]  # fmt: skip
        worker = bench.pinned(bench.PROXY_CPU, cmd, stdout=log, stderr=subprocess.DEVNULL)
        bench.wait_port(port)
        bench.wait_routed(port)
        bench.wait_redis_quiet(client)
        bench.run_wrk(port, "/ok", 50, 1, bench.ROUTED_HOST)  # warm-up
        client.config_resetstat()
        worker.send_signal(signal.SIGUSR1)
        wrk = bench.run_wrk(port, "/ok", 50, SECONDS, bench.ROUTED_HOST)
        worker.send_signal(signal.SIGUSR2)
        commands = {k.removeprefix("cmdstat_"): v["calls"]
                    for k, v in client.info("commandstats").items()}  # fmt: skip
        deadline = time.monotonic() + 10
        while not os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        report = json.loads(Path(out).read_text())
        report["wrk"] = wrk
        report["redis_commands"] = commands
        return report
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(15)
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def show(report: dict[str, Any]) -> None:
    seconds = report["seconds"]
    wrk = report["wrk"]
    rows = sorted(report["stats"].items(), key=lambda kv: -kv[1][1])
    print(f"window {seconds:.1f} s, {wrk['rps']:,.0f} req/s, p50 {wrk['p50_ms']:.2f} ms, "
          f"p99 {wrk['p99_ms']:.2f} ms (busy machine); loop thread CPU "
          f"{report['loop_thread_cpu'] / seconds * 100:.0f}%")  # fmt: skip
    print("| callback | calls/s | CPU ms/s | >100 µs /s | >200 µs /s | >500 µs /s | max µs |")
    print("|---|---|---|---|---|---|---|")
    total = [0.0] * 5
    for name, (calls, ns, c1, c2, c5, top) in rows:
        if not (ns / seconds > 50_000 or c1):  # under 0.05 ms a second and never long
            continue
        print(f"| {name} | {calls / seconds:,.1f} | {ns / 1e6 / seconds:.2f} | "
              f"{c1 / seconds:.1f} | {c2 / seconds:.1f} | {c5 / seconds:.1f} | {top / 1000:.0f} |")  # fmt: skip
    for name, (_calls, ns, c1, c2, c5, _top) in rows:
        if name.startswith("fn "):
            continue  # inside the callbacks already counted
        for i, v in enumerate((ns, c1, c2, c5)):
            total[i] += v
    print(f"| **all timed callbacks** | | {total[0] / 1e6 / seconds:.2f} | {total[1] / seconds:.1f} "
          f"| {total[2] / seconds:.1f} | {total[3] / seconds:.1f} | |")  # fmt: skip
    commands = report.get("redis_commands", {})
    print(
        "Redis commands/s (all clients, Lua's included): "
        + ", ".join(
            f"{k} {v / seconds:.1f}" for k, v in sorted(commands.items(), key=lambda kv: -kv[1])
        )
    )
    others = {k: v for k, v in report["threads"].items() if not k.endswith("switches")}
    main_tid = min(others, key=int)
    for tid, cpu_s in others.items():
        if tid != main_tid:
            switches = report["threads"].get(tid + " ctxt switches", 0)
            print(f"thread {tid}: {cpu_s / seconds * 1000:.1f} ms CPU/s, "
                  f"{switches / seconds:.0f} context switches/s")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    args = sys.argv[1:]
    json_out = None
    if args[:1] == ["--json"]:
        json_out, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    report = drive(args)
    show(report)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
