"""Till on a real Redis Cluster: three primaries of Debian's redis-server (tests/cluster.py).

Every key of a tenant carries the hash tag ``{t:<tenant>}``, so a tenant lives on one node and
each script touches one slot. Tests create tenants until every node holds some, and check the
node itself (a plain connection to it) rather than trusting the cluster client.

- the ledger on the cluster: exact limits under concurrency on every node at once, holds within
  limits, idempotent reserve and settle, refusals that write nothing anywhere, the reaper across
  nodes, scripts reloaded per node after ``SCRIPT FLUSH``, and no CROSSSLOT on any node;
- ``till serve`` on the cluster: CLI, admin API and the openai SDK end to end, and an exact
  limit across two workers;
- a node killed mid-load: its tenants fail closed (503, nothing forwarded), the other tenants
  keep being served, and the ledger still reaps and reloads scripts on the surviving nodes.

The generic budget suite (tests/server/test_ledger.py) runs on the same cluster as well.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.crc import key_slot

from tests.cluster import Cluster, redis_cluster_fixture, start_cluster  # noqa: F401
from tests.conftest import (
    UPSTREAM_KEY,
    Mock,
    Till,
    assert_no_secrets,
    fire_chats,
    short_tmpdir,
    start_till,
    till_env,
)
from tests.server.test_ledger import (
    HOUR,
    MONTH,
    PRO,
    TINY,
    key_of,
    new_key,
    new_tenant,
    refused,
    reserve,
)
from till.server.ledger import (
    Admission,
    Ledger,
    Refused,
    StoreUnavailable,
    admin_key_tenant,
    connect,
    tkey,
)
from till.server.plans import Plan
from till.tokens import Keyring, new_key_id

MESSAGES = [{"role": "user", "content": "Hello there"}]
# node port -> that node's record of the cluster: {key: (dump, has_ttl)}
ClusterSnapshot = dict[int, dict[bytes, tuple[bytes, bool]]]


# --- fixtures and helpers ---


@pytest.fixture
async def ledger(redis_cluster: Cluster) -> AsyncIterator[Ledger]:
    led = Ledger(connect(redis_cluster.url, timeout=2.0, max_connections=64))
    yield led
    await led.close()


@pytest.fixture
async def nodes(redis_cluster: Cluster) -> AsyncIterator[dict[int, aioredis.Redis]]:
    """A plain (non-cluster) client per node: to look at what each node itself holds."""
    clients = {port: aioredis.Redis(host="127.0.0.1", port=port) for port in redis_cluster.ports}
    yield clients
    for client in clients.values():
        await client.aclose()


async def spread_tenants(
    ledger: Ledger, cluster: Cluster, per_node: int = 1, plan: Plan = PRO
) -> dict[int, list[str]]:
    """Tenants until every node holds ``per_node`` of them: {node port: [tenant ids]}."""
    placed: dict[int, list[str]] = {port: [] for port in cluster.ports}
    for _ in range(60 * per_node):
        if all(len(ids) >= per_node for ids in placed.values()):
            return placed
        record, _ = await ledger.create_tenant("acme", "ops@example.com", plan)
        port = cluster.port_of_key(tkey(record.id, "tenant"))
        if len(placed[port]) < per_node:
            placed[port].append(record.id)
    raise AssertionError(f"tenants did not spread over every node: {placed}")


def one_per_node(placed: dict[int, list[str]]) -> list[tuple[int, str]]:
    return [(port, ids[0]) for port, ids in placed.items()]


async def tenant_keys(nodes: dict[int, aioredis.Redis], tenant: str) -> dict[int, set[bytes]]:
    """The tenant's keys as each node lists them (SCAN on the node itself)."""
    out: dict[int, set[bytes]] = {}
    for port, r in nodes.items():
        out[port] = {k async for k in r.scan_iter(match=f"till:{{t:{tenant}}}:*", count=1000)}
    return out


async def cluster_snapshot(nodes: dict[int, aioredis.Redis]) -> ClusterSnapshot:
    """Every key on every node, dumped whole, and whether it expires."""
    out: ClusterSnapshot = {}
    for port, r in nodes.items():
        keys = [k async for k in r.scan_iter(count=1000)]
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.dump(k)
            pipe.pttl(k)
        replies = await pipe.execute()
        out[port] = {
            k: (dump, pttl > 0)
            for k, dump, pttl in zip(keys, replies[::2], replies[1::2], strict=True)
        }
    assert any(out.values()), "an empty cluster: the snapshot would prove nothing"
    return out


async def settle(ledger: Ledger, tenant: str, key: str, rid: str, **kw: Any) -> Any:
    return await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id=rid,
        month=MONTH,
        tokens=kw.get("tokens"),
        microcents=kw.get("microcents"),
    )


# --- 1. placement: the hash tag keeps a tenant on one node, and tenants use every node ---


async def test_each_tenant_lives_on_one_node_and_tenants_use_every_node(
    ledger: Ledger, redis_cluster: Cluster, nodes: dict[int, aioredis.Redis]
) -> None:
    placed = await spread_tenants(ledger, redis_cluster, per_node=2)
    for port, tenants in placed.items():
        for tenant in tenants:
            key = await new_key(ledger, tenant, max_tokens=1000)
            await reserve(ledger, tenant, key, "r1")
            await ledger.add_admin_key(tenant)
            found = await tenant_keys(nodes, tenant)
            expected = {
                tkey(tenant, suffix).encode()
                for suffix in (
                    "tenant",
                    "admins",
                    "keys",
                    f"k:{key}",
                    f"m:{MONTH}",
                    "r:r1",
                    "holds",
                )
            }
            assert found[port] == expected, (port, found)
            assert not any(keys for other, keys in found.items() if other != port)
            assert {key_slot(k) for k in found[port]} == {key_slot(tkey(tenant, "x").encode())}
    listed = set(await ledger.tenant_ids())
    assert {t for ids in placed.values() for t in ids} <= listed


# --- 2. concurrency: exact on every node at once ---


async def test_concurrent_reserves_on_every_node_admit_exactly_the_limit(
    ledger: Ledger, redis_cluster: Cluster
) -> None:
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys = {tenant: await new_key(ledger, tenant, max_activations=50) for _, tenant in tenants}
    # 3 x 1,000 reserves in flight together: every node serves its tenant's burst at once.
    calls = [(tenant, key) for tenant, key in keys.items() for _ in range(1000)]
    random.Random(3).shuffle(calls)
    results = await asyncio.gather(
        *(reserve(ledger, tenant, key) for tenant, key in calls), return_exceptions=True
    )
    by_tenant: dict[str, list[object]] = {tenant: [] for tenant in keys}
    for (tenant, _), result in zip(calls, results, strict=True):
        by_tenant[tenant].append(result)
    for tenant, key in keys.items():
        got = by_tenant[tenant]
        admitted = [r for r in got if isinstance(r, Admission)]
        refusals = [r for r in got if isinstance(r, Refused)]
        assert (len(admitted), len(refusals)) == (50, 950), Counter(type(r).__name__ for r in got)
        assert {r.code for r in refusals} == {"activation_limit_reached"}
        assert sorted(a.remaining_activations for a in admitted) == list(range(50))
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_activations, rec.status) == (50, "exhausted")
        assert await ledger.month_activations(tenant) == 50
        assert await ledger.store.zcard(tkey(tenant, "holds")) == 50


async def test_concurrent_token_and_spend_holds_never_exceed_the_limits(
    ledger: Ledger, redis_cluster: Cluster
) -> None:
    tok_limit, mc_limit = 20_000, 1_000_000
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys = {
        tenant: await new_key(
            ledger, tenant, max_activations=1000, max_tokens=tok_limit, max_microcents=mc_limit
        )
        for _, tenant in tenants
    }
    rng = random.Random(5)
    asks = [
        (tenant, new_key_id(), rng.randint(0, 200), rng.choice([-1, rng.randint(1, 300)]),
         rng.randint(0, 3000), rng.randint(1, 20_000))
        for tenant in keys
        for _ in range(500)
    ]  # fmt: skip
    rng.shuffle(asks)
    results = await asyncio.gather(
        *(
            reserve(ledger, t, keys[t], rid, input_tokens=i, asked=a, default=150, input_mc=mc,
                    out_nc=nc)
            for t, rid, i, a, mc, nc in asks
        ),
        return_exceptions=True,
    )  # fmt: skip
    holds: dict[str, dict[str, tuple[int, int]]] = {tenant: {} for tenant in keys}
    for (tenant, rid, inp, asked, mc, nc), result in zip(asks, results, strict=True):
        if isinstance(result, Admission):
            assert 1 <= result.grant <= (150 if asked < 0 else asked)
            holds[tenant][rid] = (inp + result.grant, mc + math.ceil(result.grant * nc / 1000))
        else:
            assert isinstance(result, Refused), result
            assert result.code in ("token_limit_reached", "spend_limit_reached"), result
    for tenant, key in keys.items():
        assert 10 < len(holds[tenant]) < 500
        rec = await key_of(ledger, tenant, key)
        assert rec.held_tokens == sum(h[0] for h in holds[tenant].values()) <= tok_limit
        assert rec.held_microcents == sum(h[1] for h in holds[tenant].values()) <= mc_limit
        assert rec.used_activations == len(holds[tenant]) == await ledger.month_activations(tenant)

    # Settle everything at once, on every node: usage up to the hold, or the hold itself.
    used = {
        (tenant, rid): (rng.randint(0, tok), rng.choice([None, rng.randint(0, mc)]))
        for tenant, rids in holds.items()
        for rid, (tok, mc) in rids.items()
    }
    settled = await asyncio.gather(
        *(
            settle(ledger, tenant, keys[tenant], rid, tokens=tok, microcents=mc)
            for (tenant, rid), (tok, mc) in used.items()
        )
    )
    assert all(s is not None for s in settled)
    for tenant, key in keys.items():
        rec = await key_of(ledger, tenant, key)
        want_tok = sum(tok for (t, _), (tok, _) in used.items() if t == tenant)
        want_mc = sum(
            holds[t][rid][1] if mc is None else mc
            for (t, rid), (_, mc) in used.items()
            if t == tenant
        )
        assert (rec.used_tokens, rec.held_tokens) == (want_tok, 0)
        assert (rec.used_microcents, rec.held_microcents) == (want_mc, 0)
        # What is left is usable again, and the answer agrees with the record.
        final = await reserve(ledger, tenant, key, input_tokens=0, asked=1, input_mc=0, out_nc=0)
        assert final.remaining_tokens == tok_limit - want_tok - 1
        assert final.remaining_microcents == mc_limit - want_mc


async def test_a_fresh_client_serves_a_burst_at_once(
    ledger: Ledger, redis_cluster: Cluster
) -> None:
    """A worker's first requests arrive together, before its client knows the topology."""
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys = {tenant: await new_key(ledger, tenant, max_activations=10**6) for _, tenant in tenants}
    for _ in range(6):
        fresh = Ledger(connect(redis_cluster.url, timeout=2.0, max_connections=64))
        try:
            results = await asyncio.gather(
                *(reserve(fresh, t, k) for t, k in keys.items() for _ in range(100)),
                return_exceptions=True,
            )
        finally:
            await fresh.close()
        assert Counter(type(r).__name__ for r in results) == {"Admission": 300}
    for tenant, key in keys.items():
        assert (await key_of(ledger, tenant, key)).used_activations == 600


# --- 3. idempotency, and request ids scoped to their tenant ---


async def test_replayed_reserves_and_settles_change_nothing(
    ledger: Ledger, redis_cluster: Cluster, nodes: dict[int, aioredis.Redis]
) -> None:
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys = {
        tenant: await new_key(ledger, tenant, max_activations=5, max_tokens=1000)
        for _, tenant in tenants
    }
    # The same request id in three tenants: three reservations, one per tenant.
    first = {
        tenant: await reserve(ledger, tenant, key, "dup", input_tokens=100, asked=200)
        for tenant, key in keys.items()
    }
    replays = await asyncio.gather(
        *(
            reserve(ledger, tenant, key, "dup", input_tokens=100, asked=200)
            for tenant, key in keys.items()
            for _ in range(20)
        )
    )
    assert replays == [first[tenant] for tenant in keys for _ in range(20)]
    for tenant, key in keys.items():
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_activations, rec.held_tokens) == (1, 300)

    done = await asyncio.gather(
        *(settle(ledger, tenant, key, "dup", tokens=120) for tenant, key in keys.items())
    )
    assert all(d is not None for d in done)
    before = await cluster_snapshot(nodes)
    again = await asyncio.gather(
        *(
            settle(ledger, tenant, key, "dup", tokens=999)
            for tenant, key in keys.items()
            for _ in range(20)
        )
    )
    assert again == [None] * len(again)
    resent = await asyncio.gather(*(reserve(ledger, t, k, "dup") for t, k in keys.items()))
    assert resent == [first[tenant] for tenant in keys]
    assert await cluster_snapshot(nodes) == before
    for tenant, key in keys.items():
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_tokens, rec.held_tokens, rec.used_activations) == (120, 0, 1)


# --- 4. refusals write nothing, on any node ---


async def test_refusals_write_nothing_on_any_node(
    ledger: Ledger, redis_cluster: Cluster, nodes: dict[int, aioredis.Redis]
) -> None:
    (_, a), (_, b), (_, c) = one_per_node(await spread_tenants(ledger, redis_cluster))
    tiny = await new_tenant(ledger, TINY)

    spent = await new_key(ledger, a, max_activations=1)
    await reserve(ledger, a, spent)
    tokens = await new_key(ledger, b, max_tokens=100)
    await reserve(ledger, b, tokens, "t1", input_tokens=50, asked=50)
    cents = await new_key(ledger, c, max_microcents=1000)
    await reserve(ledger, c, cents, "m1", input_mc=100, out_nc=10)
    await settle(ledger, c, cents, "m1", tokens=1, microcents=1000)
    priced = await new_key(ledger, c, max_microcents=1000)
    revoked = await new_key(ledger, a)
    await ledger.revoke_key(a, revoked)
    monthly = await new_key(ledger, tiny, max_activations=10)
    for _ in range(3):
        await reserve(ledger, tiny, monthly)
    await new_key(ledger, tiny)  # TINY allows two live keys: both in use now
    off = await new_tenant(ledger)
    suspended = await new_key(ledger, off)
    await ledger.store.hset(tkey(off, "tenant"), "status", "suspended")

    before = await cluster_snapshot(nodes)
    await refused(reserve(ledger, a, spent), "activation_limit_reached")
    await refused(reserve(ledger, b, tokens, input_tokens=0, asked=1), "token_limit_reached")
    await refused(reserve(ledger, c, cents, input_mc=0), "spend_limit_reached")
    await refused(reserve(ledger, c, priced, input_mc=-1, out_nc=-1), "unknown_model_price")
    await refused(reserve(ledger, a, revoked), "key_revoked")
    await refused(reserve(ledger, a, new_key_id()), "invalid_api_key")
    await refused(reserve(ledger, tiny, monthly), "monthly_quota_reached")
    await refused(reserve(ledger, off, suspended), "tenant_suspended")
    await refused(new_key(ledger, off), "tenant_suspended")
    await refused(new_key(ledger, tiny), "max_keys_reached")
    assert await cluster_snapshot(nodes) == before


# --- 5. the reaper walks the tenants of every node ---


async def test_reaper_charges_expired_holds_on_every_node(
    ledger: Ledger, redis_cluster: Cluster
) -> None:
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys: dict[str, str] = {}
    for _, tenant in tenants:
        key = keys[tenant] = await new_key(ledger, tenant, max_tokens=10_000)
        for rid in ("gone-1", "gone-2"):
            await reserve(ledger, tenant, key, rid, input_tokens=10, asked=20, hold_seconds=0)
        await reserve(ledger, tenant, key, "live", input_tokens=1, asked=2, hold_seconds=HOUR)
    assert {t for _, t in tenants} <= set(await ledger.tenant_ids())

    # No Till server runs on the shared cluster between tests: these are the only expired holds.
    assert await ledger.reap() == 2 * len(tenants)
    assert await ledger.reap() == 0
    for _, tenant in tenants:
        rec = await key_of(ledger, tenant, keys[tenant])
        assert (rec.used_tokens, rec.held_tokens, rec.used_activations) == (60, 3, 3)
        members = await ledger.store.zrange(tkey(tenant, "holds"), 0, -1)
        assert members == [f"{keys[tenant]}:live".encode()]


# --- 6. SCRIPT FLUSH on every node: each node gets the script back on its own ---


async def test_scripts_come_back_on_every_node_after_script_flush(
    ledger: Ledger, redis_cluster: Cluster, nodes: dict[int, aioredis.Redis]
) -> None:
    tenants = one_per_node(await spread_tenants(ledger, redis_cluster))
    keys = {
        t: await new_key(ledger, t, max_activations=10_000, max_tokens=10**9) for _, t in tenants
    }
    for tenant, key in keys.items():
        await reserve(ledger, tenant, key)
    for r in nodes.values():
        await r.script_flush()
    for r in nodes.values():
        assert await r.script_exists(ledger._reserve.sha) == [False]
    for tenant, key in keys.items():
        await reserve(ledger, tenant, key, "after-flush")
        assert await settle(ledger, tenant, key, "after-flush", tokens=1)
    # Each node reloaded the scripts its tenants ran, without a SCRIPT LOAD to all of them.
    for r in nodes.values():
        assert await r.script_exists(ledger._reserve.sha, ledger._settle.sha) == [True, True]

    # Flushes on random nodes in the middle of a load: no request fails.
    async def flusher() -> None:
        rng = random.Random(9)
        for _ in range(10):
            await asyncio.sleep(0.005)
            await rng.choice(list(nodes.values())).script_flush()

    calls = [reserve(ledger, t, k) for t, k in keys.items() for _ in range(200)]
    results = await asyncio.gather(flusher(), *calls)
    assert all(isinstance(r, Admission) for r in results[1:])
    for tenant, key in keys.items():
        assert (await key_of(ledger, tenant, key)).used_activations == 202


# --- 7. no CROSSSLOT anywhere ---


async def errorstats(nodes: dict[int, aioredis.Redis]) -> dict[int, dict[str, Any]]:
    return {port: await r.info("errorstats") for port, r in nodes.items()}


async def test_no_crossslot_on_any_node(
    ledger: Ledger, redis_cluster: Cluster, nodes: dict[int, aioredis.Redis]
) -> None:
    # The check can see one: a script over keys of two tenants is refused by the node.
    (_, x), (_, y), _ = one_per_node(await spread_tenants(ledger, redis_cluster))
    probe = nodes[redis_cluster.ports[0]]
    with pytest.raises(rexc.ResponseError, match="same slot"):
        await probe.eval("return 1", 2, tkey(x, "k:a"), tkey(y, "k:a"))
    assert "errorstat_CROSSSLOT" in (await errorstats(nodes))[redis_cluster.ports[0]]
    for r in nodes.values():
        await r.config_resetstat()

    # Every ledger operation, for tenants on every node.
    for port, tenant in one_per_node(await spread_tenants(ledger, redis_cluster)):
        second_admin = await ledger.add_admin_key(tenant)
        assert await ledger.authenticate_admin(second_admin) == tenant
        assert await ledger.tenant(tenant) is not None
        key = await new_key(ledger, tenant, max_tokens=10_000, max_microcents=10**7)
        other = await new_key(ledger, tenant)
        assert len(await ledger.list_keys(tenant)) == await ledger.key_count(tenant) == 2
        await reserve(ledger, tenant, key, "a", input_mc=5, out_nc=100)
        await reserve(ledger, tenant, key, "b", hold_seconds=0)
        assert await settle(ledger, tenant, key, "a", tokens=5, microcents=5)
        await ledger.settle(
            tenant_id=tenant, key_id=key, request_id="c", month=MONTH, tokens=0,
            microcents=0, refund_activation=True,
        )  # fmt: skip
        assert await ledger.revoke_key(tenant, other) is not None
        assert await ledger.get_key(tenant, other) is not None
        assert await ledger.month_activations(tenant) == 2
        found = await tenant_keys(nodes, tenant)
        assert {key_slot(k) for keys in found.values() for k in keys} == {
            key_slot(tkey(tenant, "").encode())
        }, port
    assert await ledger.reap() >= 3
    await ledger.ping()
    for port, stats in (await errorstats(nodes)).items():
        assert not any("CROSSSLOT" in name for name in stats), (port, stats)


# --- 8. `till serve` on the cluster ---


def cluster_env(cluster: Cluster, mock: Mock, data_dir: Path, **extra: str) -> dict[str, str]:
    return till_env(
        data_dir,
        mock.url,
        cluster.url,
        TILL_SECRET_KEYS=Keyring.generate("c1").format(),
        **extra,
    )


@pytest.fixture
def till_dir() -> Iterator[Path]:
    directory = short_tmpdir("till-cluster-data-")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def stop_and_check(server: Till) -> None:
    server.stop()
    assert_no_secrets(server.log)
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def create_key(admin: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"provider": "openai", "upstream_key": UPSTREAM_KEY, "max_activations": 100, **fields}
    resp = admin.post("/admin/keys", json=body)
    assert resp.status_code == 201, resp.text
    key: dict[str, Any] = resp.json()["key"]
    return key


def test_till_serve_on_the_cluster(
    redis_cluster: Cluster, mock_upstream: Mock, log_dir: Path, till_dir: Path
) -> None:
    server = start_till(
        cluster_env(redis_cluster, mock_upstream, till_dir), log_dir / "till-cluster.log"
    )
    try:
        admin_key = server.new_tenant("cluster-co")  # the CLI, straight to the cluster
        tenant = admin_key_tenant(admin_key)
        assert tenant is not None
        listed = server.cli("tenant", "list").stdout
        assert tenant in listed
        with server.admin(admin_key) as admin:
            key = create_key(admin, max_activations=3, name="three")
            mock_upstream.reset()
            with openai.OpenAI(
                api_key=key["scopedKey"], base_url=f"{server.url}/v1", max_retries=0
            ) as oa:
                for _ in range(3):
                    done = oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                    assert done.choices[0].message.content
                with pytest.raises(openai.APIStatusError) as caught:
                    oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert caught.value.status_code == 402
            assert caught.value.code == "activation_limit_reached"
            assert len(mock_upstream.requests()) == 3  # the fourth never left Till

            keys = admin.get("/admin/keys").json()["keys"]
            assert [k["id"] for k in keys] == [key["id"]]
            after = keys[0]
            assert (after["usedActivations"], after["status"]) == (3, "exhausted")
            assert after["usedTokens"] == mock_upstream.totals()["total_tokens"] > 0
            assert after["heldTokens"] == 0 and after["scopedKey"] is None

            second = create_key(admin, max_activations=5)
            account = admin.get("/admin/account").json()["account"]
            assert (account["keysUsed"], account["activationsUsedThisMonth"]) == (2, 3)
            revoked = admin.delete(f"/admin/keys/{second['id']}")
            assert revoked.status_code == 200 and revoked.json()["key"]["status"] == "revoked"
            resp = httpx.post(
                f"{server.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {second['scopedKey']}"},
                json={"model": "gpt-4o", "messages": MESSAGES},
            )
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "key_revoked"
            account = admin.get("/admin/account").json()["account"]
            assert (account["keysUsed"], account["activationsUsedThisMonth"]) == (1, 3)
            assert len(mock_upstream.requests()) == 3
    finally:
        stop_and_check(server)


def test_limit_is_exact_across_two_workers_on_the_cluster(
    redis_cluster: Cluster, mock_upstream: Mock, log_dir: Path, till_dir: Path
) -> None:
    server = start_till(
        cluster_env(redis_cluster, mock_upstream, till_dir),
        log_dir / "till-cluster-workers.log",
        "--workers",
        "2",
    )
    try:
        admin_key = server.new_tenant("workers-co")
        with server.admin(admin_key) as admin:
            key = create_key(admin, max_activations=20)
        token = key["scopedKey"]
        mock_upstream.reset()

        statuses = fire_chats(server.url, token, 200)
        assert Counter(statuses) == {200: 20, 402: 180}
        assert len(mock_upstream.requests()) == 20
        with server.admin(admin_key) as admin:
            after = admin.get(f"/admin/keys/{key['id']}").json()["key"]
        assert (after["usedActivations"], after["status"]) == (20, "exhausted")
    finally:
        stop_and_check(server)


# --- 9. a node killed while requests run ---


@pytest.fixture
def doomed_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: it loses a node."""
    directory = short_tmpdir("till-cluster-doomed-")
    cluster = start_cluster(directory)
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


async def wait_marked_failed(cluster: Cluster, victim: int) -> None:
    """Until every other node flags ``victim`` as failed (FAIL, not just PFAIL)."""
    deadline = time.monotonic() + 10
    for port in cluster.ports:
        if port == victim:
            continue
        r = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            while True:
                flags = (await r.cluster("NODES"))[f"127.0.0.1:{victim}"]["flags"]
                if "fail" in flags.split(","):
                    break
                assert time.monotonic() < deadline, f"{port} never marked {victim} failed"
                await asyncio.sleep(0.05)
        finally:
            await r.aclose()


async def admin_keys_on_every_node(cluster: Cluster) -> dict[int, str]:
    """One tenant per node, made through the ledger (the CLI cannot pick a node)."""
    placed: dict[int, str] = {}
    ledger = Ledger(connect(cluster.url, timeout=2.0, max_connections=8))
    try:
        for _ in range(60):
            if len(placed) == len(cluster.ports):
                return placed
            record, admin_key = await ledger.create_tenant("acme", "ops@example.com", PRO)
            placed.setdefault(cluster.port_of_key(tkey(record.id, "tenant")), admin_key)
    finally:
        await ledger.close()
    raise AssertionError(f"tenants did not spread over every node: {placed}")


def test_killed_node_fails_closed_for_its_tenants_only(
    doomed_cluster: Cluster, mock_upstream: Mock, log_dir: Path, till_dir: Path
) -> None:
    cluster = doomed_cluster
    server = start_till(
        cluster_env(cluster, mock_upstream, till_dir, TILL_REDIS_TIMEOUT="1"),
        log_dir / "till-cluster-kill.log",
    )
    try:
        admins = asyncio.run(admin_keys_on_every_node(cluster))
        tokens: dict[int, str] = {}
        key_ids: dict[int, str] = {}
        for port, admin_key in admins.items():
            with server.admin(admin_key) as admin:
                key = create_key(admin, max_activations=100_000)
            tokens[port], key_ids[port] = key["scopedKey"], key["id"]
        # The seed node of TILL_REDIS_URL dies: the client must find the others by itself.
        victim = cluster.nodes[0].port
        mock_upstream.reset()

        # (node port, sent at, answered at, status, retry-after, error code)
        Result = tuple[int, float, float, int, str | None, str | None]

        async def load() -> tuple[list[Result], float]:
            results: list[Result] = []
            stop = asyncio.Event()
            async with httpx.AsyncClient(timeout=30) as http:

                async def worker(port: int) -> None:
                    while not stop.is_set():
                        sent = time.monotonic()
                        resp = await http.post(
                            f"{server.url}/v1/chat/completions",
                            headers={"authorization": f"Bearer {tokens[port]}"},
                            json={"model": "gpt-4o",
                                  "messages": [{"role": "user", "content": f"node {port}"}]},
                        )  # fmt: skip
                        code = resp.json().get("error", {}).get("code") if resp.is_error else None
                        results.append((port, sent, time.monotonic(), resp.status_code,
                                        resp.headers.get("retry-after"), code))  # fmt: skip

                workers = [asyncio.create_task(worker(p)) for p in tokens for _ in range(3)]
                await asyncio.sleep(1.0)
                killed_at = time.monotonic()
                cluster.kill(victim)
                # Until the survivors have marked the node failed, and a while after.
                await wait_marked_failed(cluster, victim)
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*workers)
            return results, killed_at

        results, killed_at = asyncio.run(load())
        statuses = Counter(r[3] for r in results)
        assert set(statuses) <= {200, 503}, statuses  # no 500, nothing else
        for port in tokens:
            mine = [r for r in results if r[0] == port]
            # Answered before the kill, and sent after it (a request in flight may go either way).
            before = [r[3] for r in mine if r[2] < killed_at]
            after = [r for r in mine if r[1] > killed_at]
            assert len(before) > 10 and len(after) > 10, (port, len(before), len(after))
            assert set(before) == {200}, (port, Counter(before))
            if port == victim:
                assert {r[3] for r in after} == {503}, Counter(r[3] for r in after)
                assert all(r[4] is not None and r[4].isdigit() for r in after)
                assert {r[5] for r in after} == {"store_unavailable"}
            else:
                # The survivors' tenants never see the failure, not even while it is detected.
                assert {r[3] for r in mine} == {200}, (port, Counter(r[3] for r in mine))
        # Exactly the admitted requests reached the upstream: no 503 was forwarded.
        forwarded = Counter(
            r["body"]["messages"][0]["content"]  # type: ignore[index, call-overload]
            for r in mock_upstream.requests()
        )
        for port in tokens:
            ok = sum(1 for r in results if r[0] == port and r[3] == 200)
            assert forwarded[f"node {port}"] == ok, (port, forwarded, ok)

        # The admin API: the survivors' tenants are served, the dead node's get a 503.
        for port, admin_key in admins.items():
            with server.admin(admin_key) as admin:
                resp = admin.get(f"/admin/keys/{key_ids[port]}")
            if port == victim:
                assert resp.status_code == 503 and resp.headers["retry-after"].isdigit()
            else:
                assert resp.status_code == 200
                used = resp.json()["key"]["usedActivations"]
                assert used == sum(1 for r in results if r[0] == port and r[3] == 200)
        # Readiness asks the node of its probe's slot only: one dead node does not take every
        # worker out of rotation (its own tenants get 503s meanwhile, above).
        ready = httpx.get(f"{server.url}/readyz")
        probe_node = cluster.port_of_key("{t:ready}:k:probe")
        assert ready.status_code == (503 if probe_node == victim else 200), ready.text
    finally:
        stop_and_check(server)


def test_ledger_with_a_node_down_still_serves_reaps_and_reloads_on_the_others(
    doomed_cluster: Cluster,
) -> None:
    # On the event loop `till serve` runs on: the ways a dropped connection fails differ.
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with the server extra
        asyncio.run(node_down(doomed_cluster))
    else:
        uvloop.run(node_down(doomed_cluster))


async def node_down(cluster: Cluster) -> None:
    ledger = Ledger(connect(cluster.url, timeout=2.0, max_connections=64))
    try:
        tenants = one_per_node(await spread_tenants(ledger, cluster))
        keys: dict[str, str] = {}
        for _, tenant in tenants:
            key = keys[tenant] = await new_key(ledger, tenant, max_tokens=10_000)
            await reserve(ledger, tenant, key, "gone", input_tokens=10, asked=20, hold_seconds=0)
        # A node that holds neither the tenants set nor the seed: the walk itself still works.
        victim = next(
            port
            for port in reversed(cluster.ports)
            if port not in (cluster.port_of_key("till:tenants"), cluster.nodes[0].port)
        )
        alive = [(port, t) for port, t in tenants if port != victim]
        dead = next(t for port, t in tenants if port == victim)

        # Killed under load: the dead node's calls fail as StoreUnavailable and nothing else,
        # and the others' calls do not fail at all. (The client closes the dead node's idle
        # connections as other calls take them: AttributeError or RuntimeError, some runs.)
        load_keys = {t: await new_key(ledger, t, max_activations=10**9) for _, t in tenants}
        outcomes: dict[str, list[tuple[float, str]]] = {t: [] for _, t in tenants}
        stop = asyncio.Event()

        async def worker(tenant: str) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    await reserve(ledger, tenant, load_keys[tenant])
                    outcomes[tenant].append((sent, "ok"))
                except Exception as exc:
                    outcomes[tenant].append((sent, type(exc).__name__))

        workers = [asyncio.create_task(worker(t)) for _, t in tenants for _ in range(20)]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        cluster.kill(victim)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        for tenant, got in outcomes.items():
            after = Counter(kind for sent, kind in got if sent > killed_at)
            if tenant == dead:
                assert set(after) == {"StoreUnavailable"}, after
                assert {kind for _, kind in got} <= {"ok", "StoreUnavailable"}
            else:
                assert {kind for _, kind in got} == {"ok"} and after["ok"] > 10, Counter(got)

        # The survivors lose their script caches (a restart, a failover): scripts come back by
        # EVAL on each node. SCRIPT LOAD to every primary would fail on the dead one.
        for port, _ in alive:
            r = aioredis.Redis(host="127.0.0.1", port=port)
            await r.script_flush()
            await r.aclose()
        for _, tenant in alive:
            await reserve(ledger, tenant, keys[tenant], "after-kill")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await reserve(ledger, dead, keys[dead])
        assert time.monotonic() - started < 2

        # The reaper charges the survivors' expired holds and leaves the dead node's for later.
        assert await ledger.reap() == len(alive)
        for _, tenant in alive:
            rec = await key_of(ledger, tenant, keys[tenant])
            assert (rec.used_tokens, rec.used_activations) == (30, 2)

    finally:
        await ledger.close()
    # Every socket is closed, though the client was waiting to re-read the topology.
    store: Any = ledger.store
    nodes_left = [
        *store.nodes_manager.nodes_cache.values(),
        *store.nodes_manager.startup_nodes.values(),
    ]
    assert not [c for n in nodes_left for c in n._connections if c.is_connected]
