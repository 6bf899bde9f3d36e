"""The Anthropic proxy path through the real anthropic SDK (and the openai SDK with an Anthropic
key), against the mock upstream."""

from __future__ import annotations

from functools import partial
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic._constants import ANTHROPIC_API_VERSION

from tests.conftest import Mock, Till, get_key
from tests.conftest import create_key as new_key
from till.server.pricing import Pricer, Usage

# The mock answers the shared /v1/chat/completions as Anthropic for keys with this prefix.
ANTHROPIC_KEY = "sk-ant-test-upstream-0123456789abcdef"
MODEL = "claude-sonnet-4-6"  # priced by genai-prices (cache read and write rates); not deprecated
MESSAGES: list[Any] = [{"role": "user", "content": "Hello there, tell me something nice"}]
CACHE_HEADERS = {"x-mock-cache-creation-tokens": "3", "x-mock-cache-read-tokens": "2"}
create_key = partial(new_key, provider="anthropic", upstream_key=ANTHROPIC_KEY)


def client(till: Till, token: str, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=token, base_url=till.url, **kwargs)


def oa_client(till: Till, token: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", **kwargs)


def normalized(record: dict[str, Any]) -> Usage | None:
    u = record.get("usage_normalized")
    if not u:
        return None
    return Usage(
        input_tokens=u["input_tokens"],
        output_tokens=u["output_tokens"],
        cache_read_tokens=u["cache_read_tokens"],
        cache_write_tokens=u["cache_write_tokens"],
    )


def billed(mock: Mock) -> tuple[int, int]:
    """Tokens and micro-cents of every usage the mock reported, priced as Till must."""
    pricer = Pricer()
    tokens = cents = 0
    for record in mock.requests():
        usage = normalized(record)
        if usage is None:
            continue
        assert record["provider"] == "anthropic"
        tokens += usage.total_tokens
        cost = pricer.cost_microcents("anthropic", str(record["model"]), usage)
        assert cost is not None
        cents += cost
    return tokens, cents


def test_plain_message_reaches_upstream_with_the_real_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        raw = ac.messages.with_raw_response.create(
            model=MODEL, max_tokens=300, messages=MESSAGES, extra_headers=CACHE_HEADERS
        )
        message = raw.parse()
    assert message.content and message.content[0].type == "text"
    u = message.usage
    assert (u.cache_creation_input_tokens, u.cache_read_input_tokens) == (3, 2)
    (seen,) = mock_upstream.requests()
    headers = seen["headers"]
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in headers, "the client's Till token must not travel upstream"
    assert headers["anthropic-version"] == ANTHROPIC_API_VERSION  # passed through as sent
    assert seen["path"] == "/v1/messages" and seen["provider"] == "anthropic"
    assert seen["body"]["max_tokens"] == 300  # affordable: forwarded as asked
    total = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    total += u.output_tokens
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == total
    assert after["heldTokens"] == 0
    assert raw.headers["x-till-remaining-activations"] == "99"
    assert raw.headers["x-till-remaining-tokens"] == str(100_000 - total)
    assert "anthropic-organization-id" not in raw.headers
    assert raw.headers["request-id"] == seen["request_id"]


def test_streams_count_tokens_and_openai_sdk_bill_what_the_mock_reported(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=1_000_000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        ac.messages.create(
            model=MODEL, max_tokens=200, messages=MESSAGES, extra_headers=CACHE_HEADERS
        )
        with ac.messages.stream(
            model=MODEL, max_tokens=200, messages=MESSAGES, extra_headers=CACHE_HEADERS
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert final.usage.output_tokens == len(text.split()) > 0
        assert final.usage.cache_read_input_tokens == 2
        events = list(
            ac.messages.create(
                model=MODEL,
                max_tokens=7,
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-mock-cache-read-tokens": "4"},
            )
        )
        kinds = [e.type for e in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert "message_delta" in kinds, "nothing is withheld from an Anthropic stream"
        counted = ac.messages.count_tokens(model=MODEL, messages=MESSAGES)
        assert counted.input_tokens > 0
    # The openai SDK with the same scoped key: Anthropic's OpenAI-compatible endpoint.
    with oa_client(till, key["scopedKey"]) as oa:
        completion = oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.usage is not None and completion.choices[0].message.content
        chunks = list(oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
        assert chunks and all(c.choices for c in chunks), "the added usage chunk is withheld"
    seen = mock_upstream.requests()
    assert [r["path"] for r in seen] == [
        "/v1/messages",
        "/v1/messages",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/chat/completions",
        "/v1/chat/completions",
    ]
    assert all(r["provider"] == "anthropic" for r in seen)
    for r in seen[:4]:
        assert r["headers"]["x-api-key"] == ANTHROPIC_KEY
        assert "authorization" not in r["headers"]
    for r in seen[4:]:
        assert r["headers"]["authorization"] == f"Bearer {ANTHROPIC_KEY}"
        assert "x-api-key" not in r["headers"]
    assert seen[5]["body"]["stream_options"] == {"include_usage": True}
    assert seen[3]["usage_normalized"] is None  # count_tokens: free, nothing to bill
    tokens, _ = billed(mock_upstream)
    totals = mock_upstream.totals()
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 6
    assert after["usedTokens"] == tokens == totals["total_tokens"] > 0
    assert after["heldTokens"] == 0


def test_spend_is_priced_with_cache_rates(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_spend_cents=100)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        raw = ac.messages.with_raw_response.create(
            model=MODEL, max_tokens=50, messages=MESSAGES, extra_headers=CACHE_HEADERS
        )
        raw.parse()
        with ac.messages.stream(
            model=MODEL, max_tokens=60, messages=MESSAGES, extra_headers=CACHE_HEADERS
        ) as stream:
            stream.until_done()
    with oa_client(till, key["scopedKey"]) as oa:
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=30)
    seen = mock_upstream.requests()
    cached = [normalized(r) for r in seen[:2]]
    assert all(
        u is not None and (u.cache_read_tokens, u.cache_write_tokens) == (2, 3) for u in cached
    )
    tokens, microcents = billed(mock_upstream)
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == tokens
    assert after["usedSpendMicrocents"] == microcents > 0
    assert after["heldSpendCents"] == 0
    # Cache pricing is exercised: the same usage without the cache split costs differently.
    plain = Usage(input_tokens=12, output_tokens=20)
    cached = Usage(input_tokens=12, output_tokens=20, cache_read_tokens=2, cache_write_tokens=3)
    assert Pricer().cost_microcents("anthropic", MODEL, plain) != Pricer().cost_microcents(
        "anthropic", MODEL, cached
    )
    assert float(raw.headers["x-till-remaining-spend-cents"]) < 100


def test_token_limit_lowers_max_tokens(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        message = ac.messages.create(
            model=MODEL,
            max_tokens=100_000,
            messages=MESSAGES,
            # Without the clamp the mock would write 5000 tokens.
            extra_headers={"x-mock-output-tokens": "5000"},
            timeout=60,  # else the SDK asks for streaming at this max_tokens
        )
    (seen,) = mock_upstream.requests()
    forwarded = seen["body"]["max_tokens"]
    assert 0 < forwarded < 1000
    assert message.usage.output_tokens == forwarded
    assert message.stop_reason == "max_tokens"
    after = get_key(admin, key["id"])
    total = message.usage.input_tokens + message.usage.output_tokens
    assert after["usedTokens"] == total <= 1000
    assert after["heldTokens"] == 0


def test_token_limit_keeps_the_thinking_budget_legal(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=3000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        ac.messages.create(
            model=MODEL,
            max_tokens=16_000,
            thinking={"type": "enabled", "budget_tokens": 8000},
            messages=MESSAGES,
        )
    (seen,) = mock_upstream.requests()
    forwarded = seen["body"]["max_tokens"]
    assert 1024 < forwarded < 3000
    assert seen["body"]["thinking"] == {"type": "enabled", "budget_tokens": forwarded - 1}


def test_token_limit_holds_for_streams(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=300)
    mock_upstream.reset()
    with client(till, key["scopedKey"], max_retries=0) as ac:
        for _ in range(20):
            try:
                with ac.messages.stream(
                    model=MODEL,
                    max_tokens=120,
                    messages=MESSAGES,
                    extra_headers={"x-mock-output-tokens": "120"},
                ) as stream:
                    stream.until_done()
            except anthropic.APIStatusError as exc:
                assert exc.status_code == 402
                assert isinstance(exc.body, dict)
                assert exc.body["error"]["type"] == "billing_error"
                assert exc.body["error"]["code"] == "token_limit_reached"
                break
        else:
            pytest.fail("the token limit never tripped")
    tokens, _ = billed(mock_upstream)
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == tokens <= 300
    assert after["heldTokens"] == 0


def test_activation_limit_is_final_in_anthropic_shape(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=2)
    mock_upstream.reset()
    # Default retries on: a refused key must not make the SDK loop.
    with client(till, key["scopedKey"], max_retries=2) as ac:
        ac.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
        ac.messages.count_tokens(model=MODEL, messages=MESSAGES)  # one activation too
        with pytest.raises(anthropic.APIStatusError) as caught:
            ac.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    err = caught.value
    assert err.status_code == 402
    assert err.type == "billing_error"
    body = err.body
    assert isinstance(body, dict) and body["type"] == "error"
    error = body["error"]
    assert error["type"] == "billing_error"
    assert error["code"] == "activation_limit_reached"
    assert (error["limit"], error["used"], error["remaining"]) == (2, 2, 0)
    assert len(mock_upstream.requests()) == 2, "no retry, nothing forwarded"
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 2
    assert after["status"] == "exhausted"


def test_bad_tokens_get_401_in_anthropic_shape(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    for bad in (token[:-1], token + "A", "garbage", ANTHROPIC_KEY):
        resp = httpx.post(
            f"{till.url}/v1/messages",
            headers={"x-api-key": bad, "anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 10, "messages": MESSAGES},
        )
        assert resp.status_code == 401
        body = resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
    with (
        client(till, token[:-2], max_retries=2) as ac,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        ac.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert caught.value.type == "authentication_error"
    assert mock_upstream.requests() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches/msgbatch_1/results"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/claude-sonnet-4-6"),
        ("GET", "/v1/organizations/me"),
        ("GET", "/v1/organizations/api_keys"),
        ("POST", "/v1/complete"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/messages/../files"),
        ("POST", "/v1//messages"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
    ],
)
def test_paths_outside_the_inference_list_are_not_forwarded(
    till: Till, admin: httpx.Client, mock_upstream: Mock, method: str, path: str
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    with httpx.Client(base_url=till.url) as http:
        request = http.build_request(
            method,
            till.url,
            headers={"x-api-key": token, "anthropic-version": "2023-06-01"},
            json={"model": MODEL} if method == "POST" else None,
        )
        request.url = request.url.copy_with(raw_path=path.encode())
        resp = http.send(request)
    assert resp.status_code == 404
    body = resp.json()
    assert body["error"]["code"] == "not_found"
    if path.startswith("/v1/messages/") and ".." not in path:
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert mock_upstream.requests() == []


def test_sdk_forbidden_calls_raise_not_found(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    with client(till, token, max_retries=0) as ac:
        with pytest.raises(anthropic.NotFoundError):
            ac.models.list()
        with pytest.raises(anthropic.NotFoundError) as caught:
            ac.messages.batches.list()
        assert caught.value.type == "not_found_error"
    assert mock_upstream.requests() == []


def test_beta_messages_pass_query_and_beta_header(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        ac.beta.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=MESSAGES,
            betas=["context-1m-2025-08-07"],
            extra_query={"beta": "true"},
        )
    (seen,) = mock_upstream.requests()
    assert seen["path"] == "/v1/messages"
    assert seen["query"] == {"beta": "true"}
    assert seen["headers"]["anthropic-beta"] == "context-1m-2025-08-07"
    assert get_key(admin, key["id"])["usedTokens"] > 0


def test_upstream_error_passes_through_and_bills_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=10_000)
    mock_upstream.reset()
    with (
        client(till, key["scopedKey"], max_retries=0) as ac,
        pytest.raises(anthropic.APIStatusError) as caught,
    ):
        ac.messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-mock-status": "529"}
        )
    assert caught.value.status_code == 529
    assert caught.value.type == "overloaded_error"
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == 0 and after["heldTokens"] == 0


def test_missing_max_tokens_is_answered_by_the_upstream(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    # Unlimited key: the request is forwarded as sent, and Anthropic's 400 comes back.
    key = create_key(admin)
    mock_upstream.reset()
    resp = httpx.post(
        f"{till.url}/v1/messages",
        headers={"x-api-key": key["scopedKey"], "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": MESSAGES},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" not in mock_upstream.requests()[0]["body"]
    # A token-limited key forwards a cap it can pay for, whatever the request said.
    limited = create_key(admin, max_tokens=500)
    mock_upstream.reset()
    resp = httpx.post(
        f"{till.url}/v1/messages",
        headers={"x-api-key": limited["scopedKey"], "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": MESSAGES},
    )
    assert resp.status_code == 200
    assert 0 < mock_upstream.requests()[0]["body"]["max_tokens"] < 500


def test_cut_stream_raises_in_the_sdk_and_charges_the_hold(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    with (
        client(till, key["scopedKey"], max_retries=0) as ac,
        pytest.raises(anthropic.APIStatusError) as caught,
        ac.messages.stream(
            model=MODEL, max_tokens=500, messages=MESSAGES, extra_headers={"x-mock-cut-after": "5"}
        ) as stream,
    ):
        stream.until_done()
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "upstream_unavailable"
    (seen,) = mock_upstream.requests()
    assert seen["cut"]
    after = get_key(admin, key["id"])
    # Usage unknown (no message_delta): the hold (estimated input + the whole cap) is charged.
    assert after["usedTokens"] > 500
    assert after["heldTokens"] == 0


def test_count_tokens_with_a_limited_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as ac:
        raw = ac.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES)
        assert raw.parse().input_tokens > 0
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == 0 and after["heldTokens"] == 0
    assert raw.headers["x-till-remaining-activations"] == "99"
    assert raw.headers["x-till-remaining-tokens"] == "1000"


def test_count_tokens_with_a_spend_limited_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_spend_cents=10)
    with client(till, key["scopedKey"], max_retries=0) as ac:
        assert ac.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0
    assert get_key(admin, key["id"])["usedSpendMicrocents"] == 0


def test_cut_stream_charges_the_hold(till: Till, admin: httpx.Client, mock_upstream: Mock) -> None:
    """What holds today, without the SDK: the stream ends with an error event, the hold is
    charged."""
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    with httpx.stream(
        "POST",
        f"{till.url}/v1/messages",
        headers={
            "x-api-key": key["scopedKey"],
            "anthropic-version": "2023-06-01",
            "x-mock-cut-after": "5",
        },
        json={"model": MODEL, "max_tokens": 500, "stream": True, "messages": MESSAGES},
    ) as resp:
        assert resp.status_code == 200
        text = resp.read().decode()
    last = text.strip().split("\n\n")[-1]
    assert '"type":"error"' in last and '"code":"upstream_unavailable"' in last
    assert "message_delta" not in text
    (seen,) = mock_upstream.requests()
    assert seen["cut"]
    after = get_key(admin, key["id"])
    assert after["usedTokens"] > 500
    assert after["heldTokens"] == 0


def test_streams_carry_the_remaining_budget_headers(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=100_000)
    with (
        client(till, key["scopedKey"]) as ac,
        ac.messages.with_streaming_response.create(
            model=MODEL, max_tokens=50, messages=MESSAGES, stream=True
        ) as resp,
    ):
        headers = resp.headers
        resp.read()
    assert headers["x-till-remaining-activations"] == "99"
    assert int(headers["x-till-remaining-tokens"]) < 100_000
