"""How close does Till come to the direct call, and to a bare Python proxy?

Starts the mock provider, a bare passthrough proxy (the floor) and Till (embedded store, and a
Redis server), then drives each with the same chat load, non-streamed and streamed, at several
concurrencies. Targets are interleaved and rounds repeated so that machine noise hits all of
them alike; each figure is the median over rounds. Run::

    make bench          # the full run (a few minutes); writes benchmarks/RESULTS.md
    make bench-quick    # a one-minute smoke run; prints only
    make profile        # py-spy on Till's worker under load; prints its top functions
    python benchmarks/run.py --server hypercorn # adds Till under hypercorn, a row of its own
    python benchmarks/run.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import (  # noqa: E402
    HELD_EVENT_GAP,
    OPEN_RAMP,
    Run,
    Scenario,
    drive,
    hold_streams,
    run_async,
    wrk,
    wrk_path,
)
from benchmarks.report import (  # noqa: E402
    BACKGROUND_EVERY,
    Memory,
    RedisCount,
    Results,
    Sample,
    render,
)
from benchmarks.targets import (  # noqa: E402
    RedisMonitor,
    Target,
    harness_cpu_seconds,
    machine_busy,
    machine_cpu_seconds,
    redis_server_available,
    reset_mock,
    start_floor,
    start_mock,
    start_till,
)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TARGETS = ("direct", "floor", "till", "till-redis")
# Measured when asked for (--server hypercorn): Till under its other HTTP server.
OPTIONAL = ("till-hypercorn",)
ORDER = ("direct", "floor", "till", "till-hypercorn", "till-redis")
SCENARIOS = [Scenario(stream, c) for stream in (False, True) for c in (1, 32, 128)]
QUIET = 0.10  # share of all cores busy with other work, above which a run is flagged
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    rounds: int
    seconds: int  # per row and round
    streams: int  # held open at once for the memory figures
    redis_requests: int  # per kind, for the Redis round trips
    use_wrk: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        use_wrk = args.driver != "builtin" and wrk_path() is not None
        if args.driver == "wrk" and not use_wrk:
            raise SystemExit("wrk is not installed (apt-get install wrk)")
        return cls(
            rounds=args.rounds or (1 if args.quick else 3),
            seconds=args.duration or (1 if args.quick else 3),
            streams=args.streams or (250 if args.quick else 1000),
            redis_requests=100 if args.quick else 500,
            use_wrk=use_wrk,
        )

    def describe(self) -> str:
        driver = "wrk (one thread)" if self.use_wrk else "the built-in aiohttp driver (no wrk)"
        rounds = f"{self.rounds} round{'s' if self.rounds > 1 else ''}"
        return (
            f"{rounds} of {self.seconds} s per row, targets interleaved, median over rounds;"
            f" load from {driver}."
        )


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, plan: Plan, mock: Target) -> None:
        self.plan = plan
        self.mock = mock

    def load(self, target: Target, scenario: Scenario, seconds: int) -> Run:
        if self.plan.use_wrk:
            return wrk(target.url, target.token, scenario, seconds)
        return run_async(drive(target.url, target.token, scenario, seconds))

    def warm_up(self, target: Target) -> None:
        for stream in (False, True):
            self.load(target, Scenario(stream, 32), 1)

    def sample(self, target: Target, scenario: Scenario) -> Sample:
        reset_mock(self.mock)
        before = target.cost().cpu_seconds
        run = self.load(target, scenario, self.plan.seconds)
        cpu_us = (target.cost().cpu_seconds - before) / max(run.requests + run.errors, 1) * 1e6
        ttfb = run.ttfb_p50_ms
        if scenario.stream and ttfb is None:  # wrk cannot see the first byte
            again = drive(target.url, target.token, scenario, self.plan.seconds)
            ttfb = run_async(again).ttfb_p50_ms
        return Sample(run, cpu_us, ttfb)

    def memory(self, target: Target) -> Memory:
        reset_mock(self.mock)
        idle = target.cost().rss_bytes
        held = run_async(
            hold_streams(
                target.url, target.token, self.plan.streams, lambda: target.cost().rss_bytes
            )
        )
        wait_idle(target)  # the closed streams are settled before anything else is measured
        return Memory(idle, held.measured, held.opened, dict(held.failures))

    def redis_round_trips(self, target: Target) -> dict[str, RedisCount]:
        assert target.redis_port is not None
        counts: dict[str, RedisCount] = {}
        for scenario in (Scenario(False, 1), Scenario(True, 1)):
            wait_idle(target)
            monitor = RedisMonitor(target.redis_port)
            monitor.start()
            requests = self.plan.redis_requests
            run = run_async(drive(target.url, target.token, scenario, 120, total=requests))
            counts[scenario.kind] = RedisCount(run.requests + run.errors, dict(monitor.stop()))
        return counts


def wait_idle(target: Target, busy: float = 0.05, limit: float = 30.0) -> None:
    """Wait (at most `limit` seconds) until the target uses less than `busy` of a core."""
    window = 0.5
    for _ in range(int(limit / window)):
        before = target.cost().cpu_seconds
        time.sleep(window)
        if target.cost().cpu_seconds - before < busy * window:
            return


def start_targets(stack: ExitStack, names: list[str], mock: Target, work: Path) -> list[Target]:
    targets = []
    for name in names:
        progress(f"starting {name}")
        if name == "direct":
            targets.append(mock)
        elif name == "floor":
            targets.append(start_floor(stack, mock.url))
        elif name == "till-hypercorn":
            targets.append(start_till(stack, mock.url, work, with_redis=False, server="hypercorn"))
        else:
            targets.append(start_till(stack, mock.url, work, with_redis=name == "till-redis"))
    return targets


def benchmark(plan: Plan, names: list[str]) -> Results:
    results = Results(
        labels={},
        scenarios=SCENARIOS,
        how=plan.describe(),
        streams=plan.streams,
        used_wrk=plan.use_wrk,
    )
    if "till-redis" in names and not redis_server_available():
        names = [name for name in names if name != "till-redis"]
        results.notes.append("Till on a Redis server: skipped, redis-server is not installed.")

    # The directory goes last: Till stops its embedded Redis through the files in it.
    busy = machine_busy()
    if busy > QUIET:
        progress(f"warning: the machine is {busy:.0%} busy before the run; figures will be noisy")
        results.notes.append(
            f"The machine was {busy:.0%} busy (all cores) before the run, with other work: the"
            f" figures are noisier than on a quiet machine."
        )
    with tempfile.TemporaryDirectory(prefix="till-bench-") as tmp, ExitStack() as stack:
        mock = start_mock(stack)
        targets = start_targets(stack, names, mock, Path(tmp))
        results.labels = {t.name: t.label for t in targets}
        bench = Bench(plan, mock)

        for target in targets:
            progress(f"{target.name}: warm-up, then {plan.streams:,} streams held open")
            bench.warm_up(target)
            if target.redis_port is not None:
                results.redis = bench.redis_round_trips(target)
            results.memory[target.name] = bench.memory(target)

        others_before, began = machine_cpu_seconds() - harness_cpu_seconds(), time.monotonic()
        for round_no in range(plan.rounds):
            shift = round_no % len(targets)
            order = targets[shift:] + targets[:shift]
            for scenario in SCENARIOS:
                what = f"{scenario.kind}, c={scenario.concurrency}"
                progress(f"round {round_no + 1}/{plan.rounds}: {what}")
                for target in order:
                    sample = bench.sample(target, scenario)
                    results.samples.setdefault((target.name, scenario), []).append(sample)
                    if sample.run.errors:
                        results.notes.append(
                            f"{target.label}, {what}, round {round_no + 1}:"
                            f" {sample.run.errors} failed requests."
                        )
        # Clock-tick rounding can make a quiet machine's figure slightly negative.
        others = max(0.0, machine_cpu_seconds() - harness_cpu_seconds() - others_before)
        capacity = (time.monotonic() - began) * (os.cpu_count() or 1)
        results.notes.append(
            f"Other work on the machine during the load rounds: {others / capacity:.0%} of its"
            " CPU time (processes outside the harness)."
        )
    results.notes += method_notes(plan, with_redis=bool(results.redis))
    return results


def method_notes(plan: Plan, with_redis: bool) -> list[str]:
    notes = [
        "Requests: `POST /v1/chat/completions`, model gpt-4o, one short message; the mock"
        " answers 20 output tokens (streamed: 20 content chunks, a usage chunk and `[DONE]`;"
        " every streamed request asks for usage, as Till does upstream). Till's key has no token"
        " or spend limit (10,000,000 activations, enterprise tenant).",
        "Latency: from sending the request to its last byte; TTFB: to the first byte of the body.",
        "CPU µs/req: user + system time of the target's processes over the run (Till: its"
        " process tree, the embedded Redis included; on a Redis server, that server too; the"
        " floor: its own process, not the mock behind it), divided by the requests it served.",
        f"Memory: resident set of the same processes, idle (after a warm-up) and with"
        f" {plan.streams:,} streams open at once (the mock sends an event every"
        f" {HELD_EVENT_GAP:g} s; streams are opened at most {OPEN_RAMP} at a time), the"
        f" difference divided by the streams. Measured once per target, before the load rounds.",
    ]
    if with_redis:
        notes.append(
            f"Redis round trips: Till's Redis server is watched with MONITOR during"
            f" {plan.redis_requests} sequential requests of each kind. A command a client sends is"
            f" at most one round trip (a pipeline is one trip for all its commands); a call made"
            f" inside a Lua script is none (`INFO commandstats` counts both alike). Commands sent"
            f" less than once per {BACKGROUND_EVERY} requests are background work (the reaper),"
            f" listed apart."
        )
    if plan.use_wrk:
        notes.append(
            "wrk sees only whole responses: the streamed rows' TTFB comes from a second run at"
            " the same concurrency and length by the built-in aiohttp driver, which is slower"
            " than wrk: at c=128 it is itself the bottleneck, so its TTFB can exceed wrk's"
            " whole-response latency."
        )
    return notes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short round; print, no file")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick: 1)")
    parser.add_argument("--duration", type=int, help="seconds per row and round (3; quick: 1)")
    parser.add_argument("--streams", type=int, help="streams held open (1000; quick: 250)")
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",")],
        default=list(TARGETS),
        help=f"comma-separated targets, of {','.join((*TARGETS, *OPTIONAL))} (ratios need"
        " direct and floor)",
    )
    parser.add_argument("--driver", choices=("auto", "wrk", "builtin"), default="auto")
    parser.add_argument(
        "--server",
        choices=("uvicorn", "hypercorn"),
        default="uvicorn",
        help="hypercorn: also run Till under hypercorn (`till serve --server hypercorn`), a row"
        " of its own beside the default uvicorn, to measure what the HTTP server costs; with"
        " --profile, profile Till under hypercorn",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile Till with py-spy instead (15 s)"
    )
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw samples in this file")
    args = parser.parse_args()
    if unknown := set(args.only) - set(TARGETS) - set(OPTIONAL):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.server == "hypercorn" and "till-hypercorn" not in args.only:
        args.only.append("till-hypercorn")
    return args


def main() -> int:
    args = parse_args()
    if args.profile:
        from benchmarks.profiling import profile

        print(profile(args.duration or 15, args.profile_out, server=args.server))
        return 0
    plan = Plan.from_args(args)
    names = [name for name in ORDER if name in args.only]
    results = benchmark(plan, names)
    text = render(results, "Benchmark results" + (" (quick run)" if args.quick else ""))
    print(text)
    if not args.quick and set(TARGETS) <= set(args.only):
        RESULTS.write_text(text)
        progress(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
