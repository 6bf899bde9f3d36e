"""Soak: the concurrency and fault scenarios, run long, against a real `till serve`.

Starts the mock upstream (tests/mock_upstream.py) and `till serve --workers 2` on the embedded
store (or on TILL_REDIS_URL / --redis-url), makes keys with activation, token and cent limits
through the admin API, then keeps --concurrency clients busy for --seconds (or until --requests
were fired): plain and streamed calls across OpenAI, Anthropic and Google tokens, clients that
disconnect mid-stream, and upstream faults (error statuses, streams cut or failing midway).

At the end it prints what was fired, served and refused (per limit), the 5xx seen, and checks,
for every key, once its holds are settled (or reaped):

  * used + held + remaining == limit, for activations, tokens and cents, and held == 0;
  * activations used == requests the upstream received with that key, never above the limit;
  * no 5xx but the intended ones (injected upstream faults passed through, 503s that say so);
  * no client error or hang on a request that was not meant to fail, no key in Till's log.

It exits 1 if any check fails. Everything listens on 127.0.0.1; keys are never printed.

    .venv/bin/python benchmarks/soak.py            # 120 s, at most 20,000 requests
    .venv/bin/python benchmarks/soak.py --quick    # about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402
    SECRET_PATTERN,
    Mock,
    Till,
    create_key,
    short_tmpdir,
    start_till,
    stop_process,
    till_env,
)
from till.errors import LIMIT_CODES  # noqa: E402
from till.tokens import Keyring  # noqa: E402

PROVIDERS = ("openai", "anthropic", "google")
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-6", "google": "gemini-2.5-flash"}
# Upstream keys the mock tells apart (and attributes to a provider by prefix).
UPSTREAM_PREFIX = {"openai": "sk-soak-", "anthropic": "sk-ant-soak-", "google": "AIza-soak-"}
# Each provider gets one key per kind. The limits suit a run of 20,000 requests (each is reached
# mid-run), and are scaled to the run's size.
FULL_RUN = 20_000
KINDS: dict[str, dict[str, int]] = {
    "activations": {"max_activations": 400},
    "tokens": {"max_activations": 10_000_000, "max_tokens": 120_000},
    "cents": {"max_activations": 10_000_000, "max_spend_cents": 40},
    "all": {"max_activations": 1_500, "max_tokens": 400_000, "max_spend_cents": 120},
    "open": {"max_activations": 10_000_000},
}
# What a request does, and how often.
MODES = {
    "plain": 40,
    "stream": 30,
    "disconnect": 10,  # reads the first chunk of a stream, then drops the connection
    "upstream_status": 8,  # the mock answers 500, 503, 429 or 400
    "cut": 5,  # the mock cuts the stream after two events
    "error_mid": 4,  # the mock sends its in-stream error after two events
    "slow": 3,  # 20 ms between events
}
FAULTS = frozenset({"upstream_status", "cut", "error_mid"})
STREAM_END = {"openai": b"[DONE]", "anthropic": b"message_stop", "google": b'"finishReason"'}
HOLD_SECONDS = 20
REAP_INTERVAL = 1
REQUEST_TIMEOUT = 60.0


@dataclass
class Key:
    provider: str
    kind: str
    id: str
    token: str
    upstream: str


@dataclass
class Tally:
    fired: int = 0
    served: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    other_4xx: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    intended_503: int = 0
    unexpected_5xx: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    short_streams: int = 0
    latencies: list[float] = field(default_factory=list)


# --- processes ---


@contextmanager
def mock_upstream() -> Iterator[Mock]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "mock_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("LISTENING"):
        stop_process(proc)
        raise RuntimeError(f"the mock upstream did not start: {line!r}")
    try:
        yield Mock(f"http://127.0.0.1:{int(line.split()[1])}", proc)
    finally:
        stop_process(proc)
        proc.stdout.close()


@contextmanager
def till_server(upstream: str, workers: int, redis_url: str | None) -> Iterator[Till]:
    data_dir = short_tmpdir("till-soak-")
    extra = {"TILL_HOLD_SECONDS": str(HOLD_SECONDS), "TILL_REAP_INTERVAL": str(REAP_INTERVAL)}
    if redis_url:
        extra["TILL_SECRET_KEYS"] = Keyring.generate("soak1").format()
    env = till_env(data_dir, upstream, redis_url, **extra)
    env |= {"TILL_ACCESS_LOG": "0", "TILL_LOG_LEVEL": "warning"}  # no line per request
    till = start_till(env, data_dir / "till.log", "--workers", str(workers))
    try:
        yield till
    finally:
        till.stop()
        leaks = [ln for ln in till.log.read_text(errors="replace").splitlines()
                 if SECRET_PATTERN.search(ln)]  # fmt: skip
        if leaks:
            print(f"FAILED: {len(leaks)} log lines with key material in {till.log}")
            raise SystemExit(1)
        shutil.rmtree(data_dir, ignore_errors=True)


def make_keys(admin: httpx.Client, scale: float) -> list[Key]:
    keys = []
    for provider in PROVIDERS:
        for i, (kind, limits) in enumerate(KINDS.items()):
            upstream = f"{UPSTREAM_PREFIX[provider]}{kind}-{i}-0123456789"
            scaled = {
                k: v if v >= 10_000_000 else max(10, round(v * scale)) for k, v in limits.items()
            }
            made = create_key(admin, provider=provider, upstream_key=upstream, **scaled)
            keys.append(Key(provider, kind, made["id"], made["scopedKey"], upstream))
    return keys


# --- one request ---


def request_for(key: Key, mode: str, rng: random.Random) -> tuple[str, dict[str, str], Any]:
    stream = mode not in ("plain", "upstream_status")
    headers = {"x-mock-output-tokens": str(rng.randint(5, 120))}
    if mode == "upstream_status":
        headers["x-mock-status"] = str(rng.choice([500, 503, 429, 400]))
    elif mode == "cut":
        headers["x-mock-cut-after"] = "2"
    elif mode == "error_mid":
        headers["x-mock-error-after"] = "2"
    elif mode == "slow":
        headers["x-mock-delay-ms"] = "20"
    elif mode == "disconnect":
        headers["x-mock-delay-ms"] = "5"
    # A cap Till may lower; none (Till then sets one, up to its default of 4096) on some plain
    # calls only: the mock writes a request's cap in full, one event per token.
    cap: int | None = rng.randint(5, 200)
    if mode in ("slow", "disconnect"):
        cap = rng.randint(5, 60)
    elif mode == "plain" and rng.random() < 0.2:
        cap = None
    text = " ".join(rng.choice(["alpha", "bravo", "charlie", "delta"]) for _ in range(20))
    if key.provider == "openai":
        headers["authorization"] = f"Bearer {key.token}"
        body: dict[str, Any] = {
            "model": MODELS["openai"], "messages": [{"role": "user", "content": text}],
            "stream": stream,
        }  # fmt: skip
        if cap is not None:
            body["max_tokens"] = cap
        return "/v1/chat/completions", headers, body
    if key.provider == "anthropic":
        headers |= {"x-api-key": key.token, "anthropic-version": "2023-06-01"}
        body = {
            "model": MODELS["anthropic"], "max_tokens": cap or 200, "stream": stream,
            "messages": [{"role": "user", "content": text}],
        }  # fmt: skip
        return "/v1/messages", headers, body
    headers["x-goog-api-key"] = key.token
    body = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if cap is not None:
        body["generationConfig"] = {"maxOutputTokens": cap}
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"/v1beta/models/{MODELS['google']}:{method}", headers, body


async def one(
    http: aiohttp.ClientSession, base: str, key: Key, mode: str, rng: random.Random, tally: Tally
) -> None:
    path, headers, body = request_for(key, mode, rng)
    started = time.perf_counter()
    tally.fired += 1
    try:
        async with http.post(base + path, json=body, headers=headers) as resp:
            if mode == "disconnect" and resp.status == 200:
                await resp.content.readany()
                resp.close()  # drops the connection mid-stream
                tally.disconnects += 1
                return
            data = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        if mode not in FAULTS:
            tally.client_errors[f"{mode}: {type(exc).__name__}"] += 1
        else:
            tally.faults[f"{mode} (connection broken)"] += 1
        return
    status = resp.status
    if status == 200:
        tally.served += 1
        if mode == "plain":
            tally.latencies.append(time.perf_counter() - started)
        if mode in ("cut", "error_mid"):
            tally.faults[f"{mode} (error event relayed)"] += 1
        elif mode != "plain" and STREAM_END[key.provider] not in data:
            tally.short_streams += 1
        return
    code = _till_code(data)
    if status == 402 and code in LIMIT_CODES:
        tally.refused[code] += 1
    elif status == 503 and code in ("store_unavailable", "too_many_streams"):
        tally.intended_503 += 1
    elif mode == "upstream_status":
        tally.faults[f"upstream {status} passed through"] += 1
    elif status >= 500:
        tally.unexpected_5xx[f"{status} {code} ({mode})"] += 1
    else:
        tally.other_4xx[f"{status} {code} ({mode})"] += 1


def _till_code(data: bytes) -> str:
    try:
        error = json.loads(data)["error"]
        return str(error.get("till_code") or error.get("code") or error.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


async def fire(
    base: str, keys: list[Key], seconds: float, budget: int, concurrency: int, seed: int
) -> tuple[Tally, float]:
    tally = Tally()
    modes, weights = zip(*MODES.items(), strict=True)
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)

    async def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline and (budget <= 0 or tally.fired < budget):
            mode = rng.choices(modes, weights)[0]
            await one(http, base, rng.choice(keys), mode, rng, tally)

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(client(n) for n in range(concurrency)))
    return tally, time.monotonic() - started


# --- the checks ---


def settled_keys(admin: httpx.Client, keys: list[Key], wait: float) -> dict[str, dict[str, Any]]:
    """The keys once nothing is held (settlement, or the reaper), or as they are at ``wait``."""
    deadline = time.monotonic() + wait
    while True:
        listed = {k["id"]: k for k in admin.get("/admin/keys").json()["keys"]}
        records = {k.id: listed[k.id] for k in keys}
        held = any(r["heldTokens"] or r["heldSpendCents"] for r in records.values())
        if not held or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def micro(cents: float | int | None) -> int:
    return round((cents or 0) * 1_000_000)


def check_key(key: Key, r: dict[str, Any], upstream_requests: int) -> list[str]:
    name = f"{key.provider}/{key.kind}"
    problems = []
    if r["usedActivations"] + r["remainingActivations"] != r["maxActivations"]:
        problems.append(f"{name}: activations used + remaining != limit")
    if r["usedActivations"] > r["maxActivations"]:
        problems.append(f"{name}: {r['usedActivations']} activations over {r['maxActivations']}")
    if r["usedActivations"] != upstream_requests:
        problems.append(
            f"{name}: {r['usedActivations']} activations, {upstream_requests} upstream requests"
        )
    if r["heldTokens"] or r["heldSpendCents"]:
        problems.append(f"{name}: still held: {r['heldTokens']} tokens, {r['heldSpendCents']} c")
    if r["maxTokens"] is not None:
        total = r["usedTokens"] + r["heldTokens"] + r["remainingTokens"]
        if total != r["maxTokens"]:
            problems.append(f"{name}: tokens used + held + remaining = {total} != {r['maxTokens']}")
    if r["maxSpendCents"] is not None:
        total = (
            r["usedSpendMicrocents"] + micro(r["heldSpendCents"]) + micro(r["remainingSpendCents"])
        )
        if total != micro(r["maxSpendCents"]):
            problems.append(f"{name}: micro-cents used + held + remaining = {total} != limit")
    return problems


def describe(key: Key, r: dict[str, Any], upstream_requests: int) -> str:
    parts = [f"act {r['usedActivations']}/{r['maxActivations']}"]
    if r["maxTokens"] is not None:
        parts.append(f"tok {r['usedTokens']}/{r['maxTokens']}")
    else:
        parts.append(f"tok {r['usedTokens']}")
    if r["maxSpendCents"] is not None:
        parts.append(f"cents {r['usedSpendCents']}/{r['maxSpendCents']}")
    parts.append(f"upstream {upstream_requests}")
    return f"  {key.provider + '/' + key.kind:<22} " + ", ".join(parts)


def report(
    args: argparse.Namespace, tally: Tally, elapsed: float, keys: list[Key],
    records: dict[str, dict[str, Any]], upstream: Counter[str],
) -> list[str]:  # fmt: skip
    store = "Redis" if args.redis_url else "embedded store"
    print(f"Till soak: {elapsed:.1f} s, {args.workers} workers, {store}, "
          f"concurrency {args.concurrency}")  # fmt: skip
    print(f"requests fired        {tally.fired:>7}  ({tally.fired / elapsed:.0f}/s)")
    print(f"  served (200)        {tally.served:>7}")
    refused = sum(tally.refused.values())
    print(f"  refused (402)       {refused:>7}  " + _counts(tally.refused))
    print(f"  disconnected        {tally.disconnects:>7}  (clients that left mid-stream)")
    print(f"  injected faults     {sum(tally.faults.values()):>7}  " + _counts(tally.faults))
    print(f"  other 4xx           {sum(tally.other_4xx.values()):>7}  " + _counts(tally.other_4xx))
    print(f"  intended 503        {tally.intended_503:>7}")
    print(f"  unexpected 5xx      {sum(tally.unexpected_5xx.values()):>7}  "
          + _counts(tally.unexpected_5xx))  # fmt: skip
    print(f"  client errors/hangs {sum(tally.client_errors.values()):>7}  "
          + _counts(tally.client_errors))  # fmt: skip
    print(f"  streams cut short   {tally.short_streams:>7}  (clean streams without their end)")
    if len(tally.latencies) >= 2:
        ms = sorted(x * 1000 for x in tally.latencies)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(f"latency, plain 200s   p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms")
    print(f"upstream requests     {sum(upstream.values()):>7}")
    print("keys (used/limit after settlement):")
    problems = []
    for key in keys:
        r = records[key.id]
        print(describe(key, r, upstream[key.upstream]))
        problems += check_key(key, r, upstream[key.upstream])
    if sum(tally.unexpected_5xx.values()):
        problems.append(f"unexpected 5xx: {_counts(tally.unexpected_5xx)}")
    if sum(tally.client_errors.values()):
        problems.append(f"client errors or hangs: {_counts(tally.client_errors)}")
    if sum(tally.other_4xx.values()):
        problems.append(f"4xx other than limits: {_counts(tally.other_4xx)}")
    if tally.short_streams:
        problems.append(f"{tally.short_streams} clean streams ended without their end marker")
    return problems


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.most_common())


# --- main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to fire (120)")
    parser.add_argument(
        "--requests", type=int, default=20_000, help="at most this many requests (0: no bound)"
    )
    parser.add_argument("--concurrency", type=int, default=200, help="clients at once (200)")
    parser.add_argument("--workers", type=int, default=2, help="till serve --workers (2)")
    parser.add_argument(
        "--redis-url", default=os.environ.get("TILL_REDIS_URL"),
        help="run on this Redis (default: TILL_REDIS_URL, else the embedded store)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="about 15 s, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 15.0)
        args.requests = min(args.requests, 6_000) if args.requests else 6_000
    return args


def main() -> int:
    args = parse_args()
    with mock_upstream() as mock, till_server(mock.url, args.workers, args.redis_url) as till:
        admin_key = till.new_tenant("soak", plan="enterprise")
        with till.admin(admin_key) as admin:
            expected = args.requests or args.seconds * 200
            keys = make_keys(admin, min(1.0, expected / FULL_RUN))
            tally, elapsed = asyncio.run(
                fire(till.url, keys, args.seconds, args.requests, args.concurrency, args.seed)
            )
            # Disconnects settle at once; anything left is charged by the reaper.
            records = settled_keys(admin, keys, HOLD_SECONDS + 5 * REAP_INTERVAL + 5)
        seen = httpx.get(f"{mock.url}/_mock/requests", timeout=120).json()
        upstream = Counter(str(r.get("api_key")) for r in seen)
        problems = report(args, tally, elapsed, keys, records, upstream)
    if problems:
        print("FAILED:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("all invariants hold")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
