"""Rate, concurrency and expiry inside the reserve and settle scripts, on every store.

The clock is an argument of reserve.lua, so these tests move time instead of waiting: a
minute's window passes in no time. Stores, helpers and the refusal checks are test_ledger's.
"""

# The store fixtures come from test_ledger, and tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time

from tests.cluster import redis_cluster_fixture  # noqa: F401
from tests.server.test_ledger import (  # noqa: F401 (fixtures)
    HOUR,
    MONTH,
    dedicated,
    embedded_url,
    key_of,
    ledger,
    new_tenant,
    refused,
    snapshot,
    store_url,
)
from till.server.ledger import RATE_WINDOW_MS, Admission, Ledger, Refused, now_ms, tkey
from till.tokens import new_key_id

W = RATE_WINDOW_MS


async def limited_key(
    ledger: Ledger,
    tenant: str,
    *,
    rpm: int | None = None,
    max_concurrent: int | None = None,
    expires_at: int | None = None,
    max_activations: int = 10_000,
) -> str:
    key_id = new_key_id()
    await ledger.create_key(
        tenant_id=tenant,
        key_id=key_id,
        provider="openai",
        max_activations=max_activations,
        max_tokens=None,
        max_microcents=None,
        metadata={},
        ip_whitelist=[],
        expires_at=expires_at,
        allowed_models=["gpt-4o*"],
        rpm=rpm,
        max_concurrent=max_concurrent,
    )
    return key_id


async def take(
    ledger: Ledger, tenant: str, key: str, at: int, rid: str | None = None, hold_seconds: int = HOUR
) -> Admission:
    """One reservation at ``at`` ms since the epoch."""
    return await ledger.reserve(
        tenant_id=tenant,
        key_id=key,
        request_id=rid or new_key_id(),
        month=MONTH,
        input_tokens=10,
        asked_output=-1,
        default_output=100,
        input_microcents=0,
        output_nanocents=0,
        hold_seconds=hold_seconds,
        now=at,
    )


async def settle(ledger: Ledger, tenant: str, key: str, rid: str, refund: bool = False) -> object:
    return await ledger.settle(
        tenant_id=tenant,
        key_id=key,
        request_id=rid,
        month=MONTH,
        tokens=5,
        microcents=0,
        refund_activation=refund,
    )


async def refused_unchanged(ledger: Ledger, tenant: str, key: str, at: int, code: str) -> Refused:
    """A refusal with ``code`` that writes nothing at all (P9)."""
    before = await snapshot(ledger, tenant)
    exc = await refused(take(ledger, tenant, key, at), code)
    assert await snapshot(ledger, tenant) == before, code
    return exc


# --- rpm: a sliding window of two fixed ones ---


async def test_rpm_window_slides_with_time(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, rpm=3)
    t0 = (now_ms() // W) * W  # the start of a window
    for i in range(3):
        await take(ledger, tenant, key, t0 + i)
    exc = await refused_unchanged(ledger, tenant, key, t0 + 10, "rate_limited")
    # This window is full: the next one admits from its first millisecond on.
    assert (exc.limit, exc.used, exc.remaining) == (3, 3, 0)
    assert exc.retry_after_ms == W - 10 + 1
    rec = await key_of(ledger, tenant, key)
    assert (rec.rpm, rec.used_activations) == (3, 3)

    # One millisecond into the next window the last one weighs 3 x (W - 1) / W < 3: one more.
    await take(ledger, tenant, key, t0 + W + 1)
    # Now 1 + 3 x (W - 2) / W >= 3 until the last window's weight falls to 2: a third of the way.
    exc = await refused_unchanged(ledger, tenant, key, t0 + W + 2, "rate_limited")
    assert exc.retry_after_ms == W // 3 + 1 - 2
    await refused_unchanged(ledger, tenant, key, t0 + W + W // 3, "rate_limited")
    await take(ledger, tenant, key, t0 + W + W // 3 + 1)
    await refused_unchanged(ledger, tenant, key, t0 + W + W // 3 + 2, "rate_limited")

    # Two windows later nothing weighs: a fresh three.
    for i in range(3):
        await take(ledger, tenant, key, t0 + 3 * W + i)
    await refused_unchanged(ledger, tenant, key, t0 + 3 * W + 3, "rate_limited")
    assert (await key_of(ledger, tenant, key)).used_activations == 8


async def test_rpm_is_exact_under_concurrency(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, rpm=20)
    at = (now_ms() // W) * W + W // 2
    results = await asyncio.gather(
        *(take(ledger, tenant, key, at) for _ in range(300)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, Admission)]
    refusals = [r for r in results if isinstance(r, Refused)]
    assert (len(admitted), len(refusals)) == (20, 280)
    assert {r.code for r in refusals} == {"rate_limited"}
    assert {r.retry_after_ms for r in refusals} == {W - W // 2 + 1}
    rec = await key_of(ledger, tenant, key)
    assert (rec.used_activations, rec.in_flight) == (20, 20)


# --- max_concurrent: a slot per reservation, given back once by its settlement ---


async def test_concurrency_slots_are_taken_and_given_back_once(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, max_concurrent=2)
    now = now_ms()
    await take(ledger, tenant, key, now, "r1")
    await take(ledger, tenant, key, now, "r2")
    exc = await refused_unchanged(ledger, tenant, key, now, "concurrency_limit_reached")
    assert (exc.limit, exc.used, exc.retry_after_ms) == (2, 2, 1000)
    # A replayed reservation answers as before and takes no second slot.
    await take(ledger, tenant, key, now, "r1")
    assert (await key_of(ledger, tenant, key)).in_flight == 2

    assert await settle(ledger, tenant, key, "r1") is not None
    assert (await key_of(ledger, tenant, key)).in_flight == 1
    # A replayed settlement gives nothing back twice.
    assert await settle(ledger, tenant, key, "r1") is None
    assert (await key_of(ledger, tenant, key)).in_flight == 1
    await take(ledger, tenant, key, now, "r3")
    await refused_unchanged(ledger, tenant, key, now, "concurrency_limit_reached")
    # A request that never reached the provider (refund) gives its slot back too.
    await settle(ledger, tenant, key, "r2", refund=True)
    await settle(ledger, tenant, key, "r3")
    rec = await key_of(ledger, tenant, key)
    assert (rec.in_flight, rec.used_activations, rec.max_concurrent) == (0, 2, 2)


async def test_concurrency_is_exact_under_concurrency(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, max_concurrent=10)
    now = now_ms()
    results = await asyncio.gather(
        *(take(ledger, tenant, key, now) for _ in range(300)), return_exceptions=True
    )
    assert sum(isinstance(r, Admission) for r in results) == 10
    assert {r.code for r in results if isinstance(r, Refused)} == {"concurrency_limit_reached"}
    assert (await key_of(ledger, tenant, key)).in_flight == 10


async def test_a_reaped_hold_frees_its_slot(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, max_concurrent=1)
    # Its worker died: the hold's deadline is now.
    await take(ledger, tenant, key, now_ms(), "dead", hold_seconds=0)
    await refused_unchanged(ledger, tenant, key, now_ms(), "concurrency_limit_reached")
    await ledger.reap()  # (on the shared Redis a server's own reaper may get there first)
    assert (await key_of(ledger, tenant, key)).in_flight == 0
    assert await ledger.store.hget(tkey(tenant, "r:dead"), "state") == b"settled"
    await take(ledger, tenant, key, now_ms(), "next")
    assert (await key_of(ledger, tenant, key)).in_flight == 1


async def test_a_cancelled_reservation_frees_its_slot(ledger: Ledger) -> None:
    # A reserve whose reply was lost is cancelled in the background (test_lost_reply): if it
    # ran, its slot comes back with its activation; if it never ran, it never takes one.
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, max_concurrent=1)
    await take(ledger, tenant, key, now_ms(), "ran")
    await ledger._cancel_reservation(tenant, key, "ran", MONTH)
    rec = await key_of(ledger, tenant, key)
    assert (rec.in_flight, rec.used_activations) == (0, 0)
    await ledger._cancel_reservation(tenant, key, "late", MONTH)
    await take(ledger, tenant, key, now_ms(), "late")  # answers the cancelled record
    assert (await key_of(ledger, tenant, key)).in_flight == 0


async def test_rate_is_checked_before_concurrency_and_after_budgets(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, rpm=1, max_concurrent=1, max_activations=1)
    now = (now_ms() // W) * W + 1  # early in a window: a rate refusal waits for most of it
    await take(ledger, tenant, key, now)
    # Spent for good (402) says more than "later" (429).
    await refused_unchanged(ledger, tenant, key, now, "activation_limit_reached")
    key = await limited_key(ledger, tenant, rpm=1, max_concurrent=1)
    await take(ledger, tenant, key, now)
    exc = await refused_unchanged(ledger, tenant, key, now, "rate_limited")
    assert exc.retry_after_ms == W  # the longer wait of the two


# --- expiry, from the key record ---


async def test_an_expired_key_is_refused_by_the_store_too(ledger: Ledger) -> None:
    tenant = await new_tenant(ledger)
    expires = int(time.time()) + 60
    key = await limited_key(ledger, tenant, expires_at=expires)
    await take(ledger, tenant, key, expires * 1000 - 1)
    await refused_unchanged(ledger, tenant, key, expires * 1000, "key_expired")
    rec = await key_of(ledger, tenant, key)
    assert (rec.expires_at, rec.allowed_models, rec.used_activations) == (expires, ["gpt-4o*"], 1)


async def test_limits_absent_from_a_record_limit_nothing(ledger: Ledger) -> None:
    # Keys created before these limits existed have no such fields (nor `inflight`).
    tenant = await new_tenant(ledger)
    key = await limited_key(ledger, tenant, rpm=1, max_concurrent=1, expires_at=1)
    await ledger.store.hdel(tkey(tenant, f"k:{key}"), "rpm", "max_conc", "expires", "inflight")
    now = now_ms()
    for _ in range(3):
        await take(ledger, tenant, key, now)
    assert (await key_of(ledger, tenant, key)).in_flight == 3
