"""The proxy when parts fail: the store goes away, the client leaves, workers share a store."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    UPSTREAM_KEY,
    Mock,
    RedisServer,
    Till,
    assert_no_secrets,
    fire_chats,
    short_tmpdir,
    start_redis,
    start_till,
    stop_process,
    till_env,
)
from till.tokens import Keyring

MESSAGES = [{"role": "user", "content": "Hello there"}]


def new_key(till: Till, admin_key: str, **fields: object) -> dict[str, object]:
    body = {"provider": "openai", "upstream_key": UPSTREAM_KEY, "max_activations": 100, **fields}
    with till.admin(admin_key) as admin:
        resp = admin.post("/admin/keys", json=body)
    assert resp.status_code == 201, resp.text
    key: dict[str, object] = resp.json()["key"]
    return key


def read_key(till: Till, admin_key: str, key_id: object) -> dict[str, object]:
    with till.admin(admin_key) as admin:
        key: dict[str, object] = admin.get(f"/admin/keys/{key_id}").json()["key"]
    return key


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server this test may stop and start."""
    directory = short_tmpdir("till-own-redis-")
    server = start_redis(directory)
    yield server
    stop_process(server.proc)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def till_on(own_redis: RedisServer, mock_upstream: Mock, log_dir: Path) -> Iterator[Till]:
    data_dir = short_tmpdir("till-faults-")
    env = till_env(
        data_dir,
        mock_upstream.url,
        own_redis.url,
        TILL_SECRET_KEYS=Keyring.generate("f1").format(),
        TILL_REDIS_TIMEOUT="0.5",
    )
    server = start_till(env, log_dir / f"till-faults-{time.monotonic_ns()}.log")
    yield server
    server.stop()
    assert_no_secrets(server.log)
    shutil.rmtree(data_dir, ignore_errors=True)


def test_store_down_fails_closed_and_recovers(
    till_on: Till, own_redis: RedisServer, mock_upstream: Mock
) -> None:
    admin_key = till_on.new_tenant()
    token = new_key(till_on, admin_key)["scopedKey"]
    with openai.OpenAI(api_key=str(token), base_url=f"{till_on.url}/v1", max_retries=0) as oa:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stop_process(own_redis.proc)
        mock_upstream.reset()
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert time.monotonic() - started < 5
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"].isdigit()
        assert caught.value.code == "store_unavailable"
        assert mock_upstream.requests() == []
        # Admin API fails closed too, with the same advice.
        with till_on.admin(admin_key) as admin:
            resp = admin.get("/admin/keys")
        assert resp.status_code == 503 and "retry-after" in resp.headers
        # And the worker says it is not ready, so a load balancer stops sending to it.
        ready = httpx.get(f"{till_on.url}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "store_unavailable"
        # The store comes back on the same port (AOF kept the data): Till recovers by itself.
        restarted = start_redis(own_redis.dir, own_redis.port)
        own_redis.proc = restarted.proc
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(mock_upstream.requests()) == 1
    assert httpx.get(f"{till_on.url}/readyz").status_code == 200


@pytest.mark.parametrize("leave_after", ["first", "middle", "last"])
def test_client_disconnect_mid_stream_closes_upstream_and_charges(
    till: Till, mock_upstream: Mock, leave_after: str
) -> None:
    """P13: the client leaves after the first, a middle, or the last content chunk (before the
    usage chunk and [DONE]): the upstream connection closes within a second of it leaving, and
    the key is charged at least what the provider served, with nothing left held."""
    admin_key = till.new_tenant()
    key = new_key(till, admin_key, max_tokens=100_000)
    mock_upstream.reset()
    answer_tokens = 20

    async def read_then_leave() -> int:
        async with openai.AsyncOpenAI(
            api_key=str(key["scopedKey"]), base_url=f"{till.url}/v1", max_retries=0
        ) as oa:
            stream = await oa.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                max_tokens=answer_tokens,
                extra_headers={"x-mock-delay-ms": "50"},
            )
            words = 0
            async for chunk in stream:
                words += sum(bool(c.delta.content) for c in chunk.choices)
                done = any(c.finish_reason for c in chunk.choices)
                if (
                    (leave_after == "first" and words == 1)
                    or (leave_after == "middle" and words == answer_tokens // 2)
                    or done
                ):
                    break
            await stream.close()
            return words

    words = asyncio.run(read_then_leave())
    left = time.monotonic()
    assert words == {"first": 1, "middle": answer_tokens // 2, "last": answer_tokens}[leave_after]
    deadline = left + 5
    record: dict[str, object] = {}
    while time.monotonic() < deadline:
        (record,) = mock_upstream.requests()
        if record.get("ended_at"):
            break
        time.sleep(0.02)
    if leave_after != "last":
        assert record.get("disconnected"), record
        # The upstream saw the connection close within a second of the client leaving.
        assert time.monotonic() - left < 1.5
        assert int(record["output_tokens_sent"]) < answer_tokens  # type: ignore[call-overload]
    deadline = time.monotonic() + 5
    after = read_key(till, admin_key, key["id"])
    while after["heldTokens"] and time.monotonic() < deadline:
        time.sleep(0.05)
        after = read_key(till, admin_key, key["id"])
    assert after["heldTokens"] == 0
    assert after["usedActivations"] == 1
    # Usage never reached the client, and may not have reached Till: the key is charged the
    # provider's figure or its hold (input estimate + the 20-token cap), never less.
    served = int(mock_upstream.totals()["total_tokens"])
    assert served <= int(after["usedTokens"]) <= served + answer_tokens + 40  # type: ignore[call-overload]


def test_limit_is_exact_across_workers(
    redis_server: RedisServer, mock_upstream: Mock, log_dir: Path
) -> None:
    data_dir = short_tmpdir("till-workers-")
    env = till_env(
        data_dir, mock_upstream.url, redis_server.url, TILL_SECRET_KEYS=Keyring.generate().format()
    )
    server = start_till(env, log_dir / "till-workers.log", "--workers", "3")
    try:
        admin_key = server.new_tenant()
        token = str(new_key(server, admin_key, max_activations=50)["scopedKey"])
        mock_upstream.reset()

        statuses = fire_chats(server.url, token, 400)
        assert statuses.count(200) == 50
        assert statuses.count(402) == 350
        assert len(mock_upstream.requests()) == 50
        after = read_key(server, admin_key, token.split(".")[0].removeprefix("till_sk_"))
        assert after["usedActivations"] == 50 and after["status"] == "exhausted"
    finally:
        server.stop()
        assert_no_secrets(server.log)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_killed_workers_concurrency_slot_is_freed_when_it_stops_beating(
    own_redis: RedisServer, mock_upstream: Mock, log_dir: Path
) -> None:
    """P12 with max_concurrent=1: SIGKILL the worker mid-stream. Its hold's deadline is an
    hour away, yet the key's one slot is free again within TILL_WORKER_TIMEOUT (and a reaper
    round): the survivor sees the worker stop beating and charges its hold at once."""
    data_dir = short_tmpdir("till-beat-")
    env = till_env(
        data_dir,
        mock_upstream.url,
        own_redis.url,
        TILL_SECRET_KEYS=Keyring.generate("r1").format(),
        TILL_HOLD_SECONDS="3600",
        TILL_REAP_INTERVAL="0.2",
        TILL_WORKER_TIMEOUT="2",
    )
    doomed = start_till(env, log_dir / "till-beat-doomed.log")
    survivor = start_till(env, log_dir / "till-beat-survivor.log")
    chat = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50}
    try:
        admin_key = doomed.new_tenant()
        key = new_key(doomed, admin_key, max_tokens=100_000, max_concurrent=1)
        auth = {"authorization": f"Bearer {key['scopedKey']}"}
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST",
                f"{doomed.url}/v1/chat/completions",
                headers={**auth, "x-mock-delay-ms": "100"},
                json={**chat, "stream": True, "max_tokens": 300},
            ) as resp,
        ):
            chunks = resp.iter_raw()  # kept: a dropped iterator closes the response
            next(chunks)
            held = read_key(survivor, admin_key, key["id"])
            doomed.proc.kill()  # SIGKILL: no settlement, no finally
            doomed.proc.wait(5)
        killed = time.monotonic()
        refused = httpx.post(f"{survivor.url}/v1/chat/completions", headers=auth, json=chat)
        assert refused.json()["error"]["code"] == "concurrency_limit_reached"
        after = read_key(survivor, admin_key, key["id"])
        while after["inFlight"] and time.monotonic() < killed + 10:
            time.sleep(0.1)
            after = read_key(survivor, admin_key, key["id"])
        freed = time.monotonic() - killed
        assert after["inFlight"] == 0, "the slot is still held"
        assert freed < 2 + 3  # the worker timeout, a reaper round, and slack
        # Charged its whole hold, once.
        assert (after["heldTokens"], after["usedTokens"]) == (0, held["heldTokens"])
        served = httpx.post(f"{survivor.url}/v1/chat/completions", headers=auth, json=chat)
        assert served.status_code == 200, served.text
    finally:
        survivor.stop()
        assert_no_secrets(survivor.log)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_worker_killed_mid_stream_is_charged_by_the_reaper(
    own_redis: RedisServer, mock_upstream: Mock, log_dir: Path
) -> None:
    """P12: SIGKILL the worker during a stream; another instance's reaper charges the hold."""
    data_dir = short_tmpdir("till-reaper-")
    env = till_env(
        data_dir,
        mock_upstream.url,
        own_redis.url,
        TILL_SECRET_KEYS=Keyring.generate("r1").format(),
        TILL_HOLD_SECONDS="2",
        TILL_REAP_INTERVAL="0.2",
    )
    doomed = start_till(env, log_dir / "till-reaper-doomed.log")
    survivor = start_till(env, log_dir / "till-reaper-survivor.log")
    try:
        admin_key = doomed.new_tenant()
        key = new_key(doomed, admin_key, max_tokens=100_000)
        mock_upstream.reset()
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST",
                f"{doomed.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {key['scopedKey']}", "x-mock-delay-ms": "100"},
                json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, "max_tokens": 300},
            ) as resp,
        ):
            chunks = resp.iter_raw()  # kept: a dropped iterator closes the response
            next(chunks)
            held = read_key(survivor, admin_key, key["id"])
            assert int(held["heldTokens"]) > 300  # type: ignore[call-overload]
            doomed.proc.kill()  # SIGKILL: no settlement, no finally
            doomed.proc.wait(5)
        deadline = time.monotonic() + 10
        after = read_key(survivor, admin_key, key["id"])
        while after["heldTokens"] and time.monotonic() < deadline:
            time.sleep(0.1)
            after = read_key(survivor, admin_key, key["id"])
        # The hold was charged in full, once: nothing is left held, nothing was lost.
        assert after["heldTokens"] == 0
        assert after["usedTokens"] == held["heldTokens"]
        assert after["usedActivations"] == 1
    finally:
        survivor.stop()
        assert_no_secrets(survivor.log)
        shutil.rmtree(data_dir, ignore_errors=True)
