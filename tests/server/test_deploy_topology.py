"""A worker SIGKILLed under load costs no more than the requests it had in flight.

The compose topology with local processes (tests/lb.py): Debian's nginx with deploy/nginx.conf
in front of three `till serve` sharing one redis-server with AOF. CLIENTS clients keep plain
and streamed requests going through nginx at four keys with limits; one worker is SIGKILLed
mid-load (no settlement, no `finally`) and the load goes on until every small budget is spent.
Then:

- the clients' errors (an answer other than 200 or the key's own limit 402, a transport error,
  a stream cut short) are at most the requests the dead worker had in flight: those nginx sent
  it (nginx's access log: $upstream_addr) less those it answered (its own access log);
- nginx sends new requests to the survivors: no error for a request sent after the kill (past a
  short window), and connections the dead worker refuses are retried on another instance
  (`proxy_next_upstream error`), which the client never sees;
- the holds of the lost requests outlive TILL_HOLD_SECONDS and the reaper (on a survivor)
  charges them: every key reconciles (used + held + remaining == limit, held == 0), the mock
  never produced past a limit, and each key's charge exceeds what its clients were served by at
  most the holds of its lost requests.

`make deploy-test` runs this with tests/server/test_across_instances.py and prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import Mock
from tests.lb import CHAT, CONFIG, Cluster, NginxEntry, bearer, records_for, run_cluster
from till.server.pricing import Pricer, Usage
from till.server.proxy import estimate_input_tokens

pytestmark = pytest.mark.deploy

T = TypeVar("T")
MODEL = "gpt-4o"
CLIENTS = 32
KILL_AT = 1.5  # seconds of load before the kill
AFTER_MIN = 2.5  # seconds of load after it, at least ...
AFTER_MAX = 10.0  # ... and at most, while a small budget is not spent yet
WINDOW = 0.5  # after the kill: nginx may still hand a request to a connection it has not seen close
HOLD_SECONDS = 2  # a lost request's hold is charged this long after it was made
STREAM_DELAY_MS = 25  # the mock's pause before each event of a stream
DOOMED = 1  # the instance killed
RETRY_PROBES = 200  # at most, once nginx may try the dead instance again
PROBE = {"model": MODEL, "messages": [{"role": "user", "content": "probe"}], "max_tokens": 5}

# The budgets, shared by the clients in turn: three small ones, spent during the load (after the
# kill), and a roomy one that keeps requests in flight at the provider to the end.
BUDGETS: dict[str, dict[str, int]] = {
    "activations": {"max_activations": 80},
    "tokens": {"max_activations": 100_000, "max_tokens": 3_000},
    "cents": {"max_activations": 100_000, "max_spend_cents": 2},
    "roomy": {"max_activations": 1_000_000, "max_tokens": 10_000_000, "max_spend_cents": 100_000},
}
REFUSALS = {
    "activations": {"activation_limit_reached"},
    "tokens": {"token_limit_reached"},
    "cents": {"spend_limit_reached"},
    "roomy": set(),
}
NAMES = list(BUDGETS)


@pytest.fixture(scope="module")
def cluster(mock_upstream: Mock, log_dir: Path) -> Iterator[Cluster]:
    with run_cluster(
        "kill",
        mock_upstream,
        log_dir,
        TILL_HOLD_SECONDS=str(HOLD_SECONDS),
        TILL_REAP_INTERVAL="0.2",
    ) as c:
        yield c


@dataclass
class Shot:
    """One request of the load and what became of it."""

    i: int
    budget: str
    stream: bool
    cap: int
    body: bytes
    delay_ms: int
    started: float = 0.0
    ended: float = 0.0
    status: int | None = None
    code: str | None = None
    error: str | None = None

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "error"
        return "ok" if self.status == 200 else "refused"

    @property
    def hold_tokens(self) -> int:
        """The most tokens Till can have held for it: the input estimate plus the cap."""
        return estimate_input_tokens(self.body) + self.cap


def plan(i: int, rng: random.Random) -> Shot:
    stream = rng.random() < 0.5
    cap = rng.randint(4, 24)
    body: dict[str, Any] = {
        "model": MODEL,
        # The first word names the request, so the mock's record can be found.
        "messages": [{"role": "user", "content": f"r{i} " + "lorem " * rng.randint(5, 40)}],
        "max_tokens": cap,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    delay = STREAM_DELAY_MS if stream else rng.randint(100, 400)
    return Shot(i, NAMES[i % len(NAMES)], stream, cap, json.dumps(body).encode(), delay)


@dataclass
class Load:
    shots: list[Shot] = field(default_factory=list)  # in the order they were sent
    started: float = 0.0  # time.time() when the clients set off
    killed: float = 0.0  # ... just before the SIGKILL
    sizes: list[int] = field(default_factory=list)  # the instances' log sizes once it is dead
    spent: dict[str, float] = field(default_factory=dict)  # a small budget's first refusal


async def send(http: httpx.AsyncClient, token: str, shot: Shot) -> None:
    headers = {
        **bearer(token),
        "content-type": "application/json",
        "x-mock-delay-ms": str(shot.delay_ms),
    }
    shot.started = time.time()
    try:
        async with http.stream("POST", CHAT, content=shot.body, headers=headers) as resp:
            data = await resp.aread()
    except httpx.HTTPError as exc:
        shot.error = type(exc).__name__
    else:
        shot.status = resp.status_code
        if resp.status_code == 200:
            if shot.stream and not data.rstrip().endswith(b"data: [DONE]"):
                shot.error = "stream cut short"
            elif not shot.stream and "usage" not in json.loads(data):
                shot.error = "no usage"
        else:
            try:
                shot.code = json.loads(data)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                shot.code = None
            if resp.status_code != 402 or shot.code not in REFUSALS[shot.budget]:
                shot.error = f"HTTP {resp.status_code} {shot.code}"
    shot.ended = time.time()


def load(cluster: Cluster, tokens: dict[str, str]) -> Load:
    """CLIENTS clients in a loop, each on its own connection; the doomed instance SIGKILLed at
    KILL_AT; the load goes on for AFTER_MIN, then until every small budget refused a request
    (at most AFTER_MAX after the kill)."""
    rng = random.Random(20261127)
    numbers = itertools.count()
    run = Load()
    stop = asyncio.Event()
    spent = asyncio.Event()
    doomed = cluster.instances[DOOMED]

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            shot = plan(next(numbers), rng)
            run.shots.append(shot)
            await send(http, tokens[shot.budget], shot)
            if shot.outcome == "refused":
                run.spent.setdefault(shot.budget, shot.ended)
                if all(run.spent.get(name) for name in NAMES if REFUSALS[name]):
                    spent.set()

    async def killer() -> None:
        await asyncio.sleep(KILL_AT)
        run.killed = time.time()
        doomed.proc.kill()
        await asyncio.to_thread(doomed.proc.wait, 5)
        run.sizes = cluster.log_sizes()
        await asyncio.sleep(run.killed + AFTER_MIN - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(spent.wait(), run.killed + AFTER_MAX - time.time())
        stop.set()

    async def main() -> None:
        # Made before the clock starts: each client builds an SSL context (tens of ms).
        clients = [
            httpx.AsyncClient(base_url=cluster.nginx.url, timeout=30) for _ in range(CLIENTS)
        ]
        try:
            run.started = time.time()
            await asyncio.gather(killer(), *(client(http) for http in clients))
        finally:
            for http in clients:
                await http.aclose()

    asyncio.run(main())
    return run


def wait_for(read: Callable[[], T], done: Callable[[T], bool], seconds: float = 5.0) -> T:
    """`read()` again until `done` with it, for at most `seconds`; the last value."""
    deadline = time.monotonic() + seconds
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def request_number(record: dict[str, Any]) -> int:
    return int(record["body"]["messages"][0]["content"].split()[0][1:])


def produced(record: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens the mock produced for a request: as reported when it finished,
    else all it planned (an upper bound: a provider may bill a request cut short in full)."""
    if record["completed"] and record["usage_normalized"] is not None:
        usage = record["usage_normalized"]
        return usage["input_tokens"], usage["output_tokens"]
    planned = record["planned_usage"]
    if planned is None:
        return 0, 0  # gone before the mock got to it
    return planned["prompt_tokens"], planned["completion_tokens"]


def microcents(cents: object) -> int:
    return int(Decimal(str(cents)) * 1_000_000)


def test_worker_killed_under_load_costs_no_more_than_its_in_flight_requests(
    cluster: Cluster, mock_upstream: Mock
) -> None:
    keys: dict[str, dict[str, Any]] = {}
    upstream_keys: dict[str, str] = {}
    for name, limits in BUDGETS.items():
        keys[name], upstream_keys[name] = cluster.new_key(f"kill-{name}", **limits)
    tokens = {name: str(key["scopedKey"]) for name, key in keys.items()}
    since = cluster.log_sizes()
    nginx_since = cluster.nginx_log_size()
    doomed = cluster.address(cluster.instances[DOOMED])
    survivors = [cluster.address(t) for i, t in enumerate(cluster.instances) if i != DOOMED]

    run = load(cluster, tokens)
    shots, killed = run.shots, run.killed
    took = max(s.ended for s in shots) - run.started
    sent = len(shots)

    # --- where each request went: nginx's log, each instance's log ---
    entries = wait_for(lambda: cluster.nginx_entries(nginx_since), lambda e: len(e) >= sent)
    assert len(entries) == sent, "nginx logs every request once"
    by_upstream = Counter(entry.upstream for entry in entries)
    answered = wait_for(
        lambda: cluster.access_statuses(since),
        lambda found: all(
            len(found[i]) >= by_upstream[cluster.address(t)]
            for i, t in enumerate(cluster.instances)
            if i != DOOMED
        ),
    )
    before = [len(s) for s in cluster.access_statuses(since, run.sizes)]
    after = [len(s) for s in cluster.access_statuses(run.sizes)]
    sent_to = [by_upstream[cluster.address(t)] for t in cluster.instances]
    in_flight = sent_to[DOOMED] - len(answered[DOOMED])
    # nginx tried the dead instance first, was refused, and sent the request on (tries: 2).
    retried = [e for e in entries if len(e.upstreams) > 1]

    errors = [s for s in shots if s.outcome == "error"]
    late = [s for s in errors if s.started >= killed]
    outcomes = Counter(s.outcome for s in shots)
    kinds = Counter(s.error for s in errors)
    open_at_kill = sum(1 for s in shots if s.started < killed < s.ended)
    ok_after = sum(1 for s in shots if s.outcome == "ok" and s.started >= killed + WINDOW)
    slowest = max(s.ended - s.started for s in shots if s.outcome == "ok")

    print(
        f"\nkill: {CLIENTS} clients, {sent} requests in {took:.1f}s "
        f"({sum(s.stream for s in shots)} streamed), worker {DOOMED} SIGKILLed at "
        f"{killed - run.started:.2f}s with {open_at_kill} requests open over all workers"
        f"\nkill: answered per worker before the kill: {before}"
        f"\nkill: answered per worker after the kill: {after}"
        f"\nkill: sent per worker by nginx: {sent_to}"
        f"\nkill: in flight on the killed worker: {in_flight} "
        f"(nginx sent it {sent_to[DOOMED]}, it answered {len(answered[DOOMED])})"
        f"\nkill: client errors: {len(errors)} {dict(kinds)}, sent after the kill: {len(late)}"
        f" {[f'+{(s.started - killed) * 1000:.0f}ms' for s in late]}"
        f"\nkill: refused by the dead worker and retried on a survivor, during the load: "
        f"{len(retried)}"
        f"\nkill: requests lost: {len(errors)}; outcomes {dict(outcomes)}; "
        f"slowest served {slowest:.2f}s"
        f"\nkill: small budgets spent at: "
        + ", ".join(f"{name} {at - run.started:.1f}s" for name, at in run.spent.items())
    )

    # Requests spread over every worker, and the kill came under load.
    assert all(n >= max(5, sum(before) // 10) for n in before), before
    assert in_flight >= 3, "the killed worker had requests in flight"
    # The kill cost no more than the requests in flight on the dead worker ...
    assert len(errors) <= in_flight, (len(errors), in_flight)
    assert all(s.ended >= killed for s in errors), "no error before the kill"
    # ... and new requests went to the survivors, unseen by the clients.
    assert all(s.started < killed + WINDOW for s in errors), [
        (s.started - killed, s.error) for s in late
    ]
    assert after[DOOMED] == 0, after
    assert all(after[i] >= 20 for i in range(len(after)) if i != DOOMED), after
    assert ok_after >= 20, ok_after
    for entry in retried:
        assert entry.upstreams[0] == doomed and entry.upstream_statuses[0] == "502", entry
        assert len(entry.upstreams) == 2 and entry.upstream in survivors, entry
    for i, statuses in enumerate(answered):
        assert set(statuses) <= {200, 402}, (i, Counter(statuses))
    for entry in entries:
        if entry.upstream in survivors:
            assert entry.status in (200, 402), entry
    # Every request a survivor got, it answered (and logged) once; the dead one none after.
    for i in range(len(cluster.instances)):
        if i != DOOMED:
            assert len(answered[i]) == sent_to[i], (i, len(answered[i]), sent_to[i])

    # --- every key reconciles once the reaper has charged the lost requests' holds ---
    pricer = Pricer()
    rates = pricer.rates("openai", MODEL)
    assert rates is not None

    def cost(input_tokens: int, output_tokens: int) -> int:
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        value = pricer.cost_microcents("openai", MODEL, usage)
        assert value is not None
        return value

    reaped = {
        name: wait_for(
            lambda key=key: cluster.read_key(key["id"]),
            lambda k: k["heldTokens"] == 0 and microcents(k["heldSpendCents"]) == 0,
            seconds=HOLD_SECONDS + 10,
        )
        for name, key in keys.items()
    }
    by_number = {s.i: s for s in shots}
    for name, limits in BUDGETS.items():
        key = reaped[name]
        mine = [s for s in shots if s.budget == name]
        served = [s for s in mine if s.outcome == "ok"]
        lost = [s for s in mine if s.outcome == "error"]
        # Served long enough to be reaped while in flight: charged up to its hold, too.
        slow = [s for s in served if s.ended - s.started >= HOLD_SECONDS - 0.5]
        records = records_for(mock_upstream, upstream_keys[name])
        numbers = Counter(request_number(r) for r in records)
        assert all(n == 1 for n in numbers.values()), "one upstream call per request"
        assert {s.i for s in served} <= set(numbers), "every 200 came from the provider"
        assert all(by_number[n].outcome in ("ok", "error") for n in numbers), "a 402 went out"
        refused = Counter(s.code for s in mine if s.outcome == "refused")
        usage = {
            request_number(r): r["usage_normalized"]
            for r in records
            if by_number[request_number(r)].outcome == "ok"
        }
        made = [produced(r) for r in records]

        used_act = key["usedActivations"]
        line = (
            f"kill: key {name}: {len(mine)} requests, {len(served)} served, {len(lost)} lost, "
            f"refused {dict(refused)}; activations {used_act}+{key['remainingActivations']}"
            f"/{limits['max_activations']}, upstream {len(records)}"
        )
        assert key["heldTokens"] == 0 and microcents(key["heldSpendCents"]) == 0
        assert used_act + key["remainingActivations"] == limits["max_activations"]
        assert len(served) <= len(records) <= used_act <= len(served) + len(lost)
        if "max_tokens" in limits:
            limit = limits["max_tokens"]
            used = key["usedTokens"]
            got = sum(u["input_tokens"] + u["output_tokens"] for u in usage.values())
            bound = sum(s.hold_tokens for s in lost + slow)
            delivered = sum(i + o for i, o in made)
            line += (
                f"; tokens used {used} + held {key['heldTokens']} + remaining "
                f"{key['remainingTokens']} = {limit}, served {got}, produced upstream {delivered}"
            )
            assert used + key["heldTokens"] + key["remainingTokens"] == limit
            assert delivered <= used <= limit
            assert got <= used <= got + bound, (got, used, bound)
        if "max_spend_cents" in limits:
            limit = limits["max_spend_cents"] * 1_000_000
            used = key["usedSpendMicrocents"]
            remaining = microcents(key["remainingSpendCents"])
            got = sum(cost(u["input_tokens"], u["output_tokens"]) for u in usage.values())
            bound = sum(
                math.ceil(estimate_input_tokens(s.body) * rates.input_nanocents_per_token / 1000)
                + math.ceil(s.cap * rates.output_nanocents_per_token / 1000)
                for s in lost + slow
            )
            delivered = sum(cost(i, o) for i, o in made)
            line += (
                f"; µ¢ used {used} + held 0 + remaining {remaining} = {limit}, served {got}, "
                f"produced upstream {delivered}"
            )
            assert used + remaining == limit
            assert delivered <= used <= limit
            assert got <= used <= got + bound, (got, used, bound)
        print(line)
        if REFUSALS[name]:
            assert set(refused) == REFUSALS[name], (name, refused)  # the budget was spent
        else:
            assert not refused

    # --- once nginx tries the dead instance again, the client still sees nothing ---
    # max_fails=1 took it out of each nginx worker at its first failure, for fail_timeout; then
    # nginx tries it again, is refused, and sends the request to another instance.
    timeout = re.search(r"\bfail_timeout=(\d+)s", CONFIG.read_text())
    assert timeout is not None, f"{CONFIG}: no fail_timeout"
    time.sleep(max(0.0, killed + int(timeout[1]) + 0.5 - time.time()))
    since_retry = cluster.nginx_log_size()
    statuses: Counter[int] = Counter()
    probes: list[NginxEntry] = []
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection, any nginx worker
    with httpx.Client(base_url=cluster.nginx.url, timeout=30, limits=fresh) as http:
        # Until nginx has tried the dead instance (least_conn takes each in turn), boundedly.
        while len(probes) < RETRY_PROBES and not any(len(e.upstreams) > 1 for e in probes):
            for _ in range(10):
                resp = http.post(CHAT, headers=bearer(tokens["roomy"]), json=PROBE)
                statuses[resp.status_code] += 1
            probes = wait_for(
                lambda: cluster.nginx_entries(since_retry),
                lambda e: len(e) >= statuses.total(),
            )
    retried = [e for e in probes if len(e.upstreams) > 1]
    print(
        f"kill: {statuses.total()} requests {int(timeout[1])}s after the kill: {dict(statuses)}, "
        f"{len(retried)} refused by the dead worker and sent on by nginx"
    )
    assert statuses == {200: statuses.total()}, statuses
    assert len(probes) == statuses.total() and all(e.upstream in survivors for e in probes)
    assert retried, "nginx tried the dead instance again"
    for entry in retried:
        assert entry.upstreams[0] == doomed and entry.upstream_statuses[0] == "502", entry
