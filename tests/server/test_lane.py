"""The scripts' own route to a single Redis server (till/server/lane.py).

What it must keep from redis-py's command path: a reply never reaches the wrong caller (a
connection comes back only after a whole reply, or closed), each attempt ends within the store
timeout, a failed attempt is sent once more, and a full lane waits at most the timeout.
BLPOP on an empty list stands in for a store that answers late: it replies (nil) after its own
timeout, on that connection only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from tests.conftest import RedisServer
from till.server.lane import Lane, pack
from till.server.ledger import Ledger, StoreUnavailable, connect


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(f"redis://127.0.0.1:{redis_server.port}/0", timeout=0.3, max_connections=8)
    assert isinstance(client, aioredis.Redis)
    yield client
    await client.aclose(close_connection_pool=True)


async def test_packs_as_redis_py_does(store: aioredis.Redis) -> None:
    lane = Lane(store, 0.3)
    try:
        assert pack("ECHO", "x") == b"*2\r\n$4\r\nECHO\r\n$1\r\nx\r\n"
        assert await lane.execute(pack("SET", "till:lane:n", -12)) == b"OK"
        assert await lane.execute(pack("GET", "till:lane:n")) == b"-12"
        with pytest.raises(rexc.ResponseError):
            await lane.execute(pack("INCR", "till:lane:n", "not-a-number"))
        # An error reply is read whole: the connection goes on.
        assert await lane.execute(pack("PING")) == b"PONG"
    finally:
        await lane.close()


async def test_late_reply_times_out_and_never_reaches_the_next_caller(
    store: aioredis.Redis,
) -> None:
    lane = Lane(store, 0.3)
    try:
        start = time.monotonic()
        with pytest.raises(rexc.TimeoutError):
            await lane.execute(pack("BLPOP", "till:lane:empty", "1"))
        # Two attempts of one timeout each, then the caller fails (closed).
        assert 0.55 < time.monotonic() - start < 2.0
        # The late nil replies of the two BLPOPs went with their closed connections.
        for _ in range(5):
            assert await lane.execute(pack("PING")) == b"PONG"
    finally:
        await lane.close()


async def test_one_timer_keeps_every_attempt_to_its_own_deadline(
    store: aioredis.Redis,
) -> None:
    lane = Lane(store, 0.3)

    async def late(n: int) -> float:
        await asyncio.sleep(0.07 * n)
        start = time.monotonic()
        with pytest.raises(rexc.TimeoutError):
            await lane.execute(pack("BLPOP", f"till:lane:late{n}", "2"))
        return time.monotonic() - start

    try:
        # Started at different times, each ends after its own two timeouts (not the first's).
        took = await asyncio.gather(*(late(n) for n in range(5)))
        assert all(0.55 < t < 2.0 for t in took), took
        assert await lane.execute(pack("PING")) == b"PONG"
    finally:
        await lane.close()


async def test_cancelled_caller_leaves_no_reply_behind(store: aioredis.Redis) -> None:
    lane = Lane(store, 5.0)
    try:
        call = asyncio.ensure_future(lane.execute(pack("BLPOP", "till:lane:cancel", "0.3")))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.4)  # the BLPOP's nil would be waiting by now
        assert await lane.execute(pack("ECHO", "mine")) == b"mine"
    finally:
        await lane.close()


async def test_full_lane_waits_at_most_the_timeout(redis_server: RedisServer) -> None:
    store = connect(f"redis://127.0.0.1:{redis_server.port}/0", timeout=0.3, max_connections=2)
    assert isinstance(store, aioredis.Redis)
    lane = Lane(store, 0.3)
    try:
        assert lane.size == 1  # one of the two stays free for the client's own commands
        # Holds the lane's one connection for two attempts (it times out).
        busy = asyncio.ensure_future(lane.execute(pack("BLPOP", "till:lane:full", "2")))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(rexc.ConnectionError, match="no free connection"):
            await lane.execute(pack("PING"))
        assert 0.25 < time.monotonic() - start < 0.8
        assert await store.ping()  # the client's own pool still has its connection
        with pytest.raises(rexc.TimeoutError):
            await busy
        assert await lane.execute(pack("PING")) == b"PONG"
    finally:
        await lane.close()
        await store.aclose(close_connection_pool=True)


async def test_the_ledger_scripts_take_the_lane(redis_server: RedisServer) -> None:
    ledger = Ledger(connect(redis_server.url, timeout=2.0, max_connections=16))
    try:
        assert ledger._lane is not None and ledger._reserve._lane is ledger._lane
        assert ledger._lane.size == 14
        await ledger.check()  # the reserve script, by the lane
    finally:
        await ledger.close()


async def test_unreachable_store_fails_closed_through_the_lane(redis_server: RedisServer) -> None:
    # A port nobody listens on: connection refused, on both attempts.
    ledger = Ledger(connect("redis://127.0.0.1:1/0", timeout=0.3, max_connections=4))
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await ledger.check()
        assert time.monotonic() - start < 1.5
    finally:
        await ledger.close()
