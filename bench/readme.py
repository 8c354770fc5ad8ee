"""Write the benchmark summary into README.md between its markers (the last step of make bench).

Reads bench/results/latest.json (bench/run.py) and idle_memory.json (bench/idle_memory.py):
the machine and build, one table per scenario with user and system CPU apart, the two-worker
comparison, the idle-connection memory, and the goals of issue 14 met or not.

The figures are medians of the rounds; a ratio to nginx is the median of the ratios of each
round (each round runs nginx and the others back to back: bench/run.py says why), with its
range over the rounds for p99.  Results written before run.py kept its rounds give the ratio
of the medians instead.  bench/run.py prints its tables with the same functions.

    .venv/bin/python bench/readme.py
"""

from __future__ import annotations

import json
import statistics
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


Rounds = dict[str, list[dict[str, float]]]  # proxy -> its figures, round by round


def per_round_ratios(rounds: Rounds, name: str, key: str) -> list[float]:
    """``name``'s figure over nginx's, round by round (the two measured in the same round)."""
    base = next(n for n in rounds if n.startswith("nginx"))
    return [
        mine[key] / theirs[key]
        for mine, theirs in zip(rounds[name], rounds[base], strict=False)
        if theirs[key]
    ]


def vs_nginx(
    rows: dict[str, dict[str, float]], name: str, key: str, rounds: Rounds | None = None
) -> tuple[float, float, float]:
    """(ratio, lowest, highest) of ``name``'s figure to nginx's: the median of the rounds'
    ratios and their range when the rounds are known, else the ratio of the medians."""
    if rounds and name in rounds and len(rounds[name]) > 1:
        ratios = per_round_ratios(rounds, name, key)
        if ratios:
            return statistics.median(ratios), min(ratios), max(ratios)
    base = next(r for n, r in rows.items() if n.startswith("nginx"))
    ratio = rows[name][key] / base[key]
    return ratio, ratio, ratio


def _spread(low: float, high: float) -> str:
    return f" ({low:.2f}-{high:.2f})" if high > low else ""


def table(rows: dict[str, dict[str, float]], rounds: Rounds | None = None) -> list[str]:
    p99_title = "p99 vs nginx (range)" if rounds else "p99 vs nginx"
    lines = [
        "| proxy | req/s | p99 ms | errors | CPU µs/req | user µs/req | system µs/req "
        f"| req/s vs nginx | CPU vs nginx | {p99_title} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rps = vs_nginx(rows, name, "rps", rounds)[0]
        cpu = vs_nginx(rows, name, "cpu_us_per_req", rounds)[0]
        p99, low, high = vs_nginx(rows, name, "p99_ms", rounds)
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {r['errors']:.0f} "
            f"| {r['cpu_us_per_req']:.1f} | {r.get('user_us_per_req', float('nan')):.1f} "
            f"| {r.get('system_us_per_req', float('nan')):.1f} | {rps:.2f}x "
            f"| {cpu:.2f}x | {p99:.2f}x{_spread(low, high)} |"
        )
    return lines


def goals(
    results: dict[str, dict[str, dict[str, float]]],
    idle: dict[str, float],
    rounds: dict[str, Rounds] | None = None,
) -> list[str]:
    out = []
    rounds = rounds or {}

    def goal(text: str, value: float, limit: float, at_most: bool, spread: str = "") -> None:
        met = value <= limit if at_most else value >= limit
        out.append(f"| {text} | {value:.2f}{spread} | {'≤' if at_most else '≥'} {limit} | "
                   f"{'met' if met else '**not met**'} |")  # fmt: skip

    main = results.get(MAIN, {})
    if "nginx" in main and "redlb" in main:
        by_round = rounds.get(MAIN)
        goal(f"CPU per request vs nginx ({MAIN})",
             vs_nginx(main, "redlb", "cpu_us_per_req", by_round)[0], 1.5, True)  # fmt: skip
        goal(f"req/s vs nginx, one pinned core ({MAIN})",
             vs_nginx(main, "redlb", "rps", by_round)[0], 0.67, False)  # fmt: skip
        p99, low, high = vs_nginx(main, "redlb", "p99_ms", by_round)
        rounds_note = (
            f"; median of {len(by_round['redlb'])} rounds' ratios, range" if by_round else ""
        )
        goal(f"p99 vs nginx ({MAIN}{rounds_note})", p99, 1.5, True, _spread(low, high))
    many = results.get(MANY, {})
    if "nginx" in many and "redlb" in many:
        goal(f"req/s vs nginx ({MANY})", vs_nginx(many, "redlb", "rps", rounds.get(MANY))[0],
             0.8, False)  # fmt: skip
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
    rounds = latest.get("rounds") or {}
    main_rounds = m.get("main_rounds", m["rounds"])
    counted = (
        f"{m['rounds']} interleaved rounds ({main_rounds} for {MAIN})"
        if main_rounds != m["rounds"]
        else f"{m['rounds']} interleaved rounds"
    )
    paired = "; ratios to nginx: medians of each round's ratio" if rounds else ""
    lines = [
        START,
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['nginx']}, "
        f"{m['haproxy'].split(' - ')[0]}; {counted} of {m['seconds']} s, "
        f"medians{paired}; {m['layout']}.",
        "",
        f"redlb: {latest.get('redlb_features', 'one worker')}; hot path "
        f"{latest.get('build', 'unknown')}. Relay: bench/relay.py, bytes copied without HTTP.",
        "",
    ]
    lines += goals(results, idle, rounds)
    for scenario, rows in results.items():
        lines += ["", f"#### {scenario}", *table(rows, rounds.get(scenario))]
    two = latest.get("two_workers") or {}
    if two:
        lines += ["", "#### 2 workers each, unpinned, wrk -t2 on the same machine, ok, 100 conns",
                  *table(two, rounds.get("two_workers"))]  # fmt: skip
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
