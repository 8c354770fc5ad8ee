"""Write the benchmark summary into README.md between its markers (the last step of make bench).

Reads bench/results/latest.json (bench/run.py) and idle_memory.json (bench/idle_memory.py):
the machine and build, one table per scenario with user and system CPU apart, the two-worker
comparison, the idle-connection memory, and the goals of issue 14 met or not.

    .venv/bin/python bench/readme.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START = "<!-- bench:start: written by bench/readme.py (make bench); edits here are overwritten -->"
END = "<!-- bench:end -->"
MAIN = "ok, 50 conns"
MANY = "ok, 1000 conns"
IDLE_GOAL_MB = 60.0


def table(rows: dict[str, dict[str, float]]) -> list[str]:
    base = next(r for name, r in rows.items() if name.startswith("nginx"))
    lines = [
        "| proxy | req/s | p99 ms | errors | CPU µs/req | user µs/req | system µs/req "
        "| req/s vs nginx | CPU vs nginx | p99 vs nginx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['errors']:.0f} "
            f"| {r['cpu_us_per_req']:.1f} | {r.get('user_us_per_req', float('nan')):.1f} "
            f"| {r.get('system_us_per_req', float('nan')):.1f} | {r['rps'] / base['rps']:.2f}x "
            f"| {r['cpu_us_per_req'] / base['cpu_us_per_req']:.2f}x "
            f"| {r['p99_ms'] / base['p99_ms']:.2f}x |"
        )
    return lines


def goals(results: dict[str, dict[str, dict[str, float]]], idle: dict[str, float]) -> list[str]:
    out = []

    def goal(text: str, value: float, limit: float, at_most: bool) -> None:
        met = value <= limit if at_most else value >= limit
        out.append(f"| {text} | {value:.2f} | {'≤' if at_most else '≥'} {limit} | "
                   f"{'met' if met else '**not met**'} |")  # fmt: skip

    main = results.get(MAIN, {})
    if "nginx" in main and "redlb" in main:
        n, r = main["nginx"], main["redlb"]
        goal(f"CPU per request vs nginx ({MAIN})", r["cpu_us_per_req"] / n["cpu_us_per_req"],
             1.5, True)  # fmt: skip
        goal(f"req/s vs nginx, one pinned core ({MAIN})", r["rps"] / n["rps"], 0.67, False)
        goal(f"p99 vs nginx ({MAIN})", r["p99_ms"] / n["p99_ms"], 1.5, True)
    many = results.get(MANY, {})
    if "nginx" in many and "redlb" in many:
        goal(f"req/s vs nginx ({MANY})", many["redlb"]["rps"] / many["nginx"]["rps"], 0.8, False)
    if idle:
        goal("RSS of one worker with 10,000 idle keep-alive connections, MB",
             idle["rss_after_mb"], IDLE_GOAL_MB, True)  # fmt: skip
    if not out:
        return []
    return ["| goal (issue 14) | measured | goal | |", "|---|---|---|---|", *out]


def protocols(latest: dict[str, Any]) -> list[str]:
    """TLS termination and WebSocket echo (issue 11's goals), when the run measured them."""
    lines: list[str] = []
    for scenario, rows in (latest.get("tls") or {}).items():
        lines += ["", f"#### TLS termination, {scenario} (`bench/tls.py`)", *table(rows)]
        n, r = rows.get("nginx"), rows.get("redlb")
        if n and r and "keep-alive" in scenario:
            ratio = r["cpu_us_per_req"] / n["cpu_us_per_req"]
            met = "met" if ratio <= 2.0 else "**not met**"
            lines += ["", f"TLS CPU per request vs nginx: {ratio:.2f}x (goal ≤ 2x: {met})."]
    ws = latest.get("websocket") or {}
    if "nginx" in ws and "redlb" in ws:
        lines += [
            "",
            "#### WebSocket echo, 1 KB messages (`bench/ws_echo.py`)",
            "| proxy | messages/s | CPU µs/message | messages/s vs nginx |",
            "|---|---|---|---|",
        ]
        for name in ("nginx", "redlb"):
            row = ws[name]
            lines.append(
                f"| {name} | {row['msgs_per_s']:,.0f} | {row['cpu_us_per_msg']:.1f} "
                f"| {row['msgs_per_s'] / ws['nginx']['msgs_per_s']:.2f}x |"
            )
        ratio = ws["redlb"]["msgs_per_s"] / ws["nginx"]["msgs_per_s"]
        lines += [
            "",
            f"Goal ≥ 0.5x nginx's messages/s: {'met' if ratio >= 0.5 else '**not met**'}.",
        ]
    return lines


def shared_cursor(two: dict[str, dict[str, float]]) -> list[str]:
    """What one rotation shared by both workers costs: round robin against random, which
    keeps no cursor, in the same rounds."""
    shared, alone = (
        two.get("redlb, 2 workers"),
        two.get("redlb, 2 workers, random (no shared cursor)"),
    )
    if not shared or not alone:
        return []
    return [
        "",
        f"Cost of the shared cursor (round robin over one rotation in Redis, against random): "
        f"{shared['cpu_us_per_req'] / alone['cpu_us_per_req']:.2f}x the CPU per request, "
        f"{shared['rps'] / alone['rps']:.2f}x the rate, {shared['redis_per_req']:.4f} Redis "
        f"commands per request (random: {alone['redis_per_req']:.4f}).",
    ]


def summary() -> str:
    latest = json.loads((RESULTS / "latest.json").read_text())
    idle_file = RESULTS / "idle_memory.json"
    idle = json.loads(idle_file.read_text()) if idle_file.exists() else {}
    m = latest["machine"]
    results = latest.get("results", {})
    lines = [
        START,
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['nginx']}, "
        f"{m['haproxy'].split(' - ')[0]}; {m['rounds']} interleaved rounds of {m['seconds']} s, "
        f"medians; {m['layout']}.",
        "",
        f"redlb: {latest.get('redlb_features', 'one worker')}; hot path "
        f"{latest.get('build', 'unknown')}. Relay: bench/relay.py, bytes copied without HTTP.",
        "",
    ]
    lines += goals(results, idle)
    for scenario, rows in results.items():
        lines += ["", f"#### {scenario}", *table(rows)]
    two = latest.get("two_workers") or {}
    if two:
        lines += ["", "#### 2 workers each, unpinned, wrk -t2 on the same machine, ok, 100 conns",
                  *table(two)]  # fmt: skip
        lines += shared_cursor(two)
    lines += protocols(latest)
    if idle:
        lines += [
            "",
            f"#### Memory (`bench/idle_memory.py`)\nOne worker holding {idle['connections']:,} "
            f"idle keep-alive client connections: RSS {idle['rss_before_mb']:.1f} MB before, "
            f"{idle['rss_after_mb']:.1f} MB after ({idle['per_connection_kb']:.2f} KB per "
            "connection).",
        ]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md has no {START!r} ... {END!r} section")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    README.write_text(before + summary() + after)
    print(f"wrote the benchmark summary into {README}")


if __name__ == "__main__":
    main()
