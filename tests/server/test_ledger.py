"""The budget layer against real stores: a Debian redis-server, the embedded one, and a
three-primary Redis Cluster (tests/cluster.py).

Every test makes its own tenant (unique id), so the shared Redis needs no flush. No mocks:
the Lua scripts run in a real Redis, and each promise is checked by reading the store back.
"""

from __future__ import annotations

import asyncio
import calendar
import math
import random
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.exceptions as rexc

from tests.cluster import Cluster, redis_cluster_fixture  # noqa: F401
from tests.conftest import (
    SECRET_PATTERN,
    UPSTREAM_KEY,
    free_port,
    short_tmpdir,
    start_redis,
    stop_process,
)
from till.server.embedded import EmbeddedRedis
from till.server.ledger import (
    MONTH_TTL_SECONDS,
    RATE_WINDOW_MS,
    SETTLED_TTL_SECONDS,
    TENANTS_SET,
    Admission,
    KeyRecord,
    Ledger,
    Refused,
    StoreUnavailable,
    connect,
    month_of,
    now_ms,
    tkey,
)
from till.server.plans import PLANS, Plan
from till.tokens import new_key_id

PRO = PLANS["pro"]
TINY = Plan("tiny", max_keys=2, max_activations_per_month=3)
MONTH = month_of(time.time())
HOUR = 3600
Snapshot = dict[bytes, tuple[bytes, bool, Any]]


# --- stores ---


@pytest.fixture(scope="module")
def embedded_url() -> Iterator[str]:
    directory = short_tmpdir("till-ledger-")
    store = EmbeddedRedis(directory)
    url = store.start()
    yield url
    store.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=["redis", "embedded", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        url = cluster.url
    else:
        url = request.getfixturevalue("embedded_url")
    return url


@pytest.fixture
def dedicated(store_url: str, embedded_url: str) -> bool:
    """Whether no Till server's reaper shares the store (a session-long one uses the Redis).

    Till servers on the cluster live only as long as their own test.
    """
    return store_url == embedded_url or store_url.startswith("redis+cluster://")


@pytest.fixture
async def ledger(store_url: str) -> AsyncIterator[Ledger]:
    led = Ledger(connect(store_url, timeout=2.0, max_connections=64))
    yield led
    await led.close()


# --- helpers ---


async def new_tenant(ledger: Ledger, plan: Plan = PRO) -> str:
    record, _ = await ledger.create_tenant("acme", "ops@example.com", plan)
    return record.id


async def new_key(
    ledger: Ledger,
    tenant: str,
    *,
    max_activations: int = 100,
    max_tokens: int | None = None,
    max_microcents: int | None = None,
    ancestors: list[str] | None = None,
) -> str:
    key_id = new_key_id()
    await ledger.create_key(
        tenant_id=tenant,
        key_id=key_id,
        provider="openai",
        max_activations=max_activations,
        max_tokens=max_tokens,
        max_microcents=max_microcents,
        metadata={"team": "search"},
        ip_whitelist=[],
        ancestors=ancestors or (),
    )
    return key_id


async def reserve(
    ledger: Ledger,
    tenant: str,
    key: str,
    rid: str | None = None,
    *,
    input_tokens: int = 10,
    asked: int = -1,
    default: int = 100,
    input_mc: int = 0,
    out_nc: int = 0,
    month: str = MONTH,
    hold_seconds: int = HOUR,
    min_output: int = 1,
) -> Admission:
    return await ledger.reserve(
        tenant_id=tenant,
        key_id=key,
        request_id=rid or new_key_id(),
        month=month,
        input_tokens=input_tokens,
        asked_output=asked,
        default_output=default,
        input_microcents=input_mc,
        output_nanocents=out_nc,
        hold_seconds=hold_seconds,
        min_output=min_output,
    )


async def key_of(ledger: Ledger, tenant: str, key: str) -> KeyRecord:
    record = await ledger.get_key(tenant, key)
    assert record is not None
    return record


def check_invariant(rec: KeyRecord, remaining_tokens: int | None, remaining_mc: int | None) -> None:
    """used + held + remaining == limit, for each limit the key has."""
    if rec.max_tokens is None:
        assert remaining_tokens is None
    else:
        assert remaining_tokens is not None
        assert rec.used_tokens + rec.held_tokens + remaining_tokens == rec.max_tokens
    if rec.max_microcents is None:
        assert remaining_mc is None
    else:
        assert remaining_mc is not None
        assert rec.used_microcents + rec.held_microcents + remaining_mc == rec.max_microcents


async def snapshot(ledger: Ledger, tenant: str) -> Snapshot:
    """Every Redis key of the tenant: its type, whether it expires, and its whole value."""
    r: Any = ledger.store
    out: Snapshot = {}
    async for key in r.scan_iter(match=f"till:{{t:{tenant}}}:*", count=1000):
        kind: bytes = await r.type(key)
        value: Any
        if kind == b"hash":
            value = await r.hgetall(key)
        elif kind == b"string":
            value = await r.get(key)
        elif kind == b"zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            value = await r.smembers(key)
        else:
            value = await r.dump(key)
        out[key] = (kind, await r.pttl(key) > 0, value)
    assert out, "the tenant has no keys at all: the snapshot would prove nothing"
    return out


async def refused(coro: Awaitable[object], code: str) -> Refused:
    with pytest.raises(Refused) as info:
        await coro
    assert info.value.code == code
    return info.value


def reserve_keys(tenant: str, key: str, rid: str, month: str = MONTH) -> list[str]:
    return [
        tkey(tenant, f"k:{key}"),
        tkey(tenant, "tenant"),
        tkey(tenant, f"m:{month}"),
        tkey(tenant, f"r:{rid}"),
        tkey(tenant, "holds"),
    ]


def reserve_args(key: str, rid: str, **over: int | str) -> list[int | str]:
    """ARGV of reserve.lua, by name: a valid call unless ``over`` says otherwise."""
    now = now_ms()
    base: dict[str, int | str] = {
        "now": now,
        "deadline": now + HOUR * 1000,
        "month_ttl": MONTH_TTL_SECONDS,
        "input": 10,
        "asked": 50,
        "default": 100,
        "input_mc": 100,
        "out_nc": 2000,
        "min_out": 1,
        "window": RATE_WINDOW_MS,
    }
    base.update(over)
    return [f"{key}:{rid}", *base.values()]


def settle_keys(tenant: str, key: str, rid: str, month: str = MONTH) -> list[str]:
    return [
        tkey(tenant, f"k:{key}"),
        tkey(tenant, f"r:{rid}"),
        tkey(tenant, "holds"),
        tkey(tenant, f"m:{month}"),
    ]


# --- 1. reserve and settle ---


async def test_token_limited_holds_and_settles(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=10, max_tokens=1000)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.used_tokens, rec.held_tokens, rec.status) == (
        0,
        0,
        0,
        "active",
    )
    assert rec.last_used_ms is None

    # Asked 300 of 600 affordable: granted as asked, hold = input + grant.
    a1 = await reserve(ledger, tenant, key, "r1", input_tokens=100, asked=300)
    assert a1 == Admission(300, 9, 600, None)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.held_tokens, rec.used_tokens) == (1, 400, 0)
    assert rec.last_used_ms is not None
    check_invariant(rec, a1.remaining_tokens, None)

    # No cap asked: the default (1000) is clamped to what remains after the input (400).
    a2 = await reserve(ledger, tenant, key, "r2", input_tokens=200, asked=-1, default=1000)
    assert a2 == Admission(400, 8, 0, None)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.held_tokens) == (2, 1000)
    check_invariant(rec, a2.remaining_tokens, None)
    assert await ledger.month_activations(tenant) == 2

    # Settle r1 with its actual usage: the 400 hold is replaced by 150 used.
    s1 = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="r1", month=MONTH, tokens=150, microcents=None
    )
    assert s1 is not None
    assert (s1.remaining_activations, s1.remaining_tokens, s1.remaining_microcents) == (
        8,
        250,
        None,
    )
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens) == (150, 600)
    check_invariant(rec, s1.remaining_tokens, None)

    # Unknown usage: the hold (600) is charged.
    s2 = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="r2", month=MONTH, tokens=None, microcents=None
    )
    assert s2 is not None
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens, rec.status) == (750, 0, "active")
    check_invariant(rec, s2.remaining_tokens, None)
    assert s2.remaining_tokens == 250
    assert await ledger.store.zcard(tkey(tenant, "holds")) == 0
    assert await ledger.store.hget(tkey(tenant, "r:r1"), "state") == b"settled"
    assert 0 < await ledger.store.ttl(tkey(tenant, "r:r1")) <= SETTLED_TTL_SECONDS

    # Overspend is charged as reported and exhausts the key.
    await reserve(ledger, tenant, key, "r3", input_tokens=0, asked=100)
    s3 = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="r3", month=MONTH, tokens=400, microcents=None
    )
    assert s3 is not None and s3.remaining_tokens == 0
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens, rec.status) == (1150, 0, "exhausted")


async def test_spend_limited_holds_and_settles(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=10, max_microcents=10_000)

    # 8000 left after the input's 2000: 1000 asked at 3 mc/token is affordable.
    a1 = await reserve(
        ledger, tenant, key, "s1", input_tokens=50, asked=1000, input_mc=2000, out_nc=3000
    )
    assert a1.grant == 1000
    rec = await key_of(ledger, tenant, key)
    assert rec.held_microcents == 2000 + math.ceil(1000 * 3000 / 1000) == 5000
    assert rec.held_tokens == 50 + 1000
    check_invariant(rec, None, a1.remaining_microcents)
    assert a1.remaining_microcents == 5000 and a1.remaining_tokens is None

    # 4000 left after input 1000; 2501 nc/token: floor(4_000_000 / 2501) = 1599 tokens,
    # whose cost 3999.099 mc rounds up to 4000.
    a2 = await reserve(
        ledger,
        tenant,
        key,
        "s2",
        input_tokens=7,
        asked=-1,
        default=4000,
        input_mc=1000,
        out_nc=2501,
    )
    assert a2.grant == 4_000_000 // 2501 == 1599
    rec = await key_of(ledger, tenant, key)
    assert rec.held_microcents == 5000 + 1000 + math.ceil(1599 * 2501 / 1000) == 10_000
    check_invariant(rec, None, a2.remaining_microcents)
    assert a2.remaining_microcents == 0

    # Nothing left: refused, not clamped to zero.
    await refused(reserve(ledger, tenant, key, input_mc=0, out_nc=1), "spend_limit_reached")

    s1 = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="s1", month=MONTH, tokens=500, microcents=4000
    )
    assert s1 is not None
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_microcents, rec.held_microcents, rec.used_tokens) == (4000, 5000, 500)
    check_invariant(rec, None, s1.remaining_microcents)
    s2 = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="s2", month=MONTH, tokens=None, microcents=None
    )
    assert s2 is not None
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_microcents, rec.held_microcents, rec.held_tokens) == (9000, 0, 0)
    check_invariant(rec, None, s2.remaining_microcents)
    assert s2.remaining_microcents == 1000 and rec.status == "active"


async def test_unlimited_key_holds_nothing(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=2)
    a = await reserve(ledger, tenant, key, "u1", input_tokens=5000, asked=9000)
    assert a == Admission(-1, 1, None, None)
    rec = await key_of(ledger, tenant, key)
    assert (rec.held_tokens, rec.held_microcents, rec.used_activations) == (0, 0, 1)
    s = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="u1", month=MONTH, tokens=12, microcents=34
    )
    assert s is not None and s.remaining_activations == 1
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.used_microcents, rec.held_tokens) == (12, 34, 0)


# --- 2. idempotency (P8) ---


async def test_same_request_id_reserves_and_settles_once(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=5, max_tokens=1000)
    first = await reserve(ledger, tenant, key, "dup", input_tokens=100, asked=200)
    # A resend, then 20 concurrent resends: the first answer, nothing more taken.
    again = await reserve(ledger, tenant, key, "dup", input_tokens=100, asked=200)
    many = await asyncio.gather(
        *(reserve(ledger, tenant, key, "dup", input_tokens=100, asked=200) for _ in range(20))
    )
    assert again == first and all(m == first for m in many)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.held_tokens) == (1, 300)
    assert await ledger.month_activations(tenant) == 1

    kw: dict[str, Any] = dict(tenant_id=tenant, key_id=key, request_id="dup", month=MONTH)
    done = await ledger.settle(**kw, tokens=120, microcents=None)
    assert done is not None
    before = await snapshot(ledger, tenant)
    assert await ledger.settle(**kw, tokens=120, microcents=None) is None
    results = await asyncio.gather(
        *(ledger.settle(**kw, tokens=999, microcents=None) for _ in range(20))
    )
    assert results == [None] * 20
    assert await snapshot(ledger, tenant) == before
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens, rec.used_activations) == (120, 0, 1)

    # A replayed reserve after the settle still takes nothing.
    assert await reserve(ledger, tenant, key, "dup") == first
    assert await snapshot(ledger, tenant) == before

    # Settling an id that was never reserved writes nothing either.
    assert await ledger.settle(**{**kw, "request_id": "never"}, tokens=5, microcents=5) is None
    assert await snapshot(ledger, tenant) == before


# --- 3. refusals write nothing (P9) ---


async def test_refusals_write_nothing(ledger: Ledger) -> None:
    store: Any = ledger.store

    async def check(tenant: str, code: str, attempt: Callable[[], Awaitable[object]]) -> None:
        before = await snapshot(ledger, tenant)
        await refused(attempt(), code)
        assert await snapshot(ledger, tenant) == before, code

    t = await new_tenant(ledger)

    k = await new_key(ledger, t, max_activations=1)
    await reserve(ledger, t, k)
    await check(t, "activation_limit_reached", lambda: reserve(ledger, t, k))

    # Token limit: by what is held (no room for the input), then by what is used.
    k = await new_key(ledger, t, max_tokens=100)
    await reserve(ledger, t, k, "t1", input_tokens=50, asked=50)
    await check(t, "token_limit_reached", lambda: reserve(ledger, t, k, input_tokens=0, asked=1))
    await ledger.settle(
        tenant_id=t, key_id=k, request_id="t1", month=MONTH, tokens=100, microcents=0
    )
    await check(t, "token_limit_reached", lambda: reserve(ledger, t, k, input_tokens=0))
    k = await new_key(ledger, t, max_tokens=100)
    await check(t, "token_limit_reached", lambda: reserve(ledger, t, k, input_tokens=100))
    await check(
        t, "token_limit_reached", lambda: reserve(ledger, t, k, input_tokens=90, min_output=11)
    )

    k = await new_key(ledger, t, max_microcents=1000)
    await check(t, "spend_limit_reached", lambda: reserve(ledger, t, k, input_mc=1001))
    await check(t, "spend_limit_reached", lambda: reserve(ledger, t, k, input_mc=999, out_nc=1001))
    await reserve(ledger, t, k, "m1", input_mc=100, out_nc=10)
    await ledger.settle(
        tenant_id=t, key_id=k, request_id="m1", month=MONTH, tokens=1, microcents=1000
    )
    await check(t, "spend_limit_reached", lambda: reserve(ledger, t, k, input_mc=0))
    k = await new_key(ledger, t, max_microcents=1000)
    await check(t, "unknown_model_price", lambda: reserve(ledger, t, k, input_mc=-1, out_nc=-1))
    await check(t, "unknown_model_price", lambda: reserve(ledger, t, k, input_mc=5, out_nc=-1))

    k = await new_key(ledger, t)
    await ledger.revoke_key(t, k)
    await check(t, "key_revoked", lambda: reserve(ledger, t, k))
    await check(t, "invalid_api_key", lambda: reserve(ledger, t, new_key_id()))

    tiny = await new_tenant(ledger, TINY)
    k = await new_key(ledger, tiny, max_activations=10)
    for _ in range(3):
        await reserve(ledger, tiny, k)
    await check(tiny, "monthly_quota_reached", lambda: reserve(ledger, tiny, k))

    k = await new_key(ledger, t)
    await store.hset(tkey(t, "tenant"), "status", "suspended")
    await check(t, "tenant_suspended", lambda: reserve(ledger, t, k))
    await check(t, "tenant_suspended", lambda: new_key(ledger, t))


# --- 4. bad arguments (P9) ---


BAD_VALUES = ["x", "", "1.5", "-3", "inf", "-inf", "nan", "1e20", "9007199254740993"]


async def test_bad_reserve_arguments_write_nothing(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_tokens=10_000, max_microcents=10_000_000)
    await reserve(ledger, tenant, key, "held")  # so that the tenant has holds and a month
    names = [
        "now",
        "deadline",
        "month_ttl",
        "input",
        "asked",
        "default",
        "input_mc",
        "out_nc",
        "min_out",
        "window",
    ]
    before = await snapshot(ledger, tenant)
    for name in names:
        for bad in BAD_VALUES:
            # -1 means "no cap" or "no price" where allowed: -3 is out of range everywhere.
            rid = new_key_id()
            with pytest.raises(rexc.ResponseError, match="till reserve"):
                await ledger._reserve(
                    keys=reserve_keys(tenant, key, rid), args=reserve_args(key, rid, **{name: bad})
                )
            assert await snapshot(ledger, tenant) == before, (name, bad)
    # Zero where at least one is needed, and a window over a day.
    for name, bad in (("month_ttl", 0), ("default", 0), ("window", 0), ("window", 86400001)):
        rid = new_key_id()
        with pytest.raises(rexc.ResponseError):
            await ledger._reserve(
                keys=reserve_keys(tenant, key, rid), args=reserve_args(key, rid, **{name: bad})
            )
    assert await snapshot(ledger, tenant) == before
    # The same call with good values does write: the checks above were not vacuous.
    rid = new_key_id()
    reply = await ledger._reserve(keys=reserve_keys(tenant, key, rid), args=reserve_args(key, rid))
    assert reply[0] == b"ok"
    assert await snapshot(ledger, tenant) != before


async def test_bad_settle_arguments_write_nothing(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_tokens=10_000, max_microcents=10_000_000)
    await reserve(ledger, tenant, key, "held", input_mc=100, out_nc=2000)
    # ARGV: member, tokens, micro-cents, refund (0 or 1), seconds to remember the settle.
    good: list[str | int] = [f"{key}:held", 5, 7, 0, SETTLED_TTL_SECONDS]
    extra = {3: ["2", "-1"], 4: ["0", "-1"]}
    before = await snapshot(ledger, tenant)
    for position in range(1, 5):
        for bad in [*BAD_VALUES, *extra.get(position, [])]:
            args = list(good)
            args[position] = bad
            with pytest.raises(rexc.ResponseError, match="till settle"):
                await ledger._settle(keys=settle_keys(tenant, key, "held"), args=args)
            assert await snapshot(ledger, tenant) == before, (position, bad)
    reply = await ledger._settle(keys=settle_keys(tenant, key, "held"), args=good)
    assert reply[0] == b"ok"
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.used_microcents, rec.held_tokens, rec.held_microcents) == (
        5,
        7,
        0,
        0,
    )


async def test_bad_create_key_arguments_write_nothing(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    await new_key(ledger, tenant)
    before = await snapshot(ledger, tenant)
    kid = new_key_id()
    keys = [tkey(tenant, "tenant"), tkey(tenant, f"k:{kid}"), tkey(tenant, "keys")]
    bad_args: list[list[str | int]] = [
        [kid, "soon", "id", kid],  # creation time not a number: ZADD would fail after HSET
        [kid, "nan", "id", kid],
        [kid, 1, "id"],  # odd field/value list
    ]
    for args in bad_args:
        with pytest.raises(rexc.ResponseError, match="till create_key"):
            await ledger._create_key(keys=keys, args=args)
        assert await snapshot(ledger, tenant) == before
    # An existing key id is not overwritten.
    existing = (await ledger.list_keys(tenant))[0].id
    with pytest.raises(rexc.ResponseError, match="already exists"):
        await new_key_with_id(ledger, tenant, existing)
    assert await snapshot(ledger, tenant) == before


async def new_key_with_id(ledger: Ledger, tenant: str, key_id: str) -> None:
    await ledger.create_key(
        tenant_id=tenant,
        key_id=key_id,
        provider="openai",
        max_activations=1,
        max_tokens=None,
        max_microcents=None,
        metadata={},
        ip_whitelist=[],
    )


# --- 5. concurrency (P6) ---


async def test_concurrent_reserves_admit_exactly_the_limit(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=50)
    results = await asyncio.gather(
        *(reserve(ledger, tenant, key) for _ in range(1000)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, Admission)]
    refusals = [r for r in results if isinstance(r, Refused)]
    assert len(admitted) == 50 and len(refusals) == 950
    assert {r.code for r in refusals} == {"activation_limit_reached"}
    assert sorted(a.remaining_activations for a in admitted) == list(range(50))
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.status) == (50, "exhausted")
    assert await ledger.month_activations(tenant) == 50
    assert await ledger.store.zcard(tkey(tenant, "holds")) == 50


async def test_concurrent_token_holds_never_exceed_the_limit(ledger: Ledger) -> None:
    limit = 20_000
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1000, max_tokens=limit)
    rng = random.Random(7)
    asks = [
        (new_key_id(), rng.randint(0, 200), rng.choice([-1, rng.randint(1, 300)]))
        for _ in range(1000)
    ]
    results = await asyncio.gather(
        *(
            reserve(ledger, tenant, key, rid, input_tokens=i, asked=a, default=150)
            for rid, i, a in asks
        ),
        return_exceptions=True,
    )
    holds: dict[str, int] = {}
    for (rid, inp, asked), result in zip(asks, results, strict=True):
        if isinstance(result, Admission):
            assert 1 <= result.grant <= (150 if asked < 0 else asked)
            holds[rid] = inp + result.grant
        else:
            assert isinstance(result, Refused) and result.code == "token_limit_reached", result
    assert 50 < len(holds) < 1000
    rec = await key_of(ledger, tenant, key)
    assert rec.held_tokens == sum(holds.values()) <= limit
    assert rec.used_activations == len(holds) == await ledger.month_activations(tenant)
    # What is left is too little for the remaining requests (inputs up to 200 tokens).
    assert limit - rec.held_tokens <= 200

    used = {rid: rng.randint(0, hold) for rid, hold in holds.items()}
    settled = await asyncio.gather(
        *(
            ledger.settle(
                tenant_id=tenant, key_id=key, request_id=rid, month=MONTH, tokens=n, microcents=None
            )
            for rid, n in used.items()
        )
    )
    assert all(s is not None for s in settled)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens) == (sum(used.values()), 0)
    check_invariant(rec, limit - rec.used_tokens, None)
    # The freed budget is usable again, and the answer agrees with the record.
    final = await reserve(ledger, tenant, key, input_tokens=0, asked=1)
    assert final.remaining_tokens == limit - rec.used_tokens - 1


async def test_concurrent_spend_holds_never_exceed_the_limit(ledger: Ledger) -> None:
    limit = 1_000_000  # one cent
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1000, max_microcents=limit)
    rng = random.Random(11)
    asks = [
        (new_key_id(), rng.randint(0, 5000), rng.randint(1, 30_000), rng.randint(1, 2000))
        for _ in range(600)
    ]
    results = await asyncio.gather(
        *(
            reserve(ledger, tenant, key, rid, input_mc=mc, out_nc=nc, asked=a)
            for rid, mc, nc, a in asks
        ),
        return_exceptions=True,
    )
    holds: dict[str, int] = {}
    for (rid, mc, nc, _), result in zip(asks, results, strict=True):
        if isinstance(result, Admission):
            holds[rid] = mc + math.ceil(result.grant * nc / 1000)
        else:
            assert isinstance(result, Refused) and result.code == "spend_limit_reached", result
    assert 10 < len(holds) < 600
    rec = await key_of(ledger, tenant, key)
    assert rec.held_microcents == sum(holds.values()) <= limit
    settled = await asyncio.gather(
        *(
            ledger.settle(
                tenant_id=tenant, key_id=key, request_id=rid, month=MONTH, tokens=1, microcents=None
            )
            for rid in holds
        )
    )
    assert all(s is not None for s in settled)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_microcents, rec.held_microcents) == (sum(holds.values()), 0)
    assert rec.used_microcents <= limit


# --- 6. monthly quota ---


async def test_monthly_quota_spans_keys_and_months(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger, TINY)
    k1 = await new_key(ledger, tenant, max_activations=10)
    k2 = await new_key(ledger, tenant, max_activations=10)
    await reserve(ledger, tenant, k1)
    await reserve(ledger, tenant, k2)
    await reserve(ledger, tenant, k1)
    assert await ledger.month_activations(tenant) == 3
    err = await refused(reserve(ledger, tenant, k2), "monthly_quota_reached")
    assert (err.limit, err.used) == (3, 3)
    ttl = await ledger.store.ttl(tkey(tenant, f"m:{MONTH}"))
    assert MONTH_TTL_SECONDS - 60 < ttl <= MONTH_TTL_SECONDS

    # Another month has its own counter.
    later = calendar.timegm((2099, 12, 15, 0, 0, 0))
    await reserve(ledger, tenant, k2, month=month_of(later))
    assert await ledger.month_activations(tenant, later) == 1
    assert await ledger.month_activations(tenant) == 3
    assert (await key_of(ledger, tenant, k1)).used_activations == 2
    assert (await key_of(ledger, tenant, k2)).used_activations == 2


# --- 7. plan key limit, revocation ---


async def test_create_key_respects_max_keys_and_revoke_frees_a_slot(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger, TINY)
    k1 = await new_key(ledger, tenant)
    await new_key(ledger, tenant)
    before = await snapshot(ledger, tenant)
    third = new_key_id()
    with pytest.raises(Refused) as info:
        await new_key_with_id(ledger, tenant, third)
    assert (info.value.code, info.value.limit, info.value.used) == ("max_keys_reached", 2, 2)
    assert await snapshot(ledger, tenant) == before
    assert await ledger.get_key(tenant, third) is None

    revoked = await ledger.revoke_key(tenant, k1)
    assert revoked is not None and revoked.status == "revoked"
    t = await ledger.tenant(tenant)
    assert t is not None and t.live_keys == 1
    at = await ledger.store.hget(tkey(tenant, f"k:{k1}"), "revoked_at")

    again = await ledger.revoke_key(tenant, k1)
    assert again is not None and again.status == "revoked"
    t = await ledger.tenant(tenant)
    assert t is not None and t.live_keys == 1
    assert await ledger.store.hget(tkey(tenant, f"k:{k1}"), "revoked_at") == at

    assert await ledger.revoke_key(tenant, new_key_id()) is None
    t = await ledger.tenant(tenant)
    assert t is not None and t.live_keys == 1

    await new_key_with_id(ledger, tenant, third)
    t = await ledger.tenant(tenant)
    assert t is not None and t.live_keys == 2
    assert len(await ledger.list_keys(tenant)) == 3  # the revoked key stays listed
    await refused(new_key(ledger, tenant), "max_keys_reached")


async def test_revoked_key_still_settles_its_holds(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1, max_tokens=100)
    await reserve(ledger, tenant, key, "in-flight", input_tokens=10, asked=20)
    await ledger.revoke_key(tenant, key)
    s = await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id="in-flight",
        month=MONTH,
        tokens=25,
        microcents=None,
    )
    assert s is not None
    rec = await key_of(ledger, tenant, key)
    assert (rec.status, rec.used_tokens, rec.held_tokens) == ("revoked", 25, 0)


# --- 8. refunds ---


async def test_refund_gives_the_activation_back(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1, max_tokens=1000)
    await reserve(ledger, tenant, key, "lost", input_tokens=100, asked=100)
    rec = await key_of(ledger, tenant, key)
    assert (rec.status, rec.used_activations, rec.held_tokens) == ("exhausted", 1, 200)
    assert await ledger.month_activations(tenant) == 1
    await refused(reserve(ledger, tenant, key), "activation_limit_reached")

    s = await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id="lost",
        month=MONTH,
        tokens=0,
        microcents=0,
        refund_activation=True,
    )
    assert s is not None and s.remaining_activations == 1 and s.remaining_tokens == 1000
    rec = await key_of(ledger, tenant, key)
    assert (rec.status, rec.used_activations, rec.held_tokens, rec.used_tokens) == (
        "active",
        0,
        0,
        0,
    )
    assert await ledger.month_activations(tenant) == 0
    # A resent refund gives nothing more back.
    assert (
        await ledger.settle(
            tenant_id=tenant,
            key_id=key,
            request_id="lost",
            month=MONTH,
            tokens=0,
            microcents=0,
            refund_activation=True,
        )
        is None
    )
    assert (await key_of(ledger, tenant, key)).used_activations == 0
    assert await ledger.month_activations(tenant) == 0
    await reserve(ledger, tenant, key)


# --- 9. the reaper (P12, a dead worker) ---


async def test_reaper_charges_expired_holds_once(ledger: Ledger, dedicated: bool) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_tokens=10_000, max_microcents=10_000_000)
    # Deadline now (hold_seconds=0), an hour ago, two days ago (its record must outlive
    # the deadline), and one still running that must not be touched.
    await reserve(ledger, tenant, key, "now", input_tokens=10, asked=20, hold_seconds=0)
    past = now_ms() - HOUR * 1000
    for rid, deadline in (("hour", past), ("days", now_ms() - 2 * 86_400_000)):
        args = reserve_args(
            key, rid, deadline=deadline, input=100, asked=200, input_mc=300, out_nc=4000
        )
        assert (await ledger._reserve(keys=reserve_keys(tenant, key, rid), args=args))[0] == b"ok"
    live = await reserve(
        ledger, tenant, key, "live", input_tokens=1, asked=2, input_mc=3, out_nc=1000
    )
    assert live.grant == 2
    rec = await key_of(ledger, tenant, key)
    assert rec.held_tokens == 30 + 300 + 300 + 3
    assert rec.held_microcents == 0 + 1100 + 1100 + 5

    first = await ledger.reap()
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_tokens, rec.held_tokens) == (630, 3)
    assert (rec.used_microcents, rec.held_microcents) == (2200, 5)
    assert rec.used_activations == 4  # a reaped request used its activation: no refund
    members = await ledger.store.zrange(tkey(tenant, "holds"), 0, -1)
    assert members == [f"{key}:live".encode()]
    for rid in ("now", "hour", "days"):
        assert await ledger.store.hget(tkey(tenant, f"r:{rid}"), "state") == b"settled"
    second = await ledger.reap()
    assert await key_of(ledger, tenant, key) == rec
    if dedicated:
        # On the shared Redis a Till server's own reaper may get there first.
        assert (first, second) == (3, 0)
    # The worker that held them never settles after all: a late settle is a no-op.
    late = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="hour", month=MONTH, tokens=1, microcents=1
    )
    assert late is None and await key_of(ledger, tenant, key) == rec


# --- 10. SCRIPT FLUSH (P10) ---


async def test_scripts_survive_script_flush(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1000, max_tokens=1_000_000)
    await reserve(ledger, tenant, key)
    await ledger.store.script_flush()
    assert await ledger.store.script_exists(ledger._reserve.sha) == [False]
    await reserve(ledger, tenant, key, "after-flush")
    assert await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id="after-flush",
        month=MONTH,
        tokens=1,
        microcents=None,
    )

    # Flushes in the middle of a load: no request fails.
    async def flusher() -> None:
        for _ in range(5):
            await asyncio.sleep(0.005)
            await ledger.store.script_flush()

    results = await asyncio.gather(flusher(), *(reserve(ledger, tenant, key) for _ in range(300)))
    assert all(isinstance(r, Admission) for r in results[1:])
    assert (await key_of(ledger, tenant, key)).used_activations == 302


# --- 11. Redis killed and restarted (P12, AOF) ---


async def test_counters_survive_redis_kill_with_aof() -> None:
    directory = short_tmpdir("till-ledger-aof-")
    server = start_redis(directory, None, "--appendfsync", "always")
    ledger = Ledger(connect(server.url, timeout=2.0, max_connections=8))
    try:
        tenant = await new_tenant(ledger)
        key = await new_key(
            ledger, tenant, max_activations=10, max_tokens=10_000, max_microcents=10**7
        )
        for i in range(4):
            await reserve(
                ledger, tenant, key, f"r{i}", input_tokens=100, asked=50, input_mc=10, out_nc=1000
            )
        for i in range(2):
            await ledger.settle(
                tenant_id=tenant,
                key_id=key,
                request_id=f"r{i}",
                month=MONTH,
                tokens=77,
                microcents=66,
            )
        before = await snapshot(ledger, tenant)
        record = await key_of(ledger, tenant, key)
        assert (record.used_activations, record.used_tokens, record.held_tokens) == (4, 154, 300)

        server.proc.kill()
        server.proc.wait(5)
        server = start_redis(directory, server.port, "--appendfsync", "always")

        # The same client: it reconnects, and reloads its scripts (the cache died with Redis).
        assert await key_of(ledger, tenant, key) == record
        assert await snapshot(ledger, tenant) == before
        assert await ledger.month_activations(tenant) == 4
        assert tenant in await ledger.tenant_ids()
        await reserve(
            ledger, tenant, key, "r4", input_tokens=100, asked=50, input_mc=10, out_nc=1000
        )
        assert await ledger.settle(
            tenant_id=tenant, key_id=key, request_id="r2", month=MONTH, tokens=1, microcents=1
        )
        # Settled requests stay settled.
        assert (
            await ledger.settle(
                tenant_id=tenant, key_id=key, request_id="r0", month=MONTH, tokens=1, microcents=1
            )
            is None
        )
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_activations, rec.used_tokens, rec.held_tokens) == (5, 155, 300)
    finally:
        await ledger.close()
        stop_process(server.proc)
        shutil.rmtree(directory, ignore_errors=True)


# --- 12. store unreachable ---


async def test_unreachable_store_raises_store_unavailable() -> None:
    ledger = Ledger(connect(f"redis://127.0.0.1:{free_port()}/0", timeout=2.0, max_connections=64))
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: reserve(ledger, "a" * 16, "b" * 16),
            lambda: ledger.settle(
                tenant_id="a" * 16,
                key_id="b" * 16,
                request_id="c",
                month=MONTH,
                tokens=1,
                microcents=1,
            ),
            lambda: ledger.get_key("a" * 16, "b" * 16),
            ledger.ping,
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - start < 5
    finally:
        await ledger.close()


async def test_silent_store_times_out_as_store_unavailable() -> None:
    """A store that accepts connections and never answers fails closed in about 2 timeouts."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(100)
        port = listener.getsockname()[1]
        ledger = Ledger(connect(f"redis://127.0.0.1:{port}/0", timeout=0.3, max_connections=4))
        try:
            for call in (
                lambda: reserve(ledger, "a" * 16, "b" * 16),
                lambda: ledger.get_key("a" * 16, "b" * 16),
            ):
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await call()
                assert time.monotonic() - start < 3
        finally:
            await ledger.close()


# --- 13. nothing secret in the store ---


async def test_no_secret_in_the_store(ledger: Ledger) -> None:
    record, admin_key = await ledger.create_tenant("acme", "ops@example.com", PRO)
    tenant = record.id
    second = await ledger.add_admin_key(tenant)
    for _ in range(3):
        key = await new_key(ledger, tenant, max_tokens=100)
        await reserve(ledger, tenant, key, input_tokens=1, asked=1)
    assert await ledger.authenticate_admin(admin_key) == tenant
    assert await ledger.authenticate_admin(second) == tenant
    assert (
        await ledger.authenticate_admin(admin_key[:-1] + ("A" if admin_key[-1] != "A" else "B"))
        is None
    )

    blobs: list[bytes] = []
    for name, (_, _, value) in (await snapshot(ledger, tenant)).items():
        blobs.append(name)
        blobs.append(repr(value).encode())
    blobs.append(repr(await ledger.store.smembers(TENANTS_SET)).encode())
    text = b"\n".join(blobs).decode()
    for secret in (
        admin_key,
        second,
        admin_key.rpartition(".")[2],
        second.rpartition(".")[2],
        UPSTREAM_KEY,
    ):
        assert secret not in text
    assert not SECRET_PATTERN.search(text)
