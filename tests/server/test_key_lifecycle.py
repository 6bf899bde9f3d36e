"""Top-ups, the holder's own endpoints, child keys and Idempotency-Key against a live Till: keys
used with the provider SDKs, the admin and holder endpoints called over plain HTTP (the SDK's
and the CLI's own tests of them are test_sdk_lifecycle.py and test_cli_lifecycle.py).

A refusal reaches no provider (the mock records nothing for it) and changes no counter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, Mock, Till, create_key, fire_chats, get_key, own_till
from tests.server.test_key_limits import MESSAGES, claude, error_of, oa
from till import LimitError, TillClient


@pytest.fixture(scope="module")
def admin_key(till: Till) -> str:
    return till.new_tenant("lifecycle", plan="enterprise")


@pytest.fixture
def admin(till: Till, admin_key: str) -> Iterator[httpx.Client]:
    with till.admin(admin_key) as client:
        yield client


def holder(till: Till, token: str) -> httpx.Client:
    return httpx.Client(base_url=till.url, headers={"authorization": f"Bearer {token}"}, timeout=30)


def chat(till: Till, token: str, **kwargs: Any) -> Any:
    with oa(till, token, max_retries=0) as ai:
        return ai.chat.completions.create(model="gpt-4o", messages=MESSAGES, **kwargs)


def refused(till: Till, token: str, status: int, code: str, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as caught:
        chat(till, token, **kwargs)
    assert caught.value.status_code == status
    error = error_of(caught.value)
    assert error["code"] == code, error
    return error


def patch(admin: httpx.Client, key_id: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return admin.patch(
            f"/admin/keys/{key_id}", content=body, headers={"content-type": "application/json"}
        )
    return admin.patch(f"/admin/keys/{key_id}", json=body)


def mint(parent: str, till: Till, status: int = 201, **body: Any) -> dict[str, Any]:
    with holder(till, parent) as http:
        resp = http.post("/v1/till/keys", json=body)
    assert resp.status_code == status, resp.text
    if status != 201:
        error: dict[str, Any] = resp.json()["error"]
        return error
    key: dict[str, Any] = resp.json()["key"]
    return key


# --- PATCH /admin/keys/{id}: updates and top-ups ---


def test_a_top_up_brings_an_exhausted_key_back(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=1, max_tokens=10_000)
    chat(till, key["scopedKey"])
    refused(till, key["scopedKey"], 402, "activation_limit_reached")
    assert get_key(admin, key["id"])["status"] == "exhausted"
    resp = patch(admin, key["id"], {"add_activations": 2, "add_tokens": 500})
    assert resp.status_code == 200, resp.text
    topped = resp.json()["key"]
    assert (topped["status"], topped["maxActivations"], topped["remainingActivations"]) == (
        "active",
        3,
        2,
    )
    assert topped["maxTokens"] == 10_500
    mock_upstream.reset()
    chat(till, key["scopedKey"])
    chat(till, key["scopedKey"])
    refused(till, key["scopedKey"], 402, "activation_limit_reached")
    assert len(mock_upstream.requests()) == 2
    assert get_key(admin, key["id"])["usedActivations"] == 3


def test_concurrent_top_ups_all_count(till: Till, admin_key: str, admin: httpx.Client) -> None:
    key = create_key(admin, max_activations=1, max_tokens=100, max_spend_cents=1)

    async def top_ups() -> list[int]:
        async with httpx.AsyncClient(
            base_url=till.url, headers={"authorization": f"Bearer {admin_key}"}, timeout=30
        ) as http:
            body = {"add_activations": 1, "add_tokens": 10, "add_spend_cents": 2}
            calls = [http.patch(f"/admin/keys/{key['id']}", json=body) for _ in range(24)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(top_ups()) == [200] * 24
    after = get_key(admin, key["id"])
    assert (after["maxActivations"], after["maxTokens"], after["maxSpendCents"]) == (25, 340, 49)


def test_limits_are_set_lowered_and_lifted(till: Till, admin: httpx.Client) -> None:
    key = create_key(admin, max_activations=10, max_tokens=5000, rpm=100, metadata={"team": "a"})
    chat(till, key["scopedKey"])
    # Lowered to what is used: exhausted at once, for every worker.
    lowered = patch(admin, key["id"], {"max_activations": 1}).json()["key"]
    assert (lowered["status"], lowered["remainingActivations"]) == ("exhausted", 0)
    refused(till, key["scopedKey"], 402, "activation_limit_reached")
    changed = patch(
        admin,
        key["id"],
        {"max_activations": 4, "max_tokens": None, "rpm": None, "max_concurrent": 2, "name": "n"},
    ).json()["key"]
    assert changed["status"] == "active"
    assert (changed["maxTokens"], changed["remainingTokens"], changed["rpm"]) == (None, None, None)
    assert changed["maxConcurrent"] == 2
    # The name joins the metadata already there; metadata given replaces it.
    assert changed["metadata"] == {"team": "a", "name": "n"}
    replaced = patch(admin, key["id"], {"metadata": {"team": "b"}}).json()["key"]
    assert replaced["metadata"] == {"team": "b"}
    chat(till, key["scopedKey"])
    assert get_key(admin, key["id"])["usedActivations"] == 2


BAD_UPDATES: list[tuple[Any, int, str]] = [
    ({}, 422, "validation_error"),
    ({"max_activations": 0}, 422, "validation_error"),
    ({"max_activations": "5"}, 422, "validation_error"),
    ({"add_activations": 10**12}, 422, "validation_error"),
    ({"add_activations": -1}, 422, "validation_error"),
    ({"max_activations": 5, "add_activations": 1}, 422, "validation_error"),
    ({"max_tokens": None, "add_tokens": 5}, 422, "validation_error"),
    ({"add_tokens": 5}, 422, "validation_error"),  # the key has no token limit to add to
    ({"add_spend_cents": 5}, 422, "validation_error"),
    ({"max_activations": None}, 422, "validation_error"),  # only limits that may be absent lift
    ({"upstream_key": "sk-other"}, 422, "validation_error"),
    ({"provider": "anthropic"}, 422, "validation_error"),
    ({"allowed_models": ["gpt-4o"]}, 422, "validation_error"),
    ({"expires_at": "2030-01-01T00:00:00Z"}, 422, "validation_error"),
    ({"metadata": {"x": "y" * 9000}}, 422, "validation_error"),
    ([1, 2], 422, "validation_error"),
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_UPDATES)
def test_a_bad_update_is_refused_and_changes_nothing(
    till: Till, admin: httpx.Client, body: Any, status: int, code: str
) -> None:
    key = create_key(admin, max_activations=3, rpm=5)
    before = get_key(admin, key["id"])
    resp = patch(admin, key["id"], body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    assert get_key(admin, key["id"]) == before


def test_a_revoked_or_unknown_key_cannot_change(
    till: Till, admin: httpx.Client, admin_key: str
) -> None:
    key = create_key(admin, max_activations=3)
    assert admin.delete(f"/admin/keys/{key['id']}").status_code == 200
    resp = patch(admin, key["id"], {"add_activations": 5})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "already_revoked")
    assert get_key(admin, key["id"])["maxActivations"] == 3
    assert patch(admin, "a" * 16, {"add_activations": 1}).status_code == 404
    # Another tenant's admin key does not see the key at all.
    with till.admin(till.new_tenant("other")) as other:
        live = create_key(admin, max_activations=3)
        resp = patch(other, live["id"], {"add_activations": 1})
        assert (resp.status_code, resp.json()["error"]["code"]) == (404, "not_found")
    assert get_key(admin, live["id"])["maxActivations"] == 3


# --- the holder's own endpoints ---


def test_the_holder_sees_what_remains_and_burns_its_key(
    till: Till, admin: httpx.Client, admin_key: str, mock_upstream: Mock
) -> None:
    key = create_key(
        admin,
        max_activations=5,
        max_tokens=10_000,
        ttl_seconds=3600,
        allowed_models=["gpt-4o*"],
        metadata={"name": "agent-7", "cost_center": "internal"},
    )
    token = key["scopedKey"]
    with holder(till, token) as http:
        seen = http.get("/v1/till/key").json()["key"]
        assert (seen["id"], seen["remainingActivations"], seen["remainingTokens"]) == (
            key["id"],
            5,
            10_000,
        )
        assert seen["expiresAt"] == key["expiresAt"]
        assert seen["allowedModels"] == ["gpt-4o*"]
        # The admin's notes stay the admin's: the holder sees the name only.
        assert seen["metadata"] == {"name": "agent-7"}
        assert seen["scopedKey"] is None
        chat(till, token)
        seen = http.get("/v1/till/key").json()["key"]
        assert seen["remainingActivations"] == 4
        assert seen["usedTokens"] > 0 and seen["remainingTokens"] == 10_000 - seen["usedTokens"]
    # Where the Anthropic and Google SDKs put the key works as well.
    for where in ({"headers": {"x-api-key": token}}, {"params": {"key": token}}):
        resp = httpx.get(f"{till.url}/v1/till/key", timeout=30, **where)  # type: ignore[arg-type]
        assert resp.json()["key"]["remainingActivations"] == 4
    live_before = admin.get("/admin/account").json()["account"]["keysUsed"]
    with holder(till, token) as http:
        burnt = http.delete("/v1/till/key")
        assert burnt.status_code == 200
        assert (burnt.json()["key"]["status"], burnt.json()["key"]["remainingActivations"]) == (
            "revoked",
            0,
        )
        # Revoking again answers the same: a retry after a lost answer is no error.
        again = http.delete("/v1/till/key")
        assert (again.status_code, again.json()["key"]["status"]) == (200, "revoked")
        assert http.get("/v1/till/key").json()["error"]["code"] == "key_revoked"
    mock_upstream.reset()
    refused(till, token, 401, "key_revoked")
    assert mock_upstream.requests() == []
    assert get_key(admin, key["id"])["status"] == "revoked"
    assert admin.get("/admin/account").json()["account"]["keysUsed"] == live_before - 1


@pytest.mark.parametrize(
    "credential", ["", "till_sk_aaaaaaaaaaaaaaaa.AAAA", "sk-not-till", "till_admin_x.y"]
)
def test_the_holder_endpoints_want_a_valid_scoped_key(till: Till, credential: str) -> None:
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    for method, path in (("GET", "/v1/till/key"), ("DELETE", "/v1/till/key")):
        resp = httpx.request(method, f"{till.url}{path}", headers=headers, timeout=30)
        assert (resp.status_code, resp.json()["error"]["code"]) == (401, "invalid_api_key")
    resp = httpx.post(
        f"{till.url}/v1/till/keys", headers=headers, json={"max_activations": 1}, timeout=30
    )
    assert (resp.status_code, resp.json()["error"]["code"]) == (401, "invalid_api_key")


def test_an_admin_key_revoked_or_expired_key_is_refused_by_its_own_endpoints(
    till: Till, admin: httpx.Client
) -> None:
    key = create_key(admin, max_activations=2, ttl_seconds=1)
    time.sleep(1.1)
    with holder(till, key["scopedKey"]) as http:
        resp = http.get("/v1/till/key")
        assert (resp.status_code, resp.json()["error"]["code"]) == (401, "key_expired")
        resp = http.post("/v1/till/keys", json={"max_activations": 1})
        assert (resp.status_code, resp.json()["error"]["code"]) == (401, "key_expired")
        # An expired key may still be burnt, which also frees its place in the plan.
        resp = http.delete("/v1/till/key")
        assert (resp.status_code, resp.json()["key"]["status"]) == (200, "revoked")


# --- child keys ---


def test_a_child_is_carved_out_of_what_its_parent_has_left(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    parent = create_key(admin, max_activations=5, max_tokens=50_000, max_spend_cents=100)
    token = parent["scopedKey"]
    over = mint(token, till, 402, max_activations=6)
    assert (over["code"], over["field"], over["limit"], over["remaining"]) == (
        "parent_limit_exceeded",
        "max_activations",
        6,
        5,
    )
    assert mint(token, till, 402, max_activations=3, max_tokens=50_001)["field"] == "max_tokens"
    assert mint(token, till, 402, max_activations=3, max_spend_cents=101)["field"] == (
        "max_spend_cents"
    )
    child = mint(token, till, max_activations=3, max_tokens=20_000, name="sub-agent")
    assert child["parentId"] == parent["id"]
    assert child["metadata"] == {"name": "sub-agent"}
    assert mint(token, till, max_activations=1, metadata={"task": 7})["metadata"] == {"task": 7}
    assert child["provider"] == "openai"
    assert child["scopedKey"].startswith(f"till_sk_{child['id']}.")
    listed = {k["id"]: k for k in admin.get("/admin/keys").json()["keys"]}
    assert listed[child["id"]]["parentId"] == parent["id"]
    assert listed[parent["id"]]["parentId"] is None
    mock_upstream.reset()
    for _ in range(3):
        chat(till, child["scopedKey"])
    refused(till, child["scopedKey"], 402, "activation_limit_reached")
    assert len(mock_upstream.requests()) == 3
    # The parent's counters cover its child's requests.
    after = get_key(admin, parent["id"])
    child_after = get_key(admin, child["id"])
    assert after["usedActivations"] == 3
    assert after["usedTokens"] == child_after["usedTokens"] > 0
    assert after["usedSpendMicrocents"] == child_after["usedSpendMicrocents"] > 0
    # What the parent has left bounds the next child, and what its holder sees.
    with holder(till, token) as http:
        assert http.get("/v1/till/key").json()["key"]["remainingActivations"] == 2
    assert mint(token, till, 402, max_activations=3)["remaining"] == 2
    second = mint(token, till, max_activations=2)
    chat(till, token)  # the parent's own request
    with holder(till, second["scopedKey"]) as http:
        # Its own limit leaves 2; its parent has 1 left.
        assert http.get("/v1/till/key").json()["key"]["remainingActivations"] == 1
    chat(till, second["scopedKey"])
    error = refused(till, second["scopedKey"], 402, "activation_limit_reached")
    assert "parent" in error["message"]


def test_a_family_never_spends_more_than_its_parent_under_concurrency(
    till: Till, admin: httpx.Client
) -> None:
    parent = create_key(admin, max_activations=6)
    kids = [mint(parent["scopedKey"], till, max_activations=5)["scopedKey"] for _ in range(2)]
    results: list[list[int]] = [[], []]

    def fire(i: int) -> None:
        results[i] = fire_chats(till.url, kids[i], 8)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    statuses = results[0] + results[1]
    assert len(statuses) == 16
    assert statuses.count(200) == 6
    assert statuses.count(402) == 10
    after = get_key(admin, parent["id"])
    assert (after["usedActivations"], after["inFlight"], after["status"]) == (6, 0, "exhausted")


def test_revoking_a_parent_revokes_its_children(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    parent = create_key(admin, max_activations=20)
    child = mint(parent["scopedKey"], till, max_activations=10)
    grandchild = mint(child["scopedKey"], till, max_activations=5)
    assert grandchild["parentId"] == child["id"]
    chat(till, grandchild["scopedKey"])
    assert get_key(admin, parent["id"])["usedActivations"] == 1
    assert admin.delete(f"/admin/keys/{parent['id']}").status_code == 200
    mock_upstream.reset()
    for token in (child["scopedKey"], grandchild["scopedKey"]):
        refused(till, token, 401, "key_revoked")
        with holder(till, token) as http:
            assert http.get("/v1/till/key").status_code == 401
    assert mock_upstream.requests() == []
    for kid in (child, grandchild):
        assert get_key(admin, kid["id"])["status"] == "revoked"


def test_a_holder_revoking_its_key_revokes_its_children_not_its_parent(
    till: Till, admin: httpx.Client
) -> None:
    parent = create_key(admin, max_activations=20)
    child = mint(parent["scopedKey"], till, max_activations=10)
    grandchild = mint(child["scopedKey"], till, max_activations=5)
    with holder(till, child["scopedKey"]) as http:
        assert http.delete("/v1/till/key").json()["key"]["status"] == "revoked"
    refused(till, grandchild["scopedKey"], 401, "key_revoked")
    assert get_key(admin, grandchild["id"])["status"] == "revoked"
    chat(till, parent["scopedKey"])
    assert get_key(admin, parent["id"])["status"] == "active"


def test_a_child_cannot_widen_what_its_parent_may_do(till: Till, admin: httpx.Client) -> None:
    parent = create_key(
        admin,
        max_activations=50,
        allowed_models=["gpt-4o*", "o3"],
        ip_whitelist=["127.0.0.0/8"],
        ttl_seconds=3600,
    )
    token = parent["scopedKey"]
    inherited = mint(token, till, max_activations=1)
    assert inherited["allowedModels"] == ["gpt-4o*", "o3"]
    assert inherited["ipWhitelist"] == ["127.0.0.0/8"]
    assert inherited["expiresAt"] == parent["expiresAt"]
    narrower = mint(
        token, till, max_activations=1, allowed_models=["gpt-4o-mini*"], ip_whitelist=["127.0.0.1"]
    )
    assert narrower["allowedModels"] == ["gpt-4o-mini*"]
    refused(till, narrower["scopedKey"], 403, "model_not_allowed")  # gpt-4o itself
    chat(till, inherited["scopedKey"])
    for models in (["gpt-4*"], ["claude-3-5-sonnet"], ["o3*"], ["*"]):
        assert mint(token, till, 403, max_activations=1, allowed_models=models)["code"] == (
            "model_not_allowed"
        )
    assert mint(token, till, 422, max_activations=1, ip_whitelist=["10.0.0.0/8"])["code"] == (
        "validation_error"
    )
    assert mint(token, till, 422, max_activations=1, ip_whitelist=["::1"])["code"] == (
        "validation_error"
    )
    # A child never outlives its parent; it may end sooner.
    longer = mint(token, till, max_activations=1, ttl_seconds=7200)
    assert longer["expiresAt"] == parent["expiresAt"]
    sooner = mint(token, till, max_activations=1, ttl_seconds=60)
    ends = datetime.fromisoformat(sooner["expiresAt"]).timestamp()
    assert time.time() + 50 < ends < time.time() + 61
    # Nor may it name a provider or key of its own.
    for extra in ({"provider": "anthropic"}, {"upstream_key": "sk-mine"}):
        assert mint(token, till, 422, max_activations=1, **extra)["code"] == "validation_error"
    assert mint(token, till, 422, max_activations=0)["code"] == "validation_error"


def test_keys_nest_at_most_four_deep(till: Till, admin: httpx.Client) -> None:
    parent = create_key(admin, max_activations=50)
    token, ids = parent["scopedKey"], [parent["id"]]
    for _ in range(4):
        kid = mint(token, till, max_activations=10)
        token = kid["scopedKey"]
        ids.append(kid["id"])
    error = mint(token, till, 422, max_activations=1)
    assert "4 deep" in error["message"]
    # The deepest one's request is charged to every key above it.
    chat(till, token)
    assert [get_key(admin, key_id)["usedActivations"] for key_id in ids] == [1] * 5


def test_children_count_against_the_plan(till: Till) -> None:
    with till.admin(till.new_tenant("tiny", plan="free")) as admin:
        plan = admin.get("/admin/account").json()["account"]["tenant"]["maxKeys"]
        parent = create_key(admin, max_activations=100)
        for _ in range(plan - 1):
            mint(parent["scopedKey"], till, max_activations=1)
        error = mint(parent["scopedKey"], till, 403, max_activations=1)
        assert (error["code"], error["limit"]) == ("max_keys_reached", plan)


# --- Idempotency-Key ---


def test_a_retry_of_a_completed_call_is_answered_not_sent(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=5)
    token = key["scopedKey"]
    mock_upstream.reset()
    with oa(till, token, max_retries=0) as ai:
        first = ai.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"Idempotency-Key": "task-1"}
        )
        request_id = first.headers["x-till-request-id"]
        with pytest.raises(openai.ConflictError) as caught:
            ai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"Idempotency-Key": "task-1"}
            )
        error = error_of(caught.value)
        assert (error["code"], error["request_id"]) == ("idempotent_request_completed", request_id)
        assert caught.value.response.headers["x-should-retry"] == "false"
        # Another request under the same Idempotency-Key is a mistake, said as such.
        with pytest.raises(openai.UnprocessableEntityError) as caught_other:
            ai.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers={"Idempotency-Key": "task-1"}
            )
        assert error_of(caught_other.value)["code"] == "idempotency_key_reused"
        ai.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"Idempotency-Key": "task-2"}
        )
    # The SDK's own retries stop at once: x-should-retry says a retry cannot help.
    with oa(till, token, max_retries=2) as ai:
        started = time.monotonic()
        with pytest.raises(openai.ConflictError):
            ai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"Idempotency-Key": "task-2"}
            )
        assert time.monotonic() - started < 0.4
    assert len(mock_upstream.requests()) == 2
    assert get_key(admin, key["id"])["usedActivations"] == 2
    # The same Idempotency-Key under another Till key is another call.
    other = create_key(admin, max_activations=1)
    chat(till, other["scopedKey"], extra_headers={"Idempotency-Key": "task-1"})
    assert len(mock_upstream.requests()) == 3


def test_a_retry_while_the_first_call_runs_is_told_to_wait(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=5)
    token = key["scopedKey"]
    mock_upstream.reset()
    done: list[Any] = []
    headers = {"Idempotency-Key": "slow-1"}

    def first() -> None:
        slow = {**headers, "x-mock-delay-ms": "1500"}
        done.append(chat(till, token, extra_headers=slow))

    runner = threading.Thread(target=first)
    runner.start()
    time.sleep(0.5)
    body = {"model": "gpt-4o", "messages": MESSAGES}
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {token}", **headers, "x-mock-delay-ms": "1500"},
        json=body,
        timeout=30,
    )
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "idempotency_in_progress"
    assert resp.headers["retry-after"] == "1"
    # The SDK waits as asked, and then learns the call completed.
    with oa(till, token, max_retries=3) as ai, pytest.raises(openai.ConflictError) as caught:
        ai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)
    assert error_of(caught.value)["code"] == "idempotent_request_completed"
    runner.join(timeout=30)
    assert len(done) == 1
    assert len(mock_upstream.requests()) == 1
    assert get_key(admin, key["id"])["usedActivations"] == 1


def test_a_failed_call_is_retried_on_the_activation_it_spent(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=1, max_tokens=10_000)
    token = key["scopedKey"]
    headers = {"Idempotency-Key": "flaky-1"}
    mock_upstream.reset()
    with pytest.raises(openai.InternalServerError):
        chat(till, token, extra_headers={**headers, "x-mock-status": "500"})
    spent = get_key(admin, key["id"])
    assert (spent["usedActivations"], spent["usedTokens"], spent["status"]) == (1, 0, "exhausted")
    # The key has no activation left, yet the retry goes: it rides on the one the first spent.
    answer = chat(till, token, extra_headers=headers)
    assert answer.usage.total_tokens > 0
    after = get_key(admin, key["id"])
    assert (after["usedActivations"], after["usedTokens"], after["inFlight"]) == (
        1,
        answer.usage.total_tokens,
        0,
    )
    refused(till, token, 409, "idempotent_request_completed", extra_headers=headers)
    # Without the key, the exhausted key is exhausted.
    refused(till, token, 402, "activation_limit_reached")
    assert len(mock_upstream.requests()) == 2


def test_streams_and_the_anthropic_sdk_under_an_idempotency_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=10)
    token = key["scopedKey"]
    mock_upstream.reset()
    # A stream the provider broke off did not complete: its retry is sent again, and once
    # whole, completes the call.
    cut = {"Idempotency-Key": "stream-1", "x-mock-cut-after": "2"}
    with oa(till, token, max_retries=0) as ai:
        with pytest.raises(openai.APIError):
            for _ in ai.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=cut
            ):
                pass
        chunks = list(
            ai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                extra_headers={"Idempotency-Key": "stream-1"},
            )
        )
        assert chunks
        with pytest.raises(openai.ConflictError):
            ai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                extra_headers={"Idempotency-Key": "stream-1"},
            )
    assert len(mock_upstream.requests()) == 2
    assert get_key(admin, key["id"])["usedActivations"] == 1
    claude_key = create_key(admin, provider="anthropic", upstream_key="sk-ant-test-x1")
    with claude(till, claude_key["scopedKey"], max_retries=2) as client:
        headers = {"Idempotency-Key": "claude-1"}
        client.messages.create(
            model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES, extra_headers=headers
        )
        with pytest.raises(anthropic.ConflictError) as caught:
            client.messages.create(
                model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES, extra_headers=headers
            )
        assert error_of(caught.value)["code"] == "idempotent_request_completed"
        assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(mock_upstream.requests()) == 3


@pytest.mark.parametrize("value", ["", "x" * 256, "caf\u00e9"])
def test_a_bad_idempotency_key_is_refused_before_anything_is_spent(
    till: Till, admin: httpx.Client, value: str
) -> None:
    key = create_key(admin, max_activations=1)
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={
            "authorization": f"Bearer {key['scopedKey']}",
            "idempotency-key": value.encode(),
        },
        json={"model": "gpt-4o", "messages": MESSAGES},
        timeout=30,
    )
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "invalid_header")
    assert get_key(admin, key["id"])["usedActivations"] == 0


def test_expired_keys_give_their_place_in_the_plan_back(mock_upstream: Mock, log_dir: Path) -> None:
    with own_till("plan-room", mock_upstream.url, None, log_dir, TILL_REAP_INTERVAL="0.2") as till:
        admin_key = till.new_tenant("small", plan="free")
        with TillClient(admin_key=admin_key, base_url=till.url, max_retries=0) as client:
            plan = client.account().tenant.max_keys  # type: ignore[union-attr]
            short = [
                client.create_key("openai", UPSTREAM_KEY, 1, ttl_seconds=1) for _ in range(plan)
            ]
            with pytest.raises(LimitError):
                client.create_key("openai", UPSTREAM_KEY, 1)
            deadline = time.monotonic() + 10
            while client.account().keys_used and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.account().keys_used == 0
            assert {client.get_key(k.id).status for k in short} == {"expired"}
            client.create_key("openai", UPSTREAM_KEY, 1)
            assert client.account().keys_used == 1
