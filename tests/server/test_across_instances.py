"""Till's central promise across instances: three `till serve` behind nginx, one Redis.

The deployment a team runs (deploy/docker-compose.yml, with local processes: tests/lb.py):
Debian's nginx with the shipped deploy/nginx.conf in front of three Till instances that share
one Redis server (AOF on, as compose runs it) and one keyring. Through it, requests spread over
every instance, limits stay exact under a burst (SECURITY.md P6), token and cent budgets hold
with streams in the mix (P7), streams reach the client unbuffered, and a revocation is seen by
every instance at once (P5). A worker killed under load: tests/server/test_deploy_topology.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

from tests.conftest import Mock
from tests.lb import CHAT, Cluster, bearer, compose_redis_flags, records_for, run_cluster
from till.server.pricing import Pricer, Usage

# `make deploy-test` runs these and tests/server/test_deploy_topology.py (`pytest -m deploy`).
pytestmark = pytest.mark.deploy

T = TypeVar("T")
Result = tuple[int, str | None, bool]  # status, error code, streamed
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def cluster(mock_upstream: Mock, log_dir: Path) -> Iterator[Cluster]:
    # TILL_DEFAULT_MAX_OUTPUT_TOKENS: the cap Till sets on a request without one: small enough
    # that a burst at a budget serves dozens of requests, not the one or two that 4,096-token
    # holds would let in.
    with run_cluster("lb", mock_upstream, log_dir, TILL_DEFAULT_MAX_OUTPUT_TOKENS="300") as c:
        yield c


def test_redis_runs_as_compose_sets_it_up(cluster: Cluster) -> None:
    """The shared Redis has deploy/docker-compose.yml's settings: AOF on, fsync every second,
    no eviction; and the append-only file is being written."""
    flags = compose_redis_flags()
    wanted = dict(zip(flags[::2], flags[1::2], strict=True))
    assert {"--appendonly", "--appendfsync", "--maxmemory-policy"} <= set(wanted)
    with redis.Redis.from_url(cluster.redis.url) as store:
        for flag, value in wanted.items():
            name = flag.removeprefix("--")
            assert store.config_get(name) == {name: value}, name
        persistence = store.info("persistence")
    assert persistence["aof_enabled"] == 1 and persistence["aof_last_write_status"] == "ok"
    aof = cluster.redis.dir / "appendonlydir"
    written = sum(f.stat().st_size for f in aof.glob("*.incr.aof"))
    print(
        f"\nredis: {' '.join(flags)}; AOF {persistence['aof_current_size']} bytes, "
        f"{written} in the incremental file"
    )
    assert written > 0  # the tenant made at start-up is in it


class Burst:
    """`n` requests at once, each on its own connection, released together.

    The connections are spread over several httpx.AsyncClients of at most SHARD connections:
    one httpcore pool of 1,000 connections spends its time on pool bookkeeping (1,000 requests
    took ~27 s from one client, ~3 s from twenty, while nginx logged each under 2.5 s).
    `peak` is the most requests at once that were sent in full and not yet answered.
    """

    SHARD = 50

    def __init__(self, base_url: str, n: int) -> None:
        self.n = n
        shards = max(1, -(-n // self.SHARD))
        per = -(-n // shards)
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        self.clients = [
            httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) for _ in range(shards)
        ]
        self.start = asyncio.Event()
        self.in_flight = self.peak = 0

    def client(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % len(self.clients)]

    async def trace(self, name: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: a request counts from its last byte sent to its headers."""
        if name == "http11.send_request_body.complete":
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        elif name == "http11.receive_response_headers.complete":
            self.in_flight -= 1

    @property
    def extensions(self) -> dict[str, Any]:
        return {"trace": self.trace}

    async def run(self, make: Callable[[int], Awaitable[T]]) -> list[T]:
        try:
            tasks = [asyncio.ensure_future(make(i)) for i in range(self.n)]
            await asyncio.sleep(0.05)  # every task waits at the start line
            self.start.set()
            return await asyncio.gather(*tasks)
        finally:
            for http in self.clients:
                await http.aclose()


# --- P6: activations ---


def test_activation_limit_is_exact_behind_nginx(cluster: Cluster, mock_upstream: Mock) -> None:
    fired = 1000
    key, upstream_key = cluster.new_key("activations", max_activations=50)
    token = str(key["scopedKey"])
    since = cluster.log_sizes()
    nginx_since = cluster.nginx_log_size()

    burst = Burst(cluster.nginx.url, fired)

    async def one(i: int) -> tuple[int, str | None]:
        await burst.start.wait()
        resp = await burst.client(i).post(
            CHAT,
            headers=bearer(token),
            json={"model": "gpt-4o", "messages": MESSAGES},
            extensions=burst.extensions,
        )
        code = None if resp.status_code == 200 else resp.json()["error"]["code"]
        return resp.status_code, code

    started = time.monotonic()
    results = asyncio.run(burst.run(one))
    took = time.monotonic() - started
    outcomes = Counter(results)
    assert outcomes == {(200, None): 50, (402, "activation_limit_reached"): fired - 50}, outcomes
    assert len(records_for(mock_upstream, upstream_key)) == 50
    after = cluster.read_key(key["id"])
    assert after["usedActivations"] == 50 and after["status"] == "exhausted"
    assert after["remainingActivations"] == 0

    # Every request went through nginx to exactly one instance, and all three took a share.
    deadline = time.monotonic() + 5
    per_instance = cluster.access_statuses(since)
    while sum(map(len, per_instance)) < fired and time.monotonic() < deadline:
        time.sleep(0.05)  # hypercorn writes its access line just after the response
        per_instance = cluster.access_statuses(since)
    spread = [len(statuses) for statuses in per_instance]
    served = [statuses.count(200) for statuses in per_instance]
    print(
        f"\nactivations: {fired} fired in {took:.1f}s (peak {burst.peak} in flight), "
        f"per instance {spread}, 200s per instance {served}"
    )
    assert sum(spread) == fired, spread
    assert sum(served) == 50
    assert all(n >= fired // 10 for n in spread), spread
    # nginx's own log agrees, and never records a retry at a second instance.
    entries = cluster.nginx_entries(nginx_since)
    assert len(entries) == fired
    assert all(len(entry.upstreams) == 1 for entry in entries)
    by_upstream = Counter(entry.upstream for entry in entries)
    assert [by_upstream[cluster.address(till)] for till in cluster.instances] == spread


# --- P7: tokens and cents ---


@dataclass
class Ask:
    words: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    mock_output: int


def asks(n: int, seed: int) -> list[Ask]:
    """Mixed requests: short and long prompts, small and absent caps, plain and streamed.

    Outputs vary through the caps: the mock stops at a request's cap before it looks at
    x-mock-output-tokens, and Till sets a cap on every request of a limited key.
    """
    rng = random.Random(seed)
    return [
        Ask(
            words=rng.randint(200, 400) if rng.random() < 0.1 else rng.randint(1, 60),
            max_tokens=None if rng.random() < 0.1 else rng.randint(1, 200),
            stream=rng.random() < 0.4,
            include_usage=rng.random() < 0.5,
            mock_output=rng.randint(1, 400),
        )
        for _ in range(n)
    ]


def fire(url: str, token: str, model: str, plan: list[Ask]) -> tuple[list[Result], int]:
    """All of `plan` at once: (status, error code, streamed) per request, in order; the peak."""
    burst = Burst(url, len(plan))

    async def one(i: int) -> Result:
        ask = plan[i]
        body: dict[str, Any] = {
            "model": model,
            # The first word names the request, so the mock's record can be found.
            "messages": [{"role": "user", "content": f"r{i} " + "lorem " * ask.words}],
        }
        if ask.max_tokens is not None:
            body["max_tokens"] = ask.max_tokens
        if ask.stream:
            body["stream"] = True
            if ask.include_usage:
                body["stream_options"] = {"include_usage": True}
        headers = {**bearer(token), "x-mock-output-tokens": str(ask.mock_output)}
        await burst.start.wait()
        http = burst.client(i)
        async with http.stream(
            "POST", CHAT, headers=headers, json=body, extensions=burst.extensions
        ) as resp:
            data = await resp.aread()
        if resp.status_code != 200:
            return resp.status_code, json.loads(data)["error"]["code"], ask.stream
        if ask.stream:
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        return 200, None, ask.stream

    results = asyncio.run(burst.run(one))
    return results, burst.peak


def check_served(records: list[dict[str, Any]], plan: list[Ask], results: list[Result]) -> None:
    """The mock saw exactly the requests answered 200, each complete, none past its own cap."""
    served = {i for i, (status, _, _) in enumerate(results) if status == 200}
    seen = {int(r["body"]["messages"][0]["content"].split()[0][1:]) for r in records}
    assert seen == served and len(records) == len(served)
    for r in records:
        assert r["completed"] and r["usage_normalized"] is not None, r
        ask = plan[int(r["body"]["messages"][0]["content"].split()[0][1:])]
        # The clamp lowers a cap (or sets one), never raises it.
        caps = [r["body"][f] for f in ("max_tokens", "max_completion_tokens") if f in r["body"]]
        assert caps, r["body"]
        cap = min(caps)
        assert ask.max_tokens is None or cap <= ask.max_tokens
        assert r["usage_normalized"]["output_tokens"] <= cap


def test_token_limit_holds_behind_nginx(cluster: Cluster, mock_upstream: Mock) -> None:
    limit = 5000
    key, upstream_key = cluster.new_key("tokens", max_activations=10_000, max_tokens=limit)
    plan = asks(300, seed=7)
    results, peak = fire(cluster.nginx.url, str(key["scopedKey"]), "gpt-4o", plan)

    statuses = Counter((status, code) for status, code, _ in results)
    assert set(statuses) <= {(200, None), (402, "token_limit_reached")}, statuses
    served = statuses[(200, None)]
    streamed = sum(1 for status, _, stream in results if status == 200 and stream)
    records = records_for(mock_upstream, upstream_key)
    check_served(records, plan, results)
    used = sum(
        r["usage_normalized"]["input_tokens"] + r["usage_normalized"]["output_tokens"]
        for r in records
    )
    print(
        f"\ntokens: 300 fired (peak {peak} in flight), {served} served ({streamed} streamed), "
        f"{used}/{limit} tokens used"
    )
    assert served >= 10 and streamed >= 1 and statuses[(402, "token_limit_reached")] >= 1
    assert used <= limit  # overshoot: none

    after = cluster.read_key(key["id"])
    assert after["usedTokens"] == used
    assert after["heldTokens"] == 0
    assert after["usedTokens"] + after["heldTokens"] + after["remainingTokens"] == limit
    assert after["usedActivations"] == served


def microcents(cents: object) -> int:
    return int(Decimal(str(cents)) * 1_000_000)


def test_spend_limit_holds_behind_nginx(cluster: Cluster, mock_upstream: Mock) -> None:
    model, limit_cents = "gpt-4o", 10
    limit = limit_cents * 1_000_000
    key, upstream_key = cluster.new_key(
        "cents", max_activations=10_000, max_spend_cents=limit_cents
    )
    plan = asks(300, seed=11)
    results, peak = fire(cluster.nginx.url, str(key["scopedKey"]), model, plan)

    statuses = Counter((status, code) for status, code, _ in results)
    assert set(statuses) <= {(200, None), (402, "spend_limit_reached")}, statuses
    served = statuses[(200, None)]
    streamed = sum(1 for status, _, stream in results if status == 200 and stream)
    records = records_for(mock_upstream, upstream_key)
    check_served(records, plan, results)
    pricer = Pricer()
    spent = 0
    for r in records:
        u = r["usage_normalized"]
        cost = pricer.cost_microcents(
            "openai",
            r["model"],
            Usage(
                input_tokens=u["input_tokens"],
                output_tokens=u["output_tokens"],
                cache_read_tokens=u["cache_read_tokens"],
                cache_write_tokens=u["cache_write_tokens"],
            ),
        )
        assert cost is not None and cost > 0
        spent += cost
    print(
        f"\ncents: 300 fired (peak {peak} in flight), {served} served ({streamed} streamed), "
        f"{spent}/{limit} µ¢ spent"
    )
    assert served >= 10 and streamed >= 1 and statuses[(402, "spend_limit_reached")] >= 1
    assert spent <= limit  # overshoot: none

    after = cluster.read_key(key["id"])
    assert after["usedSpendMicrocents"] == spent
    assert microcents(after["heldSpendCents"]) == 0
    held, remaining = microcents(after["heldSpendCents"]), microcents(after["remainingSpendCents"])
    assert after["usedSpendMicrocents"] + held + remaining == limit
    assert after["usedActivations"] == served


# --- streams pass through nginx as they come ---


def test_stream_is_not_buffered_by_nginx(cluster: Cluster, mock_upstream: Mock) -> None:
    key, upstream_key = cluster.new_key("stream", max_activations=5, max_tokens=10_000)
    # max_tokens: Till caps every request of a limited key, and the mock honours a cap first.
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 5}
    headers = {**bearer(str(key["scopedKey"])), "x-mock-delay-ms": "200"}
    headers["x-mock-output-tokens"] = "5"

    async def read() -> tuple[float, list[float]]:
        arrivals: list[float] = []
        async with httpx.AsyncClient(base_url=cluster.nginx.url, timeout=30) as http:
            sent = time.time()
            async with http.stream("POST", CHAT, headers=headers, json=body) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        arrivals.append(time.time())
        return sent, arrivals

    sent, arrivals = asyncio.run(read())
    (record,) = records_for(mock_upstream, upstream_key)
    assert record["completed"] and record["usage_normalized"]["output_tokens"] == 5
    ended = float(record["ended_at"])
    first, last = arrivals[0] - sent, arrivals[-1] - sent
    print(f"\nstream: {len(arrivals)} events, first after {first:.2f}s, last after {last:.2f}s")
    # One event per 200 ms delay (role, five tokens, finish, usage): the first is in hand while
    # the mock still has at least four delays to go, and the events arrive spread out.
    assert len(arrivals) >= 7
    assert arrivals[0] < ended - 0.7
    assert first < 0.8
    assert arrivals[-1] - arrivals[0] > 0.8


# --- P5: revocation ---


def test_top_ups_and_a_holders_revocation_are_seen_by_every_instance_at_once(
    cluster: Cluster, mock_upstream: Mock
) -> None:
    key, _ = cluster.new_key("top-up", max_activations=1)
    token = str(key["scopedKey"])
    chat = {"model": "gpt-4o", "messages": MESSAGES}
    first, *others = cluster.instances
    resp = httpx.post(f"{first.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
    assert resp.status_code == 200, resp.text
    for till in cluster.instances:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
        assert resp.json()["error"]["code"] == "activation_limit_reached", resp.text
    with cluster.admin() as admin:
        resp = admin.patch(f"/admin/keys/{key['id']}", json={"add_activations": len(others)})
    assert resp.json()["key"]["status"] == "active", resp.text
    # No wait: each other instance serves one of the activations added, then none is left.
    for till in others:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
        assert resp.status_code == 200, (till.url, resp.text)
    for till in cluster.instances:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
        assert resp.status_code == 402, (till.url, resp.text)
    # A child minted on one instance, burnt by its holder on another, is refused everywhere.
    with cluster.admin() as admin:
        admin.patch(f"/admin/keys/{key['id']}", json={"add_activations": 10})
    resp = httpx.post(
        f"{first.url}/v1/till/keys", headers=bearer(token), json={"max_activations": 5}, timeout=30
    )
    assert resp.status_code == 201, resp.text
    child = str(resp.json()["key"]["scopedKey"])
    resp = httpx.delete(f"{others[0].url}/v1/till/key", headers=bearer(child), timeout=30)
    assert resp.json()["key"]["status"] == "revoked", resp.text
    for till in cluster.instances:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(child), json=chat, timeout=30)
        assert resp.json()["error"]["code"] == "key_revoked", (till.url, resp.text)


def test_revocation_is_seen_by_every_instance_at_once(
    cluster: Cluster, mock_upstream: Mock
) -> None:
    key, upstream_key = cluster.new_key("revoke", max_activations=100)
    token = str(key["scopedKey"])
    chat = {"model": "gpt-4o", "messages": MESSAGES}
    # Every instance has opened (and cached) the token and served it.
    for till in cluster.instances:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
        assert resp.status_code == 200, resp.text

    with cluster.admin() as admin:
        resp = admin.delete(f"/admin/keys/{key['id']}")
    assert resp.status_code == 200 and resp.json()["key"]["status"] == "revoked"
    # At once: no wait between the revocation and the first request to each instance.
    for till in cluster.instances:
        resp = httpx.post(f"{till.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
        assert resp.status_code == 401, (till.url, resp.text)
        assert token not in resp.text
    # Through nginx too, and with the token in the query string (which no log may keep:
    # the fixture scans nginx's and every instance's logs on teardown).
    resp = httpx.post(f"{cluster.nginx.url}{CHAT}", headers=bearer(token), json=chat, timeout=30)
    assert resp.status_code == 401
    since = cluster.nginx.access_log.stat().st_size
    resp = httpx.post(f"{cluster.nginx.url}{CHAT}", params={"key": token}, json=chat, timeout=30)
    assert resp.status_code == 401
    deadline = time.monotonic() + 5
    logged = ""
    while '" 401 ' not in logged and time.monotonic() < deadline:
        time.sleep(0.02)  # nginx logs a request once it is answered
        with cluster.nginx.access_log.open("rb") as fh:
            fh.seek(since)
            logged = fh.read().decode()
    assert f'"POST {CHAT} HTTP/1.1" 401 ' in logged
    assert "key=" not in logged and token not in logged
    assert len(records_for(mock_upstream, upstream_key)) == len(cluster.instances)
    after = cluster.read_key(key["id"])
    assert after["status"] == "revoked" and after["usedActivations"] == len(cluster.instances)
