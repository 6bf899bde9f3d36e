"""The load: chat requests from wrk (when installed) or from a built-in aiohttp driver.

Both drivers keep a fixed number of connections busy, each sending the next request as soon as
the last one ended, until a deadline. wrk only sees whole responses, so time to first byte
always comes from the built-in driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

WRK_SCRIPT = Path(__file__).with_name("post.lua")
CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT = 30.0  # seconds: a request slower than this is an error, not a sample
OPEN_RAMP = 64  # streams being opened at once while building up the held ones
# Seconds between two events of a held stream. The mock wakes every held stream every 10 ms
# to see whether its client left, whatever the gap, so a wider gap costs nothing there.
HELD_EVENT_GAP = 2.0

PLAIN_BODY: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Hello there"}],
}
# Usage asked for by every client: Till asks the provider for it anyway, so the mock does the
# same work behind every target.
STREAM_BODY: dict[str, Any] = {
    **PLAIN_BODY,
    "stream": True,
    "stream_options": {"include_usage": True},
}

T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    stream: bool
    concurrency: int

    @property
    def kind(self) -> str:
        return "streamed" if self.stream else "non-streamed"

    @property
    def body(self) -> bytes:
        return json.dumps(STREAM_BODY if self.stream else PLAIN_BODY).encode()


@dataclass(frozen=True)
class Run:
    """One driver run against one target: whole-response latencies, and TTFB when measured."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# --- wrk ---

_WRK_LINE = re.compile(
    r"BENCH requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+)"
    r" status_errors=(\d+) socket_errors=(\d+)"
)


def wrk(base_url: str, token: str, scenario: Scenario, seconds: int) -> Run:
    env = {**os.environ, "BENCH_BODY": scenario.body.decode(), "BENCH_TOKEN": token}
    c = scenario.concurrency
    cmd = ["wrk", "-t1", f"-c{c}", f"-d{seconds}s", "--timeout", f"{REQUEST_TIMEOUT:.0f}s"]
    cmd += ["-s", str(WRK_SCRIPT), base_url + CHAT_PATH]
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    match = _WRK_LINE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no result line:\n{out.stdout}\n{out.stderr}")
    # wrk counts a response with a status of 400 or more as a request, and as an error.
    requests, duration_us, p50_us, p99_us, bad_status, failed = map(int, match.groups())
    return Run(
        requests=requests - bad_status,
        errors=bad_status + failed,
        seconds=duration_us / 1e6,
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
    )


# --- the built-in driver ---


def _headers(token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(extra or {})}


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        auto_decompress=False,
    )


async def drive(
    base_url: str, token: str, scenario: Scenario, seconds: float, total: int | None = None
) -> Run:
    """`concurrency` workers, each looping requests until the deadline (or `total` sent)."""
    url, body, headers = base_url + CHAT_PATH, scenario.body, _headers(token)
    latencies: list[float] = []
    firsts: list[float] = []
    sent = errors = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent, errors
        while loop.time() < deadline and (total is None or sent < total):
            sent += 1
            start = time.perf_counter()
            first = None
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    async for _ in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            end = time.perf_counter()
            if ok:
                latencies.append(end - start)
                firsts.append((first or end) - start)
            else:
                errors += 1

    async with _session() as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(scenario.concurrency)))
        elapsed = time.perf_counter() - began
    return Run(
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        ttfb_p50_ms=percentile(firsts, 50) * 1000 if scenario.stream else None,
    )


# --- open streams, for memory ---


@dataclass(frozen=True)
class Held:
    opened: int
    failures: Counter[str]  # why the others did not open: an HTTP status or an error name
    measured: int  # what `measure` returned with the streams open


async def hold_streams(
    base_url: str,
    token: str,
    count: int,
    measure: Callable[[], int],
    ramp: int = OPEN_RAMP,
    open_within: float = 60.0,
) -> Held:
    """Open `count` streams that the mock keeps open, call `measure` while all are open.

    At most `ramp` streams are being opened (sent, waiting for their headers) at any moment:
    what is measured is streams held open, not a burst of connects.
    """
    # An event every HELD_EVENT_GAP seconds, for 90 s: time to open all, then to measure.
    gap_ms = int(HELD_EVENT_GAP * 1000)
    steer = {"x-mock-delay-ms": str(gap_ms), "x-mock-output-tokens": str(90_000 // gap_ms)}
    url, body = base_url + CHAT_PATH, Scenario(stream=True, concurrency=count).body
    headers = _headers(token, steer)
    opened = 0
    failures: Counter[str] = Counter()
    opening = asyncio.Semaphore(ramp)
    settled = asyncio.Event()
    never = asyncio.Event()  # the streams stay open until their tasks are cancelled

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened
        try:
            async with opening:
                resp = await session.post(url, data=body, headers=headers)
            async with resp:
                if resp.status == 200:
                    opened += 1
                else:
                    failures[str(resp.status)] += 1
                if opened + failures.total() == count:
                    settled.set()
                if resp.status == 200:
                    await never.wait()
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures[type(exc).__name__] += 1
            if opened + failures.total() == count:
                settled.set()

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )
    async with session:
        tasks = [asyncio.create_task(one(session)) for _ in range(count)]
        try:
            with contextlib.suppress(TimeoutError):  # measure what did open; `opened` says
                await asyncio.wait_for(settled.wait(), open_within)
            await asyncio.sleep(HELD_EVENT_GAP + 0.5)  # every stream has relayed an event
            measured = measure()
        finally:
            for task in tasks:
                task.cancel()  # closes each connection mid-stream
            await asyncio.gather(*tasks, return_exceptions=True)
    return Held(opened=opened, failures=failures, measured=measured)
