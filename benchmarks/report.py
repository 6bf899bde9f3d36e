"""The results as Markdown: medians over rounds, ratios to the direct call and to the floor,
and issue 6's targets with PASS or MISS."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.load import Run, Scenario

DIRECT, FLOOR = "direct", "floor"
TILLS = ("till", "till-hypercorn", "till-redis")
PACKAGES = ("till-ac", "hypercorn", "starlette", "aiohttp", "redis", "hiredis", "uvloop", "msgspec")


@dataclass(frozen=True)
class Sample:
    """One round of one scenario against one target."""

    run: Run
    cpu_us: float  # CPU time of the target's processes per request served
    ttfb_ms: float | None


@dataclass(frozen=True)
class Memory:
    idle_bytes: int
    open_bytes: int
    opened: int
    failures: dict[str, int]  # why the others did not open: status or error -> count

    @property
    def per_stream_kb(self) -> float:
        return (self.open_bytes - self.idle_bytes) / max(self.opened, 1) / 1024


# A command sent less than once per this many requests is background work (Till's reaper takes
# a lock and scans for expired holds every TILL_REAP_INTERVAL), not part of a request.
BACKGROUND_EVERY = 10


@dataclass(frozen=True)
class RedisCount:
    requests: int
    calls: dict[tuple[str, str], int]  # ("client" or "script", command) -> calls

    def rates(self, source: str, background: bool = False) -> dict[str, float]:
        """Calls per request by command: sent by clients (per-request or background ones), or
        made inside scripts."""
        rates = {cmd: n / self.requests for (who, cmd), n in self.calls.items() if who == source}
        if source != "client":
            return rates
        return {c: r for c, r in rates.items() if (r < 1 / BACKGROUND_EVERY) == background}


def _rates(rates: dict[str, float]) -> str:
    if not rates:
        return "-"
    detail = ", ".join(f"{cmd} {r:.2f}" for cmd, r in sorted(rates.items(), key=lambda kv: -kv[1]))
    return f"{sum(rates.values()):.2f}: {detail}"


@dataclass(frozen=True)
class Figure:
    title: str
    pick: Callable[[Sample], float | None]
    fmt: str
    streams_only: bool = False


RPS = Figure("req/s", lambda s: s.run.rps, "{:,.0f}")
P50 = Figure("p50 ms", lambda s: s.run.p50_ms, "{:.2f}")
P99 = Figure("p99 ms", lambda s: s.run.p99_ms, "{:.2f}")
TTFB = Figure("TTFB p50 ms", lambda s: s.ttfb_ms, "{:.2f}", streams_only=True)
CPU = Figure("CPU µs/req", lambda s: s.cpu_us, "{:,.0f}")
FIGURES = (RPS, P50, P99, TTFB, CPU)


@dataclass
class Results:
    labels: dict[str, str]  # target name -> label, in table order
    scenarios: list[Scenario]
    how: str  # the driver, rounds and durations, in words
    streams: int  # held open at once for the memory figures
    used_wrk: bool
    samples: dict[tuple[str, Scenario], list[Sample]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    redis: dict[str, RedisCount] = field(default_factory=dict)  # by Scenario.kind
    notes: list[str] = field(default_factory=list)

    def median(self, target: str, scenario: Scenario, figure: Figure) -> float | None:
        samples = self.samples.get((target, scenario), [])
        values = [v for v in map(figure.pick, samples) if v is not None]
        return statistics.median(values) if values else None


# --- tables ---


def _ratio(value: float, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if ref else "-"


def _cell(
    value: float | None, fmt: str, target: str, direct: float | None, floor: float | None
) -> str:
    if value is None:
        return "-"
    if target == DIRECT:
        return fmt.format(value)
    against_floor = "-" if target == FLOOR else _ratio(value, floor)
    return f"{fmt.format(value)} ({_ratio(value, direct)} / {against_floor})"


def _scenario_table(results: Results, stream: bool) -> list[str]:
    figures = [f for f in FIGURES if stream or not f.streams_only]
    lines = [
        "| c | target | " + " | ".join(f.title for f in figures) + " |",
        "|---|---|" + "---|" * len(figures),
    ]
    for scenario in (s for s in results.scenarios if s.stream == stream):
        for name, label in results.labels.items():
            cells = [
                _cell(
                    results.median(name, scenario, figure),
                    figure.fmt,
                    name,
                    results.median(DIRECT, scenario, figure),
                    results.median(FLOOR, scenario, figure),
                )
                for figure in figures
            ]
            lines.append(f"| {scenario.concurrency} | {label} | " + " | ".join(cells) + " |")
    return lines


def _memory_table(results: Results) -> list[str]:
    lines = [
        f"| target | RSS idle MB | RSS with {results.streams:,} streams MB | KB per stream |",
        "|---|---|---|---|",
    ]
    direct, floor = results.memory.get(DIRECT), results.memory.get(FLOOR)
    for name, label in results.labels.items():
        if (m := results.memory.get(name)) is None:
            continue
        per = _cell(
            m.per_stream_kb,
            "{:,.1f}",
            name,
            direct.per_stream_kb if direct else None,
            floor.per_stream_kb if floor else None,
        )
        if m.failures:
            why = ", ".join(f"{n} x {reason}" for reason, n in m.failures.items())
            per += f" ({m.opened:,} opened; failed: {why})"
        mb = 2**20
        lines.append(f"| {label} | {m.idle_bytes / mb:,.1f} | {m.open_bytes / mb:,.1f} | {per} |")
    return lines


def _redis_table(results: Results) -> list[str]:
    lines = [
        "| request | requests | round trips per request (commands sent) | calls inside scripts"
        f" | background (sent less than once per {BACKGROUND_EVERY} requests) |",
        "|---|---|---|---|---|",
    ]
    for kind, count in results.redis.items():
        trips, inside = _rates(count.rates("client")), _rates(count.rates("script"))
        background = _rates(count.rates("client", background=True))
        lines.append(f"| {kind} | {count.requests:,} | {trips} | {inside} | {background} |")
    return lines


# --- issue 6's targets ---


Check = Callable[[str], str | None]  # Till target name -> the figure and its verdict, if any


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def _added(results: Results, scenario: Scenario, figure: Figure, limit_ms: float) -> Check:
    def check(name: str) -> str | None:
        till = results.median(name, scenario, figure)
        direct = results.median(DIRECT, scenario, figure)
        if till is None or direct is None:
            return None
        return f"+{till - direct:.2f} ms {_verdict(till - direct <= limit_ms)}"

    return check


def _throughput(results: Results, scenario: Scenario, least: float) -> Check:
    def check(name: str) -> str | None:
        till = results.median(name, scenario, RPS)
        floor = results.median(FLOOR, scenario, RPS)
        if till is None or not floor:
            return None
        return f"{till / floor:.2f}x floor {_verdict(till / floor >= least)}"

    return check


def _memory(results: Results, most_kb: float) -> Check:
    def check(name: str) -> str | None:
        if (m := results.memory.get(name)) is None:
            return None
        return f"{m.per_stream_kb:,.1f} KB {_verdict(m.per_stream_kb <= most_kb)}"

    return check


def _round_trips(results: Results, most: float) -> Check:
    def check(name: str) -> str | None:
        if not results.redis:
            return None
        if name != "till-redis":
            return "same scripts"
        worst = max(sum(count.rates("client").values()) for count in results.redis.values())
        return f"{worst:.2f} {_verdict(worst <= most)}"

    return check


def _targets_table(results: Results) -> list[str]:
    plain_1, plain_32, stream_1 = Scenario(False, 1), Scenario(False, 32), Scenario(True, 1)
    rows: list[tuple[str, str, Check]] = [
        ("added p50 latency, non-streamed, c=1", "≤ 1.0 ms", _added(results, plain_1, P50, 1.0)),
        ("throughput, non-streamed, c=32", "≥ 0.35x floor", _throughput(results, plain_32, 0.35)),
        ("added TTFB, streamed, c=1", "≤ 1.5 ms", _added(results, stream_1, TTFB, 1.5)),
        (f"memory per open stream, {results.streams:,} streams", "≤ 64 KB", _memory(results, 64)),
        ("Redis round trips per request", "≤ 2", _round_trips(results, 2)),
    ]
    tills = [name for name in TILLS if name in results.labels]
    lines = [
        "| target | limit | " + " | ".join(results.labels[n] for n in tills) + " |",
        "|---|---|" + "---|" * len(tills),
    ]
    for what, limit, check in rows:
        cells = [check(name) or "not measured" for name in tills]
        lines.append(f"| {what} | {limit} | " + " | ".join(cells) + " |")
    return lines


# --- the machine ---


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _tool_version(command: list[str]) -> str | None:
    if not command:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).splitlines()
    # "Redis server v=7.0.15 sha=...", "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) ..."
    return lines[0].split(" sha=")[0].split(" Copyright")[0].strip() if lines else None


def machine(used_wrk: bool) -> list[str]:
    versions = [f"Python {platform.python_version()}"]
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    for tool in (["redis-server", "--version"], ["wrk", "-v"] if used_wrk else []):
        if (line := _tool_version(tool)) is not None:
            versions.append(line)
    return [
        f"Machine: {os.cpu_count()} cores, {_cpu_model()}, Linux {platform.release()}.",
        f"Versions: {', '.join(versions)}.",
    ]


def render(results: Results, title: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    legend = "In parentheses: ratio to direct / ratio to floor, both from this run."
    parts = [
        f"# {title}",
        "",
        f"Run {stamp}. {results.how}",
        "",
        *machine(results.used_wrk),
        "",
        "Targets: **direct** is the mock provider alone (`tests/mock_upstream.py`, on uvloop);"
        " **floor** is `benchmarks/passthrough.py`, a bare aiohttp passthrough (one process,"
        " uvloop), the least a Python proxy adds; **Till** is `till serve` (one worker, uvicorn"
        " with httptools and uvloop) on its embedded store, and on a Redis server (Debian's"
        " `redis-server`)."
        + (
            " **Till under hypercorn** is the same (one worker, embedded store) under hypercorn,"
            " the other server `till serve` offers (`--server hypercorn`), for comparison."
            if "till-hypercorn" in results.labels
            else ""
        ),
        "",
        "## Issue 6 targets",
        "",
        *_targets_table(results),
        "",
        "## Non-streamed chat",
        "",
        legend,
        "",
        *_scenario_table(results, stream=False),
        "",
        "## Streamed chat",
        "",
        legend,
        "",
        *_scenario_table(results, stream=True),
        "",
        f"## Memory per open stream ({results.streams:,} streams open at once)",
        "",
        *_memory_table(results),
        "",
    ]
    if results.redis:
        parts += ["## Redis per request (Till, Redis server)", "", *_redis_table(results), ""]
    parts += ["## How it is measured", "", *(f"- {note}" for note in results.notes), ""]
    return "\n".join(parts)
