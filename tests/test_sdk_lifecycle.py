"""The SDK over a key's lifecycle: ``update_key`` and ``top_up`` with the admin key, and
``KeyClient`` (the holder's own view, revocation and child keys) with the scoped key alone.

Live tests run the real SDK against `till serve` (both stores) and spend keys through the real
``openai`` SDK against the mock upstream; the rest check what travels, over httpx's
MockTransport.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

import till
from tests.conftest import UPSTREAM_KEY, Till, free_port
from till import (
    APIConnectionError,
    AsyncKeyClient,
    AsyncTillClient,
    AuthenticationError,
    ChildKeyCreate,
    ConflictError,
    KeyClient,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    ScopedKey,
    ScopedKeyUpdate,
    ServerError,
    TillClient,
    TillError,
    ValidationError,
)
from till import client as client_module
from till import errors as errors_module
from till.errors import error_class

MESSAGES = [{"role": "user", "content": "Hello there"}]
TOKEN = "till_sk_abcdefghijklmnop.c2VjcmV0LXNlYWxlZC1wYXJ0"
KEY = {"key": {"id": "abcdefghijklmnop", "provider": "openai", "maxActivations": 5}}


def chat(till: Till, token: str) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", max_retries=0) as oa:
        return oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]


def refused(till: Till, token: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        chat(till, token)
    return caught.value


# --- the public surface ---


def test_new_names_are_exported() -> None:
    new = ("KeyClient", "AsyncKeyClient", "ConflictError", "ScopedKeyUpdate", "ChildKeyCreate")
    for name in new:
        assert name in till.__all__, name
    assert till.ConflictError is client_module.ConflictError is errors_module.ConflictError
    assert issubclass(ConflictError, TillError) and "ConflictError" in client_module.__all__
    assert {"KeyClient", "AsyncKeyClient"} <= set(client_module.__all__)
    assert error_class(409, "already_revoked") is ConflictError
    assert error_class(402, "parent_limit_exceeded") is LimitError


def public(cls: type) -> dict[str, Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


@pytest.mark.parametrize(
    ("sync", "async_"), [(TillClient, AsyncTillClient), (KeyClient, AsyncKeyClient)]
)
def test_sync_and_async_mirror_each_other(sync: type, async_: type) -> None:
    names, anames = public(sync), public(async_)
    assert names.keys() == anames.keys()
    expected = {"update_key", "top_up"} if sync is TillClient else {"info", "revoke"}
    assert expected | {"close"} <= set(names)
    for name, member in names.items():
        assert not inspect.iscoroutinefunction(member), name
        assert inspect.iscoroutinefunction(anames[name]), name
        params = inspect.signature(member).parameters
        aparams = inspect.signature(anames[name]).parameters
        assert [(p.name, p.kind, p.default) for p in params.values()] == [
            (p.name, p.kind, p.default) for p in aparams.values()
        ], name
    init, ainit = (inspect.signature(c).parameters for c in (sync, async_))
    assert list(init) == list(ainit) and next(iter(init)) in ("admin_key", "scoped_key")


# --- what travels ---


def test_update_params_travel_as_the_api_names_them() -> None:
    body = ScopedKeyUpdate(
        name="n", metadata={"team": "red"}, max_activations=9, max_tokens=100,
        max_spend_cents=50, rpm=6, max_concurrent=2, remove_limits=(),
    ).to_dict()  # fmt: skip
    assert body == {
        "name": "n", "metadata": {"team": "red"}, "max_activations": 9, "max_tokens": 100,
        "max_spend_cents": 50, "rpm": 6, "max_concurrent": 2,
    }  # fmt: skip
    adds = ScopedKeyUpdate(add_activations=1, add_tokens=2, add_spend_cents=3).to_dict()
    assert adds == {"add_activations": 1, "add_tokens": 2, "add_spend_cents": 3}
    # A removed limit travels as JSON null; an unset field does not travel at all.
    removed = ScopedKeyUpdate(remove_limits=("max_tokens", "rpm"), add_activations=4)
    assert json.dumps(removed.to_dict()) == (
        '{"add_activations": 4, "max_tokens": null, "rpm": null}'
    )
    assert ScopedKeyUpdate().to_dict() == {}
    assert ScopedKeyUpdate(metadata={}).to_dict() == {"metadata": {}}  # clears the metadata
    with pytest.raises(ValueError, match="unknown limit 'max_activations'"):
        ScopedKeyUpdate(remove_limits=("max_activations",))
    with pytest.raises(ValueError, match="rpm is both set and removed"):
        ScopedKeyUpdate(rpm=5, remove_limits=("rpm",))
    with pytest.raises(ValueError, match="list of names"):
        ScopedKeyUpdate(remove_limits="rpm")  # type: ignore[arg-type]


def test_child_params_travel_as_the_api_names_them() -> None:
    body = ChildKeyCreate(
        3, name="sub", metadata={"job": "7"}, max_tokens=10, max_spend_cents=20,
        ttl_seconds=60, allowed_models=["gpt-4o*"], ip_whitelist=["10.0.0.0/8"], rpm=5,
        max_concurrent=1,
    ).to_dict()  # fmt: skip
    assert body == {
        "max_activations": 3, "metadata": {"job": "7", "name": "sub"}, "max_tokens": 10,
        "max_spend_cents": 20, "ttl_seconds": 60, "allowed_models": ["gpt-4o*"],
        "ip_whitelist": ["10.0.0.0/8"], "rpm": 5, "max_concurrent": 1,
    }  # fmt: skip
    assert ChildKeyCreate(1).to_dict() == {"max_activations": 1}
    at = ChildKeyCreate(1, expires_at="2031-01-01T00:00:00Z").to_dict()
    assert at == {"max_activations": 1, "expires_at": "2031-01-01T00:00:00Z"}


def test_models_read_parent_id() -> None:
    assert ScopedKey.from_dict({"id": "c", "parentId": "p"}).parent_id == "p"
    assert ScopedKey.from_dict({"id": "c", "parentId": None}).parent_id is None
    assert ScopedKey.from_dict({"id": "c"}).parent_id is None  # an older server


Seen = list[httpx.Request]
Handler = Callable[[httpx.Request], httpx.Response]


def recording(seen: Seen, answer: Handler | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request) if answer else httpx.Response(200, json=KEY)

    return httpx.MockTransport(handle)


def sent(request: httpx.Request) -> tuple[str, str, Any]:
    return request.method, request.url.raw_path.decode(), json.loads(request.content or b"null")


def test_update_and_top_up_send_a_patch() -> None:
    seen: Seen = []
    http = httpx.Client(transport=recording(seen))
    with TillClient("till_admin_x", "http://till.test", http_client=http) as client:
        key = client.update_key("k/1", name="n", max_tokens=5, remove_limits=["rpm"])
        assert key.id == "abcdefghijklmnop"
        client.top_up("abc", activations=2, spend_cents=30)
        client.update_key("abc", remove_limits=("max_spend_cents", "max_concurrent"))
        with pytest.raises(ValueError, match="at least one change"):
            client.update_key("abc")
        with pytest.raises(ValueError, match="activations, tokens or spend_cents"):
            client.top_up("abc")
        with pytest.raises(ValueError, match="list of names"):
            client.update_key("abc", remove_limits="rpm")
    assert [sent(r) for r in seen] == [
        ("PATCH", "/admin/keys/k%2F1", {"name": "n", "max_tokens": 5, "rpm": None}),
        ("PATCH", "/admin/keys/abc", {"add_activations": 2, "add_spend_cents": 30}),
        ("PATCH", "/admin/keys/abc", {"max_spend_cents": None, "max_concurrent": None}),
    ]  # nothing sent for the refused calls
    assert seen[0].headers["authorization"] == "Bearer till_admin_x"
    http.close()


def flaky(first: type[httpx.TransportError] | int, seen: Seen) -> httpx.MockTransport:
    """Fails the first request (a transport error, or that status), then answers 200."""

    def answer(request: httpx.Request) -> httpx.Response:
        if len(seen) == 1:
            if isinstance(first, int):
                unavailable = {"error": {"code": "store_unavailable", "message": "later"}}
                return httpx.Response(first, headers={"retry-after": "0"}, json=unavailable)
            raise first("simulated", request=request)
        return httpx.Response(200, json=KEY)

    return recording(seen, answer)


@pytest.mark.parametrize(
    ("failure", "retried"),
    [(httpx.ConnectError, True), (httpx.PoolTimeout, True), (httpx.ReadError, False),
     (httpx.ReadTimeout, False), (503, False)],
)  # fmt: skip
def test_a_top_up_is_retried_only_when_nothing_was_sent(
    failure: type[httpx.TransportError] | int, retried: bool
) -> None:
    # A top-up that reached Till may have added already: repeating it would add twice.
    for call in ("top_up", "update_key"):
        seen: Seen = []
        http = httpx.Client(transport=flaky(failure, seen))
        with TillClient("till_admin_x", "http://till.test", http_client=http) as client:
            method = getattr(client, call)
            kwargs = {"activations": 5} if call == "top_up" else {"add_tokens": 5}
            if retried:
                assert method("abc", **kwargs).id == "abcdefghijklmnop"
            else:
                with pytest.raises((APIConnectionError, ServerError)):
                    method("abc", **kwargs)
        assert [r.method for r in seen] == ["PATCH"] * (2 if retried else 1)
        http.close()


async def test_async_update_is_not_retried_after_sending() -> None:
    for failure, attempts in ((httpx.ConnectError, 2), (httpx.ReadError, 1), (502, 1)):
        seen: Seen = []
        http = httpx.AsyncClient(transport=flaky(failure, seen))
        async with AsyncTillClient("till_admin_x", "http://till.test", http_client=http) as c:
            try:
                await c.top_up("abc", tokens=3)
            except (APIConnectionError, ServerError):
                assert attempts == 1
        assert len(seen) == attempts, failure
        assert sent(seen[0]) == ("PATCH", "/admin/keys/abc", {"add_tokens": 3})
        await http.aclose()


def test_key_client_sends_the_scoped_key() -> None:
    seen: Seen = []
    http = httpx.Client(transport=recording(seen))
    with KeyClient(TOKEN, "http://till.test/", http_client=http) as mine:
        assert mine.info().id == "abcdefghijklmnop"
        mine.create_child(2, name="sub", ttl_seconds=60, allowed_models=["gpt-4o"])
        mine.revoke()
    assert [sent(r) for r in seen] == [
        ("GET", "/v1/till/key", None),
        ("POST", "/v1/till/keys",
         {"max_activations": 2, "metadata": {"name": "sub"}, "ttl_seconds": 60,
          "allowed_models": ["gpt-4o"]}),
        ("DELETE", "/v1/till/key", None),
    ]  # fmt: skip
    assert {r.headers["authorization"] for r in seen} == {f"Bearer {TOKEN}"}
    assert not http.is_closed  # injected: the caller's to close
    http.close()


@pytest.mark.parametrize(("call", "attempts"), [("info", 3), ("revoke", 3), ("create_child", 1)])
async def test_key_client_retries_reads_and_revocations_not_children(
    call: str, attempts: int
) -> None:
    unavailable = {"error": {"code": "store_unavailable", "message": "later"}}
    seen: Seen = []
    answer = httpx.Response(503, headers={"retry-after": "0"}, json=unavailable)
    http = httpx.AsyncClient(transport=recording(seen, lambda _: answer))
    async with AsyncKeyClient(TOKEN, "http://till.test", http_client=http) as mine:
        with pytest.raises(ServerError) as caught:
            await (mine.create_child(1) if call == "create_child" else getattr(mine, call)())
    assert len(seen) == attempts and caught.value.code == "store_unavailable"
    await http.aclose()


def test_key_client_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILL_SCOPED_KEY", raising=False)
    monkeypatch.delenv("TILL_URL", raising=False)
    # The admin key's variable does not stand in for the scoped key.
    monkeypatch.setenv("TILL_ADMIN_KEY", "till_admin_x")
    for cls in (KeyClient, AsyncKeyClient):
        with pytest.raises(TillError, match="TILL_SCOPED_KEY") as info:
            cls()
        assert (info.value.status_code, info.value.code) == (0, "missing_scoped_key")
        assert "scoped_key=" in str(info.value)
    with pytest.raises(TillError) as bad:
        KeyClient(TOKEN, "till.example")
    assert bad.value.code == "invalid_base_url" and TOKEN not in str(bad.value)
    monkeypatch.setenv("TILL_SCOPED_KEY", f" {TOKEN}\n")
    mine = KeyClient()
    assert mine.base_url == "https://api.till.ac" and mine.max_retries == 2
    assert TOKEN not in repr(mine) and "api.till.ac" in repr(mine)
    assert mine._build_request(mine._info()).headers["authorization"] == f"Bearer {TOKEN}"
    mine.close()
    # The provider SDKs' base URL works as well: one TILL_URL for both.
    monkeypatch.setenv("TILL_URL", "http://till.test:8787/v1/")
    with KeyClient() as mine:
        url = mine._build_request(mine._info()).url
        assert str(url) == "http://till.test:8787/v1/till/key"
    # The admin client still asks for its own key by its own name.
    monkeypatch.delenv("TILL_ADMIN_KEY")
    with pytest.raises(TillError) as admin:
        TillClient()
    assert admin.value.code == "missing_admin_key" and "TILL_ADMIN_KEY" in str(admin.value)


def test_key_client_errors_never_show_the_token() -> None:
    with (
        KeyClient(TOKEN, f"http://127.0.0.1:{free_port()}", max_retries=0) as mine,
        pytest.raises(APIConnectionError) as down,
    ):
        mine.info()
    assert TOKEN not in str(down.value) and TOKEN not in repr(down.value)
    body = {"error": {"code": "key_revoked", "message": "This key was revoked."}}
    http = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(401, json=body)))
    with (
        KeyClient(TOKEN, "http://till.test", http_client=http) as mine,
        pytest.raises(AuthenticationError) as revoked,
    ):
        mine.revoke()
    assert (revoked.value.status_code, revoked.value.code) == (401, "key_revoked")
    assert TOKEN not in str(revoked.value) + repr(revoked.value)
    http.close()


# --- against a live Till: update and top-up ---


@pytest.fixture(scope="module")
def admin_key(till: Till) -> str:
    return till.new_tenant("lifecycle")


@pytest.fixture
def admin(till: Till, admin_key: str) -> Iterator[TillClient]:
    with TillClient(admin_key=admin_key, base_url=till.url) as client:
        yield client


def test_update_name_metadata_and_limits(admin: TillClient) -> None:
    key = admin.create_key(
        "openai", UPSTREAM_KEY, 5, name="before", metadata={"team": "blue"}, max_tokens=1000,
        rpm=30,
    )  # fmt: skip
    renamed = admin.update_key(key.id, name="after")
    assert renamed.metadata == {"team": "blue", "name": "after"} and renamed.name == "after"
    replaced = admin.update_key(key.id, metadata={"team": "red"})
    assert replaced.metadata == {"team": "red"} and replaced.name is None
    both = admin.update_key(key.id, metadata={"job": "7"}, name="again")
    assert both.metadata == {"job": "7", "name": "again"}

    limits = admin.update_key(
        key.id, max_activations=20, max_tokens=5000, max_spend_cents=100, rpm=10,
        max_concurrent=2,
    )  # fmt: skip
    assert (limits.max_activations, limits.max_tokens, limits.max_spend_cents) == (20, 5000, 100)
    assert (limits.rpm, limits.max_concurrent) == (10, 2)
    assert (limits.remaining_activations, limits.remaining_tokens) == (20, 5000)
    assert limits.remaining_spend_cents == 100 and limits.status == "active"
    assert admin.get_key(key.id) == limits
    # What the token seals is untouched.
    assert (limits.provider, limits.ip_whitelist, limits.allowed_models) == ("openai", [], None)

    lifted = admin.update_key(key.id, remove_limits=["max_tokens", "rpm"])
    assert (lifted.max_tokens, lifted.remaining_tokens, lifted.rpm) == (None, None, None)
    assert (lifted.max_spend_cents, lifted.max_concurrent) == (100, 2)
    lifted = admin.update_key(key.id, remove_limits=("max_spend_cents", "max_concurrent"))
    assert (lifted.max_spend_cents, lifted.max_concurrent) == (None, None)
    assert admin.get_key(key.id).max_spend_cents is None

    added = admin.update_key(key.id, add_activations=5, max_tokens=300)
    assert (added.max_activations, added.max_tokens) == (25, 300)
    topped = admin.top_up(key.id, activations=1, tokens=200)
    assert (topped.max_activations, topped.max_tokens, topped.remaining_tokens) == (26, 500, 500)


def test_update_refusals(admin: TillClient) -> None:
    key = admin.create_key("openai", UPSTREAM_KEY, 5)
    with pytest.raises(ValidationError) as no_limit:
        admin.top_up(key.id, tokens=100)  # the key has no token limit to raise
    assert (no_limit.value.status_code, no_limit.value.code) == (422, "validation_error")
    with pytest.raises(ValidationError) as spend:
        admin.update_key(key.id, add_spend_cents=100)
    assert spend.value.status_code == 422
    with pytest.raises(ValidationError) as twice:
        admin.update_key(key.id, max_activations=9, add_activations=1)
    assert twice.value.status_code == 422
    with pytest.raises(ValidationError) as zero:
        admin.update_key(key.id, max_activations=0)
    assert "max_activations" in str(zero.value)
    assert admin.get_key(key.id).max_activations == 5  # nothing refused was applied

    with pytest.raises(NotFoundError) as missing:
        admin.update_key("aaaaaaaaaaaaaaaa", name="x")
    assert (missing.value.status_code, missing.value.code) == (404, "not_found")
    with pytest.raises(NotFoundError):
        admin.top_up("aaaaaaaaaaaaaaaa", activations=1)

    admin.revoke_key(key.id)
    with pytest.raises(ConflictError) as revoked:
        admin.top_up(key.id, activations=10)
    assert (revoked.value.status_code, revoked.value.code) == (409, "already_revoked")
    with pytest.raises(ConflictError):
        admin.update_key(key.id, name="zombie")
    after = admin.get_key(key.id)
    assert (after.status, after.max_activations, after.name) == ("revoked", 5, None)


def test_top_up_turns_an_exhausted_key_active(till: Till, admin: TillClient) -> None:
    key = admin.create_key("openai", UPSTREAM_KEY, 1)
    assert key.scoped_key is not None
    assert chat(till, key.scoped_key).choices[0].message.content
    assert admin.get_key(key.id).status == "exhausted"
    spent = refused(till, key.scoped_key)
    assert (spent.status_code, spent.code) == (402, "activation_limit_reached")

    topped = admin.top_up(key.id, activations=2)
    assert (topped.status, topped.max_activations, topped.remaining_activations) == (
        "active", 3, 2
    )  # fmt: skip
    assert topped.used_activations == 1
    assert chat(till, key.scoped_key).choices[0].message.content
    assert admin.get_key(key.id).remaining_activations == 1


def test_lowered_token_limit_exhausts_and_a_token_top_up_revives(
    till: Till, admin: TillClient
) -> None:
    key = admin.create_key("openai", UPSTREAM_KEY, 10, max_tokens=10_000)
    assert key.scoped_key is not None
    reply = chat(till, key.scoped_key)
    assert reply.usage is not None
    used = reply.usage.total_tokens
    lowered = admin.update_key(key.id, max_tokens=used)  # at its use: nothing left
    assert (lowered.status, lowered.remaining_tokens, lowered.used_tokens) == (
        "exhausted", 0, used
    )  # fmt: skip
    spent = refused(till, key.scoped_key)
    assert (spent.status_code, spent.code) == (402, "token_limit_reached")
    revived = admin.top_up(key.id, tokens=5_000)
    assert (revived.status, revived.max_tokens, revived.remaining_tokens) == (
        "active", used + 5_000, 5_000
    )  # fmt: skip
    assert chat(till, key.scoped_key).usage is not None
    assert admin.get_key(key.id).used_activations == 2


async def test_async_update_and_top_up(till: Till, admin_key: str) -> None:
    async with AsyncTillClient(admin_key=admin_key, base_url=till.url) as admin:
        key = await admin.create_key("anthropic", "sk-ant-test", 2, max_spend_cents=50)
        updated = await admin.update_key(key.id, name="async", rpm=7)
        assert (updated.name, updated.rpm, updated.max_spend_cents) == ("async", 7, 50)
        topped = await admin.top_up(key.id, activations=3, spend_cents=25)
        assert (topped.max_activations, topped.max_spend_cents) == (5, 75)
        assert topped.remaining_spend_cents == 75
        assert (await admin.get_key(key.id)).max_spend_cents == 75
        await admin.revoke_key(key.id)
        with pytest.raises(ConflictError):
            await admin.update_key(key.id, remove_limits=["rpm"])
        with pytest.raises(NotFoundError):
            await admin.top_up("aaaaaaaaaaaaaaaa", activations=1)


# --- against a live Till: the holder ---


def scoped(admin: TillClient, max_activations: int = 10, **options: Any) -> tuple[ScopedKey, str]:
    key = admin.create_key("openai", UPSTREAM_KEY, max_activations, **options)
    assert key.scoped_key is not None
    return key, key.scoped_key


def test_holder_sees_and_revokes_its_own_key(till: Till, admin: TillClient) -> None:
    key, token = scoped(admin, 7, name="agent", metadata={"team": "blue"}, max_tokens=900)
    with KeyClient(token, till.url) as mine:
        seen = mine.info()
        assert (seen.id, seen.provider, seen.status, seen.parent_id) == (
            key.id, "openai", "active", None
        )  # fmt: skip
        # The holder sees its name, not the rest of the admin's metadata.
        assert seen.metadata == {"name": "agent"} and seen.scoped_key is None
        assert (seen.max_activations, seen.remaining_activations, seen.remaining_tokens) == (
            7, 7, 900
        )  # fmt: skip
        chat(till, token)
        assert mine.info().used_activations == 1

        revoked = mine.revoke()
        assert revoked.status == "revoked" and revoked.id == key.id
        assert admin.get_key(key.id).status == "revoked"
        assert refused(till, token).status_code == 401
        with pytest.raises(AuthenticationError) as gone:
            mine.info()
        assert (gone.value.status_code, gone.value.code) == (401, "key_revoked")
        assert token not in str(gone.value)
        # Revoking again answers the same: a retry after a lost answer is no error.
        assert mine.revoke().status == "revoked"


def test_a_wrong_scoped_key_is_an_authentication_error(till: Till) -> None:
    with (
        KeyClient("till_sk_aaaaaaaaaaaaaaaa.bm90LWEtcmVhbC10b2tlbg", till.url) as mine,
        pytest.raises(AuthenticationError) as wrong,
    ):
        mine.info()
    assert (wrong.value.status_code, wrong.value.code) == (401, "invalid_api_key")
    assert "bm90LWEtcmVhbC10b2tlbg" not in str(wrong.value)


def test_child_keys(till: Till, admin: TillClient) -> None:
    parent, token = scoped(
        admin, 4, max_tokens=20_000, allowed_models=["gpt-4o*"], ttl_seconds=3600
    )
    with KeyClient(token, till.url) as mine:
        child = mine.create_child(3, name="sub", max_tokens=5_000, ttl_seconds=86_400)
        assert child.scoped_key is not None and child.scoped_key.startswith("till_sk_")
        assert child.scoped_key not in repr(child) and child.scoped_key != token
        assert (child.parent_id, child.provider, child.name) == (parent.id, "openai", "sub")
        assert (child.max_activations, child.max_tokens, child.status) == (3, 5_000, "active")
        # Never outlives its parent: the earlier of the two expiries.
        assert child.expires_at is not None and child.expires_at == parent.expires_at

        # Limits must fit in what the parent has left.
        for activations, tokens, asked, left in ((5, None, 5, 4), (1, 20_001, 20_001, 20_000)):
            with pytest.raises(LimitError) as over:
                mine.create_child(activations, max_tokens=tokens)
            assert (over.value.status_code, over.value.code) == (402, "parent_limit_exceeded")
            assert (over.value.limit, over.value.remaining) == (asked, left)
            assert token not in str(over.value)
        with pytest.raises(PermissionDeniedError) as model:
            mine.create_child(1, allowed_models=["o3"])
        assert (model.value.status_code, model.value.code) == (403, "model_not_allowed")

        # The child's token works like any key, and its requests count against the parent.
        reply = chat(till, child.scoped_key)
        assert reply.usage is not None
        used = reply.usage.total_tokens
        with KeyClient(child.scoped_key, till.url) as kid:
            assert kid.info().used_activations == 1
            assert mine.info().used_activations == 1
            after = admin.get_key(parent.id)
            assert (after.used_activations, after.used_tokens) == (1, used)
            # A child can use only what its ancestors still have: the parent spent two more,
            # so one is left for both, whatever the child's own limit says.
            chat(till, token)
            chat(till, token)
            seen = kid.info()
            assert (seen.used_activations, seen.remaining_activations) == (1, 1)
            assert seen.parent_id == parent.id and seen.metadata == {"name": "sub"}

            listed = {k.id: k for k in admin.list_keys()}
            assert listed[child.id].parent_id == parent.id
            assert listed[parent.id].parent_id is None

            # Revoking the parent (as the admin) revokes the child.
            admin.revoke_key(parent.id)
            assert refused(till, child.scoped_key).status_code == 401
            with pytest.raises(AuthenticationError) as gone:
                kid.info()
            assert gone.value.code == "key_revoked"
            assert admin.get_key(child.id).status == "revoked"


def test_children_count_against_the_parent_budget(till: Till, admin: TillClient) -> None:
    parent, token = scoped(admin, 2)
    with KeyClient(token, till.url) as mine:
        first = mine.create_child(2)
        second = mine.create_child(2)
        assert first.scoped_key is not None and second.scoped_key is not None
        chat(till, first.scoped_key)
        chat(till, second.scoped_key)
        # Each child had room of its own; the parent's two activations are gone.
        spent = refused(till, first.scoped_key)
        assert spent.status_code == 402
        assert refused(till, token).status_code == 402
        assert admin.get_key(parent.id).used_activations == 2
        with pytest.raises(LimitError) as none_left:
            mine.create_child(1)
        assert none_left.value.code == "parent_limit_exceeded"
        # A top-up of the parent gives the children room again.
        admin.top_up(parent.id, activations=1)
        assert chat(till, second.scoped_key).choices


def test_children_nest_four_deep_within_the_parents_addresses(
    till: Till, admin: TillClient
) -> None:
    root, token = scoped(admin, 10, ip_whitelist=["127.0.0.0/8"])
    with KeyClient(token, till.url) as mine:
        with pytest.raises(ValidationError) as outside:
            mine.create_child(1, ip_whitelist=["10.0.0.0/8"])
        assert (outside.value.status_code, outside.value.code) == (422, "validation_error")
        narrower = mine.create_child(1, ip_whitelist=["127.0.0.1"])
        assert narrower.ip_whitelist == ["127.0.0.1/32"]
    chain = [root.id]
    for depth in range(1, 6):
        with KeyClient(token, till.url) as holder:
            if depth == 5:
                with pytest.raises(ValidationError) as deep:
                    holder.create_child(1)
                assert deep.value.status_code == 422
                break
            child = holder.create_child(10 - depth)
        assert child.parent_id == chain[-1] and child.scoped_key is not None
        chain.append(child.id)
        token = child.scoped_key
    assert len(chain) == 5  # the root and four generations
    # The deepest key works, and every ancestor pays for it.
    assert chat(till, token).choices
    assert [admin.get_key(k).used_activations for k in chain] == [1] * 5


async def test_async_holder(till: Till, admin: TillClient) -> None:
    parent, token = scoped(admin, 5, name="boss")
    async with AsyncKeyClient(token, till.url) as mine:
        assert (await mine.info()).metadata == {"name": "boss"}
        child = await mine.create_child(2, metadata={"job": "42"}, rpm=3, max_concurrent=1)
        assert child.scoped_key is not None and child.parent_id == parent.id
        assert (child.rpm, child.max_concurrent) == (3, 1)
        # The holder's metadata reaches the admin's view (the holder's own shows only a name).
        assert admin.get_key(child.id).metadata == {"job": "42"}
        async with AsyncKeyClient(child.scoped_key, till.url) as kid:
            grandchild = await kid.create_child(1)
            assert grandchild.parent_id == child.id
            # The holder burns its own key, and its children with it.
            revoked = await mine.revoke()
            assert revoked.status == "revoked"
            for gone in (child, grandchild):
                assert admin.get_key(gone.id).status == "revoked"
            with pytest.raises(AuthenticationError) as caught:
                await kid.info()
            assert caught.value.code == "key_revoked"
        assert (await mine.revoke()).status == "revoked"


def test_holder_reads_the_environment(
    till: Till, admin: TillClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, token = scoped(admin, 3)
    monkeypatch.setenv("TILL_SCOPED_KEY", token)
    monkeypatch.setenv("TILL_URL", till.url)
    with KeyClient() as mine:
        assert mine.info().id == key.id
