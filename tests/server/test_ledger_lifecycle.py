"""Child keys, top-ups and Idempotency-Key inside the scripts, on every store (Redis, embedded,
cluster): what the proxy and the reaper ask of the ledger, called directly. Stores, helpers
and the refusal checks are test_ledger's.
"""

# The store fixtures come from test_ledger, and tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.exceptions as rexc

from tests.cluster import redis_cluster_fixture  # noqa: F401
from tests.server.test_ledger import (  # noqa: F401 (fixtures)
    HOUR,
    MONTH,
    dedicated,
    embedded_url,
    key_of,
    ledger,
    new_key,
    new_tenant,
    refused,
    snapshot,
    store_url,
)
from till.server.ledger import WORKERS, Idempotency, Ledger, StoreUnavailable, now_ms, tkey
from till.tokens import new_key_id


async def child_of(
    ledger: Ledger,
    tenant: str,
    ancestors: list[str],
    *,
    max_activations: int = 10,
    max_tokens: int | None = None,
) -> str:
    return await new_key(
        ledger, tenant, max_activations=max_activations, max_tokens=max_tokens, ancestors=ancestors
    )


async def take(
    ledger: Ledger,
    tenant: str,
    key: str,
    rid: str,
    *,
    ancestors: tuple[str, ...] = (),
    idem: Idempotency | None = None,
    hold_seconds: int = HOUR,
) -> None:
    await ledger.reserve(
        tenant_id=tenant,
        key_id=key,
        request_id=rid,
        month=MONTH,
        input_tokens=10,
        asked_output=50,
        default_output=100,
        input_microcents=0,
        output_nanocents=0,
        hold_seconds=hold_seconds,
        ancestors=ancestors,
        idempotency=idem,
    )


async def test_a_childs_hold_is_held_and_reaped_on_every_ancestor(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    root = await new_key(ledger, tenant, max_activations=10, max_tokens=10_000)
    child = await child_of(ledger, tenant, [root], max_tokens=5000)
    grandchild = await child_of(ledger, tenant, [child, root])
    # Its worker dies holding the hold: the reaper charges it, on each key, and frees the slot.
    await take(ledger, tenant, grandchild, "dies", ancestors=(child, root), hold_seconds=-1)
    for key in (grandchild, child, root):
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_activations, rec.held_tokens, rec.in_flight) == (1, 60, 1)
    assert await ledger.reap() == 1
    for key in (grandchild, child, root):
        rec = await key_of(ledger, tenant, key)
        assert (rec.used_activations, rec.held_tokens, rec.used_tokens, rec.in_flight) == (
            1,
            0,
            60,
            0,
        )


async def test_a_child_is_refused_by_any_ancestor_and_writes_nothing(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    root = await new_key(ledger, tenant, max_activations=1)
    child = await child_of(ledger, tenant, [root], max_activations=1)
    kid = await child_of(ledger, tenant, [child, root], max_activations=1)
    await take(ledger, tenant, child, "one", ancestors=(root,))
    before = await snapshot(ledger, tenant)
    error = await refused(
        take(ledger, tenant, kid, "two", ancestors=(child, root)), "activation_limit_reached"
    )
    assert error.detail == "parent"
    assert await snapshot(ledger, tenant) == before
    # A revoked ancestor, or one gone from the store, refuses as well.
    await ledger.revoke_key(tenant, root)
    before = await snapshot(ledger, tenant)
    error = await refused(
        take(ledger, tenant, kid, "three", ancestors=(child, root)), "key_revoked"
    )
    assert await snapshot(ledger, tenant) == before
    ghost = new_key_id()
    fresh = await new_key(ledger, tenant)
    await refused(take(ledger, tenant, fresh, "four", ancestors=(ghost,)), "key_revoked")
    assert (await key_of(ledger, tenant, fresh)).used_activations == 0


async def test_a_lost_reserve_reply_under_an_idempotency_key_costs_one_activation(
    ledger: Ledger,
) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1)
    idem = Idempotency("d" * 32, "f" * 32)
    # The reserve ran but its reply was lost: the ledger cancels it, giving the activation
    # back, and the record lets a retry go.
    await take(ledger, tenant, key, "lost", idem=idem)
    await ledger._cancel_reservation(tenant, key, "lost", MONTH, (), idem)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.in_flight, rec.held_tokens) == (0, 0, 0)
    state = await ledger.store.hgetall(tkey(tenant, f"i:{idem.digest}"))  # type: ignore[misc]
    assert (state[b"state"], state[b"act"]) == (b"open", b"0")
    await take(ledger, tenant, key, "retry", idem=idem)
    assert (await key_of(ledger, tenant, key)).used_activations == 1
    await refused(take(ledger, tenant, key, "again", idem=idem), "idempotency_in_progress")
    await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id="retry",
        month=MONTH,
        tokens=30,
        microcents=0,
        idempotency=idem,
        completed=True,
    )
    error = await refused(
        take(ledger, tenant, key, "late", idem=idem), "idempotent_request_completed"
    )
    assert error.detail == "retry"
    other = Idempotency(idem.digest, "0" * 32)
    await refused(take(ledger, tenant, key, "other", idem=other), "idempotency_key_reused")
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.used_tokens, rec.in_flight) == (1, 30, 0)


async def test_a_late_settlement_of_an_earlier_call_leaves_the_record_alone(
    ledger: Ledger,
) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=5)
    idem = Idempotency("e" * 32, "f" * 32)
    await take(ledger, tenant, key, "first", idem=idem)
    await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="first", month=MONTH, tokens=0,
        microcents=0, idempotency=idem, completed=False,
    )  # fmt: skip
    await take(ledger, tenant, key, "second", idem=idem)
    # The first call's settlement again (a repair): skipped, and the second stays running.
    again = await ledger.settle(
        tenant_id=tenant, key_id=key, request_id="first", month=MONTH, tokens=0,
        microcents=0, idempotency=idem, completed=True,
    )  # fmt: skip
    assert again is None
    await refused(take(ledger, tenant, key, "third", idem=idem), "idempotency_in_progress")
    assert (await key_of(ledger, tenant, key)).used_activations == 1


async def test_concurrent_retries_under_one_idempotency_key_run_once(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=100)
    idem = Idempotency("c" * 32, "f" * 32)
    results = await asyncio.gather(
        *(take(ledger, tenant, key, f"r{i}", idem=idem) for i in range(40)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(getattr(r, "code", None) == "idempotency_in_progress" for r in results if r)
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.in_flight) == (1, 1)


async def test_top_ups_and_limit_changes_are_atomic(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await new_key(ledger, tenant, max_activations=1, max_tokens=100)
    await take(ledger, tenant, key, "a")
    assert (await key_of(ledger, tenant, key)).status == "exhausted"
    await asyncio.gather(
        *(ledger.update_key(tenant, key, changes=[("add", "max_act", 1)]) for _ in range(30))
    )
    rec = await key_of(ledger, tenant, key)
    assert (rec.max_activations, rec.status) == (31, "active")
    # One bad change among good ones: nothing is applied.
    before = await snapshot(ledger, tenant)
    bad_changes: list[list[tuple[str, str, int]]] = [
        [("set", "max_tok", 5), ("add", "max_mc", 1)],  # no spend limit to add to
        [("set", "max_tok", 5), ("del", "max_act", 0)],
        [("set", "max_tok", 5), ("set", "used_act", 0)],
        [("set", "max_tok", 5), ("mul", "max_act", 2)],
        [("set", "max_tok", 0)],
        [("add", "max_tok", 2**53)],
    ]
    for changes in bad_changes:
        with pytest.raises((rexc.ResponseError, Exception)) as caught:
            await ledger.update_key(tenant, key, changes=changes)
        assert not isinstance(caught.value, StoreUnavailable)
        assert await snapshot(ledger, tenant) == before, changes
    assert await ledger.update_key(tenant, new_key_id(), changes=[("add", "max_act", 1)]) is None


async def test_a_dead_workers_holds_are_charged_at_once_and_free_their_slots(
    ledger: Ledger,
) -> None:
    tenant = await new_tenant(ledger)
    keys = []
    for _ in range(3):
        key_id = new_key_id()
        await ledger.create_key(
            tenant_id=tenant, key_id=key_id, provider="openai", max_activations=10,
            max_tokens=10_000, max_microcents=None, metadata={}, ip_whitelist=[],
            max_concurrent=1,
        )  # fmt: skip
        keys.append(key_id)
    dead, live = new_key_id()[:8], new_key_id()[:8]
    # Hours from their deadline: only a worker's death can get them reaped now.
    await take(ledger, tenant, keys[0], f"{dead}-{'1' * 16}")
    await take(ledger, tenant, keys[1], f"{live}-{'2' * 16}")
    await take(ledger, tenant, keys[2], "3" * 24)  # an id without a worker: its deadline only
    store: Any = ledger.store
    await store.hset(WORKERS, dead, now_ms() - 60_000)
    await ledger.heartbeat(live)
    found = await ledger.dead_workers(30_000, 86_400_000)
    assert dead in found and live not in found
    assert await ledger.reap(dead=found) == 1
    charged = await key_of(ledger, tenant, keys[0])
    assert (charged.in_flight, charged.held_tokens, charged.used_tokens) == (0, 0, 60)
    for key_id in keys[1:]:
        running = await key_of(ledger, tenant, key_id)
        assert (running.in_flight, running.held_tokens, running.used_tokens) == (1, 60, 0)
    # The slot is free again for a new request of the key.
    await take(ledger, tenant, keys[0], "after")
    # Unknown to the store (never beat, or forgotten): not dead. Long gone: forgotten.
    assert new_key_id()[:8] not in await ledger.dead_workers(30_000, 86_400_000)
    await store.hset(WORKERS, dead, now_ms() - 2 * 86_400_000)
    assert dead in await ledger.dead_workers(30_000, 86_400_000)
    assert await store.hget(WORKERS, dead) is None


async def test_an_expired_key_gives_its_place_in_the_plan_back_once(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    now = int(time.time())
    ids = {}
    for name, expires in (("past", now - 5), ("revoked", now - 5), ("future", now + 3600)):
        ids[name] = new_key_id()
        await ledger.create_key(
            tenant_id=tenant, key_id=ids[name], provider="openai", max_activations=1,
            max_tokens=None, max_microcents=None, metadata={}, ip_whitelist=[],
            expires_at=expires,
        )  # fmt: skip
    await ledger.revoke_key(tenant, ids["revoked"])
    assert (await ledger.tenant(tenant)).live_keys == 2  # type: ignore[union-attr]
    assert await ledger.expire_keys(tenant) == 1
    assert (await ledger.tenant(tenant)).live_keys == 1  # type: ignore[union-attr]
    # Once: a second sweep, or revoking the expired key later, gives nothing back again.
    assert await ledger.expire_keys(tenant) == 0
    assert await ledger.revoke_key(tenant, ids["past"]) is not None
    assert (await ledger.tenant(tenant)).live_keys == 1  # type: ignore[union-attr]
    # The reaper sweeps as it goes; the key that has not expired keeps its place.
    await ledger.reap()
    assert (await ledger.tenant(tenant)).live_keys == 1  # type: ignore[union-attr]
    assert (await key_of(ledger, tenant, ids["future"])).status == "active"
