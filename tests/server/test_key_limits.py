"""Expiry, model allow-lists, rate and concurrency limits against a live Till: keys made with
the SDK, used with each provider's own SDK.

A refusal reaches no provider (the mock records nothing for it) and changes no counter.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.conftest import (
    UPSTREAM_KEY,
    Mock,
    RedisServer,
    Till,
    get_key,
    own_till,
    short_tmpdir,
    start_redis,
    stop_process,
)
from till import TillClient
from till.client import ValidationError
from till.models import ScopedKey

ANTHROPIC_KEY = "sk-ant-test-upstream-0123456789abcdef"
GOOGLE_KEY = "AIzaSy-test-upstream-google-0123456789"
MESSAGES: list[Any] = [{"role": "user", "content": "Hello there"}]
RATE_WINDOW = 2  # seconds, on the quiet server


def sdk(till: Till, admin_key: str) -> TillClient:
    return TillClient(admin_key=admin_key, base_url=till.url, max_retries=0)


def oa(till: Till, token: str | None, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", **kwargs)


def claude(till: Till, token: str | None, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=token, base_url=till.url, **kwargs)


def gemini(till: Till, token: str | None) -> genai.Client:
    return genai.Client(
        api_key=token, http_options=types.HttpOptions(base_url=till.url, api_version="v1beta")
    )


def error_of(exc: openai.APIStatusError | anthropic.APIStatusError) -> dict[str, Any]:
    """The error object of an OpenAI or Anthropic error body."""
    body = exc.body
    assert isinstance(body, dict), body
    error: dict[str, Any] = body.get("error", body)
    return error


def parse_time(text: str | None) -> float:
    assert text is not None
    return datetime.fromisoformat(text).timestamp()


@pytest.fixture(scope="module")
def admin_key(till: Till) -> str:
    return till.new_tenant("limits")


# --- a Till of its own, on a Redis of its own ---


@pytest.fixture(scope="module")
def quiet(mock_upstream: Mock, log_dir: Any) -> Iterator[tuple[Till, RedisServer]]:
    """Nothing else talks to this Redis, and the server's reaper sleeps for an hour: a test
    can count the commands a request sends. Its rate window is RATE_WINDOW seconds."""
    directory = short_tmpdir("till-quiet-")
    server = start_redis(directory)
    try:
        with own_till(
            "quiet", mock_upstream.url, server.url, log_dir,
            TILL_RATE_WINDOW_SECONDS=str(RATE_WINDOW), TILL_REAP_INTERVAL="3600",
        ) as till:  # fmt: skip
            yield till, server
    finally:
        stop_process(server.proc)
        shutil.rmtree(directory, ignore_errors=True)


def commands(store: redis.Redis) -> int:
    """Commands the server has run, this INFO included."""
    return int(store.info("stats")["total_commands_processed"])


# --- 1. expiry ---


def test_an_expired_token_is_refused_before_any_store_call(
    quiet: tuple[Till, RedisServer], mock_upstream: Mock
) -> None:
    till, server = quiet
    admin_key = till.new_tenant("expiry")
    with sdk(till, admin_key) as client:
        key = client.create_key("openai", UPSTREAM_KEY, 10, ttl_seconds=2)
    expires = parse_time(key.expires_at)
    assert time.time() + 1 <= expires <= time.time() + 2
    mock_upstream.reset()
    with redis.Redis(port=server.port) as store, oa(till, key.scoped_key, max_retries=2) as ai:
        before = commands(store)
        ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        # The count sees a request's store calls: reserve and settle (the INFO aside).
        assert commands(store) - before - 1 >= 2
        time.sleep(max(0.0, expires - time.time()) + 0.05)
        before = commands(store)
        for _ in range(3):
            with pytest.raises(openai.AuthenticationError) as caught:
                ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert caught.value.status_code == 401
            assert error_of(caught.value)["code"] == "key_expired"
        assert commands(store) - before == 1  # the INFO that read `before`, nothing else
    assert len(mock_upstream.requests()) == 1
    with sdk(till, admin_key) as client:
        after = client.get_key(key.id)
    assert (after.status, after.used_activations, after.in_flight) == ("expired", 1, 0)
    assert after.expires_at == key.expires_at


def test_expiry_is_given_one_way_in_the_future(till: Till, admin_key: str) -> None:
    now = datetime.now(UTC)
    with sdk(till, admin_key) as client:
        live = len(client.list_keys())
        bad: list[dict[str, Any]] = [
            {"expires_at": now - timedelta(seconds=5)},
            {"expires_at": "2031-01-01T00:00:00"},  # no timezone
            {"expires_at": datetime(2031, 1, 1)},  # naive: no timezone either
            {"expires_at": "next tuesday"},
            {"expires_at": now + timedelta(days=1), "ttl_seconds": 60},
            {"ttl_seconds": 0},
            {"ttl_seconds": 11 * 366 * 86400},
        ]
        for fields in bad:
            with pytest.raises(ValidationError) as caught:
                client.create_key("openai", UPSTREAM_KEY, 5, **fields)
            assert (caught.value.status_code, caught.value.code) == (422, "validation_error")
            assert "expires_at" in str(caught.value) or "ttl_seconds" in str(caught.value)
        assert len(client.list_keys()) == live

        at = now + timedelta(days=30, milliseconds=700)
        key = client.create_key("openai", UPSTREAM_KEY, 5, expires_at=at)
        assert parse_time(key.expires_at) == int(at.timestamp())  # to the second, rounded down
        assert key.expires_at is not None and key.expires_at.endswith(".000Z")
        # Any offset names the same instant.
        offset = at.astimezone(timezone(timedelta(hours=-9, minutes=-30))).isoformat()
        same = client.create_key("openai", UPSTREAM_KEY, 5, expires_at=offset)
        assert same.expires_at == key.expires_at
        ttl = client.create_key("openai", UPSTREAM_KEY, 5, ttl_seconds=3600)
        assert time.time() + 3598 <= parse_time(ttl.expires_at) <= time.time() + 3600
        plain = client.create_key("openai", UPSTREAM_KEY, 5)
        assert plain.expires_at is None and plain.status == "active"
        assert client.get_key(key.id).status == "active"


# --- 2. model allow-lists, in each provider's dialect ---


def test_validation_of_limits(till: Till, admin_key: str) -> None:
    with sdk(till, admin_key) as client:
        live = len(client.list_keys())
        bad: list[dict[str, Any]] = [
            {"allowed_models": []},
            {"allowed_models": [""]},
            {"allowed_models": ["gpt*4o"]},
            {"allowed_models": ["gpt-4o**"]},
            {"allowed_models": ["gpt 4o"]},
            {"allowed_models": ["gpt-4o\n"]},
            {"allowed_models": ["m" * 65]},
            {"allowed_models": [f"m{i}" for i in range(65)]},
            {"rpm": 0},
            {"rpm": 1_000_001},
            {"max_concurrent": 0},
        ]
        for fields in bad:
            with pytest.raises(ValidationError) as caught:
                client.create_key("openai", UPSTREAM_KEY, 5, **fields)
            assert caught.value.code == "validation_error", fields
            assert next(iter(fields)) in str(caught.value), (fields, str(caught.value))
        assert len(client.list_keys()) == live
        key = client.create_key(
            "openai", UPSTREAM_KEY, 5, allowed_models=["*", "gpt-4o", "gpt-4o", "m" * 64],
            rpm=60, max_concurrent=4,
        )  # fmt: skip
        assert key.allowed_models == ["*", "gpt-4o", "m" * 64]  # duplicates dropped
        assert (key.rpm, key.max_concurrent, key.in_flight) == (60, 4, 0)


def test_openai_models_off_the_list_are_refused_before_anything_is_spent(
    till: Till, admin_key: str, mock_upstream: Mock
) -> None:
    with sdk(till, admin_key) as client:
        key = client.create_key(
            "openai", UPSTREAM_KEY, 100, allowed_models=["gpt-4o-mini", "gpt-4.1*"]
        )
    mock_upstream.reset()
    with oa(till, key.scoped_key, max_retries=2) as ai:
        ai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        ai.chat.completions.create(model="gpt-4.1-nano", messages=MESSAGES)
        listed = [m.id for m in ai.models.list()]
        assert listed and set(listed) == {"gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini"}
        assert ai.models.retrieve("gpt-4.1").id == "gpt-4.1"
        refused = [
            lambda: ai.chat.completions.create(model="gpt-4o", messages=MESSAGES),
            lambda: ai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True),
            lambda: ai.chat.completions.create(model="", messages=MESSAGES),
            lambda: ai.chat.completions.create(model="gpt-4o-mini-2", messages=MESSAGES),
            lambda: ai.responses.create(model="o3-mini", input="Hi"),
            lambda: ai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once"),
            lambda: ai.embeddings.create(model="text-embedding-3-small", input="hi"),
            lambda: ai.models.retrieve("gpt-4o"),
        ]
        for call in refused:
            with pytest.raises(openai.PermissionDeniedError) as caught:
                call()
            assert caught.value.status_code == 403
            error = error_of(caught.value)
            assert (error["code"], error["type"]) == ("model_not_allowed", "permission_error")
    seen = mock_upstream.requests()
    assert [(r["path"], r["model"]) for r in seen if r["method"] == "POST"] == [
        ("/v1/chat/completions", "gpt-4o-mini"),
        ("/v1/chat/completions", "gpt-4.1-nano"),
    ]
    assert len(seen) == 4
    after = get_key_view(till, admin_key, key.id)
    assert after.used_activations == 4 and after.in_flight == 0
    assert after.allowed_models == ["gpt-4o-mini", "gpt-4.1*"]


def get_key_view(till: Till, admin_key: str, key_id: str) -> ScopedKey:
    with sdk(till, admin_key) as client:
        return client.get_key(key_id)


def test_anthropic_models_off_the_list_are_refused(
    till: Till, admin_key: str, mock_upstream: Mock
) -> None:
    with sdk(till, admin_key) as client:
        key = client.create_key(
            "anthropic", ANTHROPIC_KEY, 100, allowed_models=["claude-sonnet-4*"]
        )
    mock_upstream.reset()
    allowed, other = "claude-sonnet-4-6", "claude-opus-4-1"
    with claude(till, key.scoped_key, max_retries=2) as ac:
        ac.messages.create(model=allowed, max_tokens=50, messages=MESSAGES)
        ac.messages.count_tokens(model=allowed, messages=MESSAGES)
        refused = [
            lambda: ac.messages.create(model=other, max_tokens=50, messages=MESSAGES),
            lambda: ac.messages.create(model=other, max_tokens=50, messages=MESSAGES, stream=True),
            lambda: ac.messages.count_tokens(model=other, messages=MESSAGES),
        ]
        for call in refused:
            with pytest.raises(anthropic.PermissionDeniedError) as caught:
                call()
            body = caught.value.body
            assert isinstance(body, dict) and body["type"] == "error"
            assert body["error"]["type"] == "permission_error"
            assert body["error"]["code"] == "model_not_allowed"
    # The OpenAI SDK with the same key reaches Anthropic's OpenAI-compatible endpoint.
    with oa(till, key.scoped_key, max_retries=2) as ai:
        with pytest.raises(openai.PermissionDeniedError):
            ai.chat.completions.create(model=other, messages=MESSAGES)
        ai.chat.completions.create(model=allowed, messages=MESSAGES)
    assert [r["model"] for r in mock_upstream.requests()] == [allowed] * 3
    assert get_key_view(till, admin_key, key.id).used_activations == 3


def test_a_model_named_twice_reaches_the_provider_once(
    till: Till, admin_key: str, mock_upstream: Mock
) -> None:
    # Till reads the last copy of a repeated field; a provider reading the first would count
    # tokens for a model the key may not use. No SDK sends this: raw HTTP does.
    with sdk(till, admin_key) as client:
        key = client.create_key("anthropic", ANTHROPIC_KEY, 10, allowed_models=["claude-sonnet*"])
    assert key.scoped_key is not None
    mock_upstream.reset()
    raw = (
        b'{"model": "claude-opus-4-1", "messages": [{"role": "user", "content": "Hi"}],'
        b' "model": "claude-sonnet-4-6"}'
    )
    headers = {
        "x-api-key": key.scoped_key,
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    resp = httpx.post(
        f"{till.url}/v1/messages/count_tokens", content=raw, headers=headers, timeout=30
    )
    assert resp.status_code == 200, resp.text
    (seen,) = mock_upstream.requests()
    assert seen["body"]["model"] == "claude-sonnet-4-6"  # type: ignore[index]
    # Re-encoded: one copy of each field, values as they came.
    once = b'{"model":"claude-sonnet-4-6","messages":[{"role": "user", "content": "Hi"}]}'
    assert int(seen["headers"]["content-length"]) == len(once)  # type: ignore[index]


def test_gemini_models_off_the_list_are_refused(
    till: Till, admin_key: str, mock_upstream: Mock
) -> None:
    with sdk(till, admin_key) as client:
        key = client.create_key("google", GOOGLE_KEY, 100, allowed_models=["gemini-2.5-flash"])
    mock_upstream.reset()
    allowed, other = "gemini-2.5-flash", "gemini-2.5-pro"
    with gemini(till, key.scoped_key) as google:
        google.models.generate_content(model=allowed, contents="Hello")
        google.models.generate_content(model=f"models/{allowed}", contents="Hello")
        google.models.count_tokens(model=allowed, contents="Hello")
        refused = [
            lambda: google.models.generate_content(model=other, contents="Hello"),
            lambda: list(google.models.generate_content_stream(model=other, contents="Hello")),
            lambda: google.models.count_tokens(model=other, contents="Hello"),
            lambda: google.models.embed_content(model="gemini-embedding-001", contents="Hello"),
        ]
        for call in refused:
            with pytest.raises(genai_errors.ClientError) as caught:
                call()
            assert (caught.value.code, caught.value.status) == (403, "PERMISSION_DENIED")
            details = caught.value.details
            assert isinstance(details, dict)
            assert details["error"]["till_code"] == "model_not_allowed"
    with oa(till, key.scoped_key, max_retries=2) as ai, pytest.raises(openai.PermissionDeniedError):
        ai.chat.completions.create(model=other, messages=MESSAGES)
    assert [r["model"] for r in mock_upstream.requests()] == [allowed] * 3
    assert get_key_view(till, admin_key, key.id).used_activations == 3


# --- 3. rate: 429 with Retry-After, which the provider SDKs wait out ---


def test_rpm_refuses_with_retry_after_and_the_openai_sdk_waits_it_out(
    quiet: tuple[Till, RedisServer], mock_upstream: Mock
) -> None:
    till, _ = quiet
    admin_key = till.new_tenant("rate")
    with sdk(till, admin_key) as client:
        openai_key = client.create_key("openai", UPSTREAM_KEY, 100, rpm=2)
        claude_key = client.create_key("anthropic", ANTHROPIC_KEY, 100, rpm=1)
        gemini_key = client.create_key("google", GOOGLE_KEY, 100, rpm=1)
    mock_upstream.reset()
    # Early in a window, so that every request below falls in it.
    time.sleep(RATE_WINDOW - time.time() % RATE_WINDOW + 0.05)
    with oa(till, openai_key.scoped_key, max_retries=0) as ai:
        for _ in range(2):
            ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    headers = caught.value.response.headers
    wait_ms = int(headers["retry-after-ms"])
    assert 1000 < wait_ms <= RATE_WINDOW * 1000  # what is left of the window
    assert headers["retry-after"] == str(-(-wait_ms // 1000))
    error = error_of(caught.value)
    assert (error["code"], error["type"], error["limit"]) == ("rate_limited", "rate_limit_error", 2)

    with claude(till, claude_key.scoped_key, max_retries=0) as ac:
        ac.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as refused:
            ac.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=MESSAGES)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert error_of(refused.value)["type"] == "rate_limit_error"

    with gemini(till, gemini_key.scoped_key) as google:
        google.models.generate_content(model="gemini-2.5-flash", contents="Hello")
        with pytest.raises(genai_errors.ClientError) as denied:
            google.models.generate_content(model="gemini-2.5-flash", contents="Hello")
    assert (denied.value.code, denied.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert len(mock_upstream.requests()) == 4

    # With retries on (its default), the SDK sleeps what Retry-After says, then gets through.
    start = time.monotonic()
    with oa(till, openai_key.scoped_key, max_retries=2) as ai:
        ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert time.monotonic() - start >= 0.5
    assert len(mock_upstream.requests()) == 5
    with sdk(till, admin_key) as client:
        after = client.get_key(openai_key.id)
    assert (after.used_activations, after.rpm, after.in_flight) == (3, 2, 0)


# --- 4. concurrency ---


def test_a_third_stream_waits_for_one_of_two_to_end(
    till: Till, admin_key: str, admin: httpx.Client, mock_upstream: Mock
) -> None:
    with sdk(till, admin_key) as client:
        key = client.create_key("openai", UPSTREAM_KEY, 100, max_concurrent=2)
    mock_upstream.reset()
    slow = {"x-mock-delay-ms": "100", "x-mock-output-tokens": "3"}
    with oa(till, key.scoped_key, max_retries=0) as ai:
        first = ai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=slow
        )
        second = ai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=slow
        )
        assert get_key(admin, key.id)["inFlight"] == 2
        with pytest.raises(openai.RateLimitError) as caught:
            ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.response.headers["retry-after"] == "1"
        error = error_of(caught.value)
        assert (error["code"], error["limit"], error["used"]) == ("concurrency_limit_reached", 2, 2)
        assert len(mock_upstream.requests()) == 2
        # The stream's end reaches the client after its settlement: the slot is free by then.
        assert "".join(c.choices[0].delta.content or "" for c in first if c.choices)
        ai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        second.close()  # the client leaves mid-stream: its slot is given back too
    deadline = time.monotonic() + 10
    while get_key(admin, key.id)["inFlight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = get_key(admin, key.id)
    assert (after["inFlight"], after["usedActivations"], after["maxConcurrent"]) == (0, 3, 2)


async def test_max_concurrent_is_exact_under_a_hundred_concurrent_requests(
    till: Till, admin_key: str, admin: httpx.Client, mock_upstream: Mock
) -> None:
    limit = 5
    with sdk(till, admin_key) as client:
        key = client.create_key("openai", UPSTREAM_KEY, 1000, max_concurrent=limit)
    mock_upstream.reset()
    slow = {"x-mock-delay-ms": "600"}
    async with openai.AsyncOpenAI(
        api_key=key.scoped_key, base_url=f"{till.url}/v1", max_retries=0
    ) as ai:
        results = await asyncio.gather(
            *(
                ai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=slow)
                for _ in range(100)
            ),
            return_exceptions=True,
        )
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(served) + len(refused) == 100, [r for r in results if isinstance(r, Exception)][:3]
    assert {error_of(r)["code"] for r in refused} == {"concurrency_limit_reached"}
    assert all(r.response.headers["retry-after"] == "1" for r in refused)
    seen = mock_upstream.requests()
    assert len(seen) == len(served) >= limit
    # Never more than `limit` in flight at the provider, and `limit` at once at some point.
    events = sorted(
        [(float(r["started_at"]), 1) for r in seen] + [(float(r["ended_at"]), -1) for r in seen]
    )
    peak = level = 0
    for _, step in events:  # an end sorts before a start at the same instant
        level += step
        peak = max(peak, level)
    assert peak == limit
    after = get_key(admin, key.id)
    assert (after["usedActivations"], after["inFlight"]) == (len(served), 0)
