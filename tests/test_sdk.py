"""The SDK against a live Till: models, errors, retries, environment, and the OpenAI helper.

Servers that are down or failing are real sockets on 127.0.0.1: a closed port, a listener that
never answers, or a scripted http.server that answers 503 and then 200.
"""

from __future__ import annotations

import inspect
import json
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

import till
from tests.conftest import UPSTREAM_KEY, Mock, Till, free_port
from till import (
    AccountSummary,
    APIConnectionError,
    APITimeoutError,
    AsyncTillClient,
    AuthenticationError,
    LimitError,
    NotFoundError,
    RateLimitError,
    ScopedKey,
    ScopedKeyCreate,
    ServerError,
    TillClient,
    TillError,
    ValidationError,
)
from till.errors import error_class
from till.openai_compat import patched_async_openai, patched_openai

MESSAGES = [{"role": "user", "content": "Hello there"}]
ACCOUNT = {
    "account": {
        "scope": "tenant",
        "keysUsed": 1,
        "tenants": 1,
        "activationsUsedThisMonth": 3,
        "tenant": {"id": "t1", "email": "a@b.c", "plan": "pro", "maxKeys": 5},
    }
}
KEY = {"key": {"id": "abcdefghijklmnop", "provider": "openai", "maxActivations": 5}}


# --- a scripted server for failures a healthy Till does not produce ---


@dataclass
class Scripted:
    url: str
    seen: list[tuple[str, str, float]] = field(default_factory=list)


Reply = tuple[int, dict[str, str], Any]


@contextmanager
def scripted(*replies: Reply) -> Iterator[Scripted]:
    """Answers with ``replies`` in order, repeating the last one."""
    state = Scripted("")

    class Handler(BaseHTTPRequestHandler):
        def reply(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            state.seen.append((self.command, self.path, time.monotonic()))
            status, headers, body = replies[min(len(state.seen), len(replies)) - 1]
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = reply

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def silent_listener() -> Iterator[str]:
    """Accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def assert_clean(exc: TillError) -> None:
    """A Till error with no httpx exception in it or behind it."""
    assert not isinstance(exc, httpx.HTTPError)
    assert exc.__cause__ is None and exc.__suppress_context__
    text = "".join(traceback.format_exception(exc))
    assert "httpx" not in text and "During handling" not in text, text


# --- the public surface ---


def test_all_is_the_public_surface() -> None:
    errors = {
        "TillError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
        "ValidationError", "LimitError", "RateLimitError", "ServerError",
        "APIConnectionError", "APITimeoutError", "ConflictError",
    }  # fmt: skip
    models = {
        "ScopedKey", "ScopedKeyCreate", "ScopedKeyUpdate", "ChildKeyCreate", "AccountSummary",
        "Tenant",
    }  # fmt: skip
    clients = {"TillClient", "AsyncTillClient", "KeyClient", "AsyncKeyClient"}
    assert set(till.__all__) == clients | errors | models
    assert len(till.__all__) == len(set(till.__all__))
    for name in errors:
        assert issubclass(getattr(till, name), TillError)
    assert issubclass(APITimeoutError, APIConnectionError)
    assert isinstance(till.__version__, str) and till.__version__
    from till.client import AsyncTillClient as A
    from till.client import TillError as E

    assert A is AsyncTillClient and E is TillError


def test_errors_are_data() -> None:
    e = LimitError(
        403, "max_keys_reached", "All 10 keys in use.", request_id="r1",
        details={"limit": 10, "used": 10, "remaining": 0},
    )  # fmt: skip
    assert str(e) == e.message == "All 10 keys in use."
    assert (e.limit, e.used, e.remaining) == (10, 10, 0)
    assert repr(e).startswith("LimitError(status_code=403, code='max_keys_reached'")
    copy = pickle.loads(pickle.dumps(e))  # noqa: S301
    assert type(copy) is LimitError and vars(copy) == vars(e) and str(copy) == str(e)
    for code in ("rate_limited", "concurrency_limit_reached"):
        assert error_class(429, code) is RateLimitError
    legacy = TillError(500, "internal_error", "boom")  # the published positional form
    assert (legacy.request_id, legacy.details, legacy.limit) == (None, {}, None)


def public(cls: type) -> dict[str, Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def test_sync_and_async_clients_mirror_each_other() -> None:
    sync, async_ = public(TillClient), public(AsyncTillClient)
    assert sync.keys() == async_.keys()
    assert {"create_key", "list_keys", "get_key", "revoke_key", "account", "close"} <= set(sync)
    for name, member in sync.items():
        if not callable(member):
            continue
        assert not inspect.iscoroutinefunction(member), name
        assert inspect.iscoroutinefunction(async_[name]), name
        sync_params = inspect.signature(member).parameters
        async_params = inspect.signature(async_[name]).parameters
        assert list(sync_params) == list(async_params), name
        for p in sync_params:
            assert sync_params[p].kind == async_params[p].kind, (name, p)
            assert sync_params[p].default == async_params[p].default, (name, p)
    init, ainit = (inspect.signature(c.__init__).parameters for c in (TillClient, AsyncTillClient))
    assert list(init) == list(ainit)


# --- against a live Till ---


@pytest.fixture(scope="module")
def admin_key(till: Till) -> str:
    """One tenant per server for this module: making tenants is the slow part."""
    return till.new_tenant("sdk")


def test_round_trip(till: Till, admin_key: str) -> None:
    with TillClient(admin_key=admin_key, base_url=till.url) as client:
        live = client.account().keys_used
        key = client.create_key(
            "openai",
            UPSTREAM_KEY,
            7,
            name="sdk",
            metadata={"team": "blue"},
            ip_whitelist=["127.0.0.1", "10.0.0.0/8"],
            max_tokens=1000,
            max_spend_cents=250,
        )
        assert key.scoped_key is not None and key.scoped_key.startswith("till_sk_")
        assert key.scoped_key not in repr(key) and UPSTREAM_KEY not in repr(key)
        assert key.metadata == {"team": "blue", "name": "sdk"} and key.name == "sdk"
        assert (key.provider, key.status, key.max_activations) == ("openai", "active", 7)
        assert key.ip_whitelist == ["127.0.0.1/32", "10.0.0.0/8"]
        assert (key.max_tokens, key.max_spend_cents) == (1000, 250)
        assert (key.remaining_activations, key.remaining_tokens) == (7, 1000)
        assert key.remaining_spend_cents == 250 and key.held_tokens == 0
        assert key.created_at and key.last_used_at is None

        fetched = client.get_key(key.id)
        assert fetched.scoped_key is None
        assert fetched == ScopedKey(**{**vars(key), "scoped_key": None})
        assert key.id in [k.id for k in client.list_keys()]

        account = client.account()
        assert isinstance(account, AccountSummary) and account.tenant is not None
        assert (account.scope, account.tenant.plan) == ("tenant", "pro")
        assert account.keys_used == live + 1
        assert account.tenant.max_keys == 1000 and account.tenant.name == "sdk"

        revoked = client.revoke_key(key.id)
        assert revoked.status == "revoked" and client.get_key(key.id).status == "revoked"
        assert client.account().keys_used == live


def test_keys_with_expiry_models_and_rate_limits(till: Till, admin_key: str) -> None:
    at = datetime.now(UTC) + timedelta(days=7)
    with TillClient(admin_key=admin_key, base_url=till.url) as client:
        key = client.create_key(
            "openai", UPSTREAM_KEY, 7, expires_at=at, allowed_models=["gpt-4o*", "o3"],
            rpm=30, max_concurrent=3,
        )  # fmt: skip
        assert key.expires_at == at.isoformat(timespec="seconds").replace("+00:00", ".000Z")
        assert key.allowed_models == ["gpt-4o*", "o3"]
        assert (key.rpm, key.max_concurrent, key.in_flight, key.status) == (30, 3, 0, "active")
        assert client.get_key(key.id) == ScopedKey(**{**vars(key), "scoped_key": None})
        plain = client.create_key("openai", UPSTREAM_KEY, 7)
        assert (plain.expires_at, plain.allowed_models, plain.rpm, plain.max_concurrent) == (
            None, None, None, None
        )  # fmt: skip
        with pytest.raises(ValidationError) as caught:
            client.create_key("openai", UPSTREAM_KEY, 7, expires_at=at, ttl_seconds=60)
        assert caught.value.status_code == 422 and "not both" in str(caught.value)


async def test_async_keys_with_expiry_and_limits(till: Till, admin_key: str) -> None:
    async with AsyncTillClient(admin_key=admin_key, base_url=till.url) as client:
        key = await client.create_key(
            "google", "AIzaTest0123", 3, ttl_seconds=600, allowed_models=["gemini-2.5-*"],
            max_concurrent=1,
        )  # fmt: skip
        assert key.expires_at is not None and key.allowed_models == ["gemini-2.5-*"]
        assert (key.rpm, key.max_concurrent) == (None, 1)
        assert (await client.get_key(key.id)).expires_at == key.expires_at


def test_create_params_travel_as_the_api_names_them() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    body = ScopedKeyCreate(
        "openai", "sk-x", 3, expires_at=datetime(2031, 2, 3, 4, 5, 6, tzinfo=india),
        allowed_models=["a*"], rpm=5, max_concurrent=2,
    ).to_dict()  # fmt: skip
    assert body == {
        "provider": "openai", "upstream_key": "sk-x", "max_activations": 3,
        "expires_at": "2031-02-03T04:05:06+05:30", "allowed_models": ["a*"], "rpm": 5,
        "max_concurrent": 2,
    }  # fmt: skip
    assert ScopedKeyCreate("openai", "sk-x", 3, ttl_seconds=9).to_dict()["ttl_seconds"] == 9
    # An unset field is not sent at all: an older server refuses fields it does not know.
    assert set(ScopedKeyCreate("openai", "sk-x", 3).to_dict()) == {
        "provider", "upstream_key", "max_activations"
    }  # fmt: skip


async def test_async_round_trip(till: Till, admin_key: str) -> None:
    async with AsyncTillClient(admin_key=admin_key, base_url=till.url) as client:
        live = (await client.account()).keys_used
        key = await client.create_key("anthropic", "sk-ant-test", 3, name="async")
        assert key.scoped_key and key.provider == "anthropic" and key.name == "async"
        assert (await client.get_key(key.id)).id == key.id
        assert key.id in [k.id for k in await client.list_keys()]
        assert (await client.account()).keys_used == live + 1
        assert (await client.revoke_key(key.id)).status == "revoked"


def test_wrong_admin_key_is_an_authentication_error(till: Till) -> None:
    client = TillClient(admin_key="till_admin_wrong", base_url=till.url)
    with client, pytest.raises(AuthenticationError) as info:
        client.list_keys()
    e = info.value
    assert (e.status_code, e.code) == (401, "unauthorized") and str(e)
    assert isinstance(e, TillError)


async def test_async_wrong_admin_key_is_an_authentication_error(till: Till) -> None:
    async with AsyncTillClient(admin_key="till_admin_wrong", base_url=till.url) as client:
        with pytest.raises(AuthenticationError):
            await client.account()


def test_unknown_key_is_not_found(till: Till, admin_key: str) -> None:
    with TillClient(admin_key=admin_key, base_url=till.url) as client:
        for call in (client.get_key, client.revoke_key):
            with pytest.raises(NotFoundError) as info:
                call("aaaaaaaaaaaaaaaa")
            assert (info.value.status_code, info.value.code) == (404, "not_found")
        with pytest.raises(NotFoundError):
            client.get_key("no such key?")
        # An id is one path segment, whatever it holds: this one never reaches /admin/account.
        with pytest.raises(TillError) as info:
            client.get_key("../account")
        assert info.value.status_code in (404, 405)


def test_plan_key_limit_is_a_limit_error(till: Till) -> None:
    with TillClient(admin_key=till.new_tenant("small", plan="free"), base_url=till.url) as c:
        for _ in range(10):
            c.create_key("openai", UPSTREAM_KEY, 1)
        with pytest.raises(LimitError) as info:
            c.create_key("openai", UPSTREAM_KEY, 1)
    e = info.value
    assert (e.status_code, e.code) == (403, "max_keys_reached")
    assert (e.limit, e.used, e.remaining) == (10, 10, 0)
    assert e.details == {"limit": 10, "used": 10, "remaining": 0}


def test_invalid_request_is_a_validation_error(till: Till, admin_key: str) -> None:
    client = TillClient(admin_key=admin_key, base_url=till.url)
    with client, pytest.raises(ValidationError) as info:
        client.create_key("openai", UPSTREAM_KEY, 0)
    assert (info.value.status_code, info.value.code) == (422, "validation_error")
    assert "max_activations" in str(info.value) and UPSTREAM_KEY not in str(info.value)


# --- connection failures ---


def test_server_down_is_a_clean_connection_error() -> None:
    client = TillClient("till_admin_x", closed_url(), max_retries=0)
    with client, pytest.raises(TillError) as info:
        client.account()
    assert type(info.value) is APIConnectionError
    assert (info.value.status_code, info.value.code) == (0, "connection_error")
    assert_clean(info.value)


async def test_async_server_down_is_a_clean_connection_error() -> None:
    async with AsyncTillClient("till_admin_x", closed_url(), max_retries=0) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.create_key("openai", UPSTREAM_KEY, 1)
    assert info.value.status_code == 0
    assert_clean(info.value)


def test_no_answer_in_time_is_a_timeout() -> None:
    with (
        silent_listener() as url,
        TillClient("till_admin_x", url, 0.3, max_retries=0) as client,
        pytest.raises(APITimeoutError) as info,
    ):
        client.list_keys()
    assert (info.value.status_code, info.value.code) == (0, "timeout")
    assert isinstance(info.value, APIConnectionError)
    assert_clean(info.value)


# --- retries ---


def test_reads_retry_a_503_after_the_delay_it_asks_for() -> None:
    unavailable = {"error": {"code": "store_unavailable", "message": "retry shortly"}}
    with (
        scripted((503, {"retry-after": "1"}, unavailable), (200, {}, ACCOUNT)) as server,
        TillClient("till_admin_x", server.url) as client,
    ):
        account = client.account()
    assert account.keys_used == 1 and account.tenant is not None
    assert account.tenant.plan == "pro" and account.tenant.max_activations_per_month == 0
    (_, _, first), (_, _, second) = server.seen
    assert second - first >= 0.95


@pytest.mark.parametrize("status", [429, 500, 502, 504])
async def test_reads_retry_429_and_5xx_then_give_up(status: int) -> None:
    failing = (status, {"retry-after": "0", "x-till-request-id": "req-1"}, b"<html>down</html>")
    with scripted(failing) as server:
        async with AsyncTillClient("till_admin_x", server.url, max_retries=2) as client:
            with pytest.raises(TillError) as info:
                await client.revoke_key("aaaaaaaaaaaaaaaa")
    assert len(server.seen) == 3 and {m for m, _, _ in server.seen} == {"DELETE"}
    e = info.value
    assert (e.status_code, e.code, e.request_id) == (status, "unknown", "req-1")
    assert type(e).__name__ == ("RateLimitError" if status == 429 else "ServerError")


def test_create_key_is_not_retried_on_a_5xx() -> None:
    unavailable = {"error": {"code": "store_unavailable", "message": "retry shortly"}}
    with (
        scripted((503, {"retry-after": "0"}, unavailable), (201, {}, KEY)) as server,
        TillClient("till_admin_x", server.url) as client,
        pytest.raises(ServerError) as info,
    ):
        client.create_key("openai", UPSTREAM_KEY, 5)
    assert [m for m, _, _ in server.seen] == ["POST"]
    assert (info.value.status_code, info.value.code) == (503, "store_unavailable")


def flaky_transport(first: type[httpx.TransportError], seen: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if len(seen) == 1:
            raise first("simulated", request=request)
        return httpx.Response(201, json=KEY)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    ("failure", "retried"),
    [(httpx.ConnectError, True), (httpx.ConnectTimeout, True), (httpx.ReadError, False),
     (httpx.ReadTimeout, False), (httpx.RemoteProtocolError, False)],
)  # fmt: skip
def test_create_key_is_retried_only_when_nothing_was_sent(
    failure: type[httpx.TransportError], retried: bool
) -> None:
    seen: list[str] = []
    http = httpx.Client(transport=flaky_transport(failure, seen))
    with TillClient("till_admin_x", "http://till.test", http_client=http) as client:
        if retried:
            assert client.create_key("openai", UPSTREAM_KEY, 5).id == "abcdefghijklmnop"
        else:
            with pytest.raises(APIConnectionError) as info:
                client.create_key("openai", UPSTREAM_KEY, 5)
            assert_clean(info.value)
    assert seen == ["POST"] * (2 if retried else 1)
    assert not http.is_closed  # injected: the caller's to close
    http.close()


async def test_async_create_key_is_retried_only_when_nothing_was_sent() -> None:
    for failure, attempts in ((httpx.ConnectError, 2), (httpx.ReadError, 1)):
        seen: list[str] = []
        http = httpx.AsyncClient(transport=flaky_transport(failure, seen))
        async with AsyncTillClient("till_admin_x", "http://till.test", http_client=http) as c:
            with suppress(APIConnectionError):
                await c.create_key("openai", UPSTREAM_KEY, 5)
        assert len(seen) == attempts
        await http.aclose()


def test_odd_answers_are_till_errors() -> None:
    with (
        scripted((200, {}, {"hello": "world"})) as server,
        TillClient("till_admin_x", server.url) as client,
        pytest.raises(TillError) as info,
    ):
        client.get_key("abc")
    assert (info.value.status_code, info.value.code) == (200, "invalid_response")
    with (
        scripted((502, {}, b"Bad Gateway")) as server,
        TillClient("till_admin_x", server.url, max_retries=0) as client,
        pytest.raises(ServerError) as err,
    ):
        client.list_keys()
    assert (err.value.code, str(err.value)) == ("unknown", f"HTTP 502 from {server.url}/admin/keys")


# --- configuration from the environment ---


def test_environment_supplies_url_and_admin_key(
    till: Till, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TILL_URL", till.url + "/")
    monkeypatch.setenv("TILL_ADMIN_KEY", admin_key)
    with TillClient() as client:
        assert client.base_url == till.url
        assert client.account().tenant is not None
    # Arguments win over the environment.
    monkeypatch.setenv("TILL_URL", closed_url())
    client = TillClient(admin_key="till_admin_wrong", base_url=till.url)
    with client, pytest.raises(AuthenticationError):
        client.account()


def test_missing_configuration_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILL_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TILL_URL", raising=False)
    with pytest.raises(TillError, match="TILL_ADMIN_KEY") as info:
        TillClient()
    assert (info.value.status_code, info.value.code) == (0, "missing_admin_key")
    with pytest.raises(TillError) as bad:
        AsyncTillClient("till_admin_x", "api.till.ac")
    assert bad.value.code == "invalid_base_url"
    client = TillClient("till_admin_x")
    assert client.base_url == "https://api.till.ac" and client.max_retries == 2
    client.close()


# --- lenient models ---


def test_models_ignore_unknown_fields_and_default_missing_ones() -> None:
    key = ScopedKey.from_dict(
        {"id": "k", "maxActivations": 10, "usedActivations": 4, "maxTokens": 100,
         "usedTokens": 30, "heldTokens": 20, "maxSpendCents": 5, "usedSpendCents": 1.5,
         "futureField": {"x": 1}, "metadata": None, "ipWhitelist": None, "lastUsedAt": 7}
    )  # fmt: skip
    assert (key.id, key.tenant_id, key.status, key.metadata, key.ip_whitelist) == (
        "k", "", "", {}, []
    )  # fmt: skip
    assert key.last_used_at is None and key.scoped_key is None
    # Fields newer than the 0.1 contract are derived when an older server leaves them out.
    assert (key.remaining_activations, key.remaining_tokens) == (6, 50)
    assert key.remaining_spend_cents == 3.5 and key.used_spend_microcents == 1_500_000
    empty = ScopedKey.from_dict({})
    assert (empty.max_activations, empty.remaining_tokens, empty.max_spend_cents) == (0, None, None)
    # An older server's answer has no expiry, model list or rate limits: none, not an error.
    assert (key.expires_at, key.allowed_models, key.rpm, key.max_concurrent, key.in_flight) == (
        None, None, None, None, 0
    )  # fmt: skip
    newer = ScopedKey.from_dict(
        {"expiresAt": "2031-01-01T00:00:00.000Z", "allowedModels": ["a*", 3], "rpm": 6,
         "maxConcurrent": 2, "inFlight": 1}
    )  # fmt: skip
    assert (newer.expires_at, newer.allowed_models) == ("2031-01-01T00:00:00.000Z", ["a*"])
    assert (newer.rpm, newer.max_concurrent, newer.in_flight) == (6, 2, 1)
    account = AccountSummary.from_dict({"scope": "admin", "tenants": 3, "new": True})
    assert (account.tenant, account.tenants, account.keys_used) == (None, 3, 0)
    full = AccountSummary.from_dict(ACCOUNT["account"])
    assert full.tenant is not None and full.tenant.status == "" and full.tenant.max_keys == 5


# --- the OpenAI helper, end to end through Till to the mock upstream ---


def test_patched_openai_through_till(till: Till, admin_key: str, mock_upstream: Mock) -> None:
    with TillClient(admin_key=admin_key, base_url=till.url) as admin:
        key = admin.create_key("openai", UPSTREAM_KEY, 5, max_tokens=10_000)
        assert key.scoped_key is not None
        mock_upstream.reset()
        with patched_openai(key.scoped_key, base_url=f"{till.url}/v1", max_retries=0) as oa:
            assert isinstance(oa, openai.OpenAI)
            reply = oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content and reply.usage is not None
        (seen,) = mock_upstream.requests()
        assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # type: ignore[index]
        after = admin.get_key(key.id)
        assert (after.used_activations, after.used_tokens) == (1, reply.usage.total_tokens)
        assert after.remaining_tokens == 10_000 - reply.usage.total_tokens
        admin.revoke_key(key.id)
        oa = patched_openai(key.scoped_key, base_url=f"{till.url}/v1", max_retries=0)
        with oa, pytest.raises(openai.AuthenticationError):
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


async def test_patched_async_openai_follows_till_url(
    till: Till, admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncTillClient(admin_key=admin_key, base_url=till.url) as admin:
        key = await admin.create_key("openai", UPSTREAM_KEY, 5)
    assert key.scoped_key is not None
    monkeypatch.setenv("TILL_URL", till.url)
    async with patched_async_openai(key.scoped_key) as oa:
        assert isinstance(oa, openai.AsyncOpenAI) and str(oa.base_url) == f"{till.url}/v1/"
        reply = await oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content


def test_openai_helper_defaults_and_missing_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILL_URL", raising=False)
    with patched_openai("till_sk_x.y") as oa:
        assert str(oa.base_url) == "https://api.till.ac/v1/"
    monkeypatch.setitem(sys.modules, "openai", None)
    for helper in (patched_openai, patched_async_openai):
        with pytest.raises(ImportError, match=r"pip install till-ac\[openai\]"):
            helper("till_sk_x.y")
