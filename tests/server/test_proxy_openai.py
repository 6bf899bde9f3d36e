"""The OpenAI proxy path through the real openai SDK, against the mock upstream."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, Mock, Till, create_key, get_key


def client(till: Till, token: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", **kwargs)


MESSAGES = [{"role": "user", "content": "Hello there"}]


def test_plain_chat_reaches_upstream_with_the_real_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as oa:
        raw = oa.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    (seen,) = mock_upstream.requests()
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # type: ignore[index]
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == completion.usage.total_tokens
    assert after["heldTokens"] == 0
    assert after["lastUsedAt"] is not None
    assert raw.headers["x-till-remaining-activations"] == "99"
    assert "x-till-remaining-tokens" not in raw.headers


def test_stream_without_usage_request_meters_and_withholds_the_usage_chunk(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as oa:
        chunks = list(oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks and all(c.choices for c in chunks), "the usage-only chunk must be withheld"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    (seen,) = mock_upstream.requests()
    # Till asked for usage on the client's behalf.
    assert seen["body"]["stream_options"] == {"include_usage": True}  # type: ignore[index]
    totals = mock_upstream.totals()
    assert len(text.split()) == totals["completion_tokens"]
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == totals["total_tokens"] > 0
    assert after["usedActivations"] == 1


def test_stream_with_usage_request_passes_the_usage_chunk(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as oa:
        chunks = list(
            oa.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert get_key(admin, key["id"])["usedTokens"] == usage.total_tokens


def test_responses_completions_embeddings_and_models(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as oa:
        response = oa.responses.create(model="gpt-4o", input="Say something")
        assert response.usage is not None and response.output_text
        with oa.responses.stream(model="gpt-4o", input="Stream something") as stream:
            final = stream.get_final_response()
        assert final.usage is not None
        completion = oa.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
        assert completion.usage is not None
        embedding = oa.embeddings.create(model="text-embedding-3-small", input="hello world")
        assert embedding.data and embedding.usage.total_tokens == 2
        models = oa.models.list()
        assert list(models)
        assert oa.models.retrieve("gpt-4o").id == "gpt-4o"
    totals = mock_upstream.totals()
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 6
    assert after["usedTokens"] == totals["total_tokens"]


def test_activation_limit_is_exact_and_final(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_activations=3)
    mock_upstream.reset()
    # Default retries on: a refused key must not make the SDK loop.
    with client(till, key["scopedKey"], max_retries=2) as oa:
        for _ in range(3):
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as caught:
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 402
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "activation_limit_reached"
    assert (body["limit"], body["used"], body["remaining"]) == (3, 3, 0)
    assert len(mock_upstream.requests()) == 3
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 3
    assert after["status"] == "exhausted"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t[:20],
        lambda t: t + "A",
        lambda t: t.replace("till_sk_", "till_sk_x"),
        lambda t: t[:-3] + ("AAA" if not t.endswith("AAA") else "BBB"),
        lambda t: "garbage",
        lambda t: "x",
        lambda t: "till_sk_" + "a" * 5000,
    ],
)
def test_bad_tokens_get_401_and_never_reach_upstream(
    till: Till, admin: httpx.Client, mock_upstream: Mock, mangle: Any
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mangle(token)}"},
        json={"model": "gpt-4o", "messages": MESSAGES},
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert mock_upstream.requests() == []


def test_revoked_key_is_refused_without_upstream(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    with client(till, key["scopedKey"], max_retries=0) as oa:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        revoked = admin.delete(f"/admin/keys/{key['id']}").json()["key"]
        assert revoked["status"] == "revoked"
        mock_upstream.reset()
        with pytest.raises(openai.AuthenticationError) as caught:
            oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "key_revoked"
    assert mock_upstream.requests() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/organization/users"),
        ("POST", "/v1/assistants"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions/../files"),
        ("POST", "/v1//chat/completions"),
        ("GET", "/v1/models/../files"),
    ],
)
def test_paths_outside_the_inference_list_are_not_forwarded(
    till: Till, admin: httpx.Client, mock_upstream: Mock, method: str, path: str
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    # A raw request: httpx would normalise the dot segments away.
    with httpx.Client(base_url=till.url) as http:
        request = http.build_request(method, till.url, headers={"authorization": f"Bearer {token}"})
        request.url = request.url.copy_with(raw_path=path.encode())
        resp = http.send(request)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
    assert mock_upstream.requests() == []


def test_token_limit_lowers_the_output_cap(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    with client(till, key["scopedKey"]) as oa:
        completion = oa.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=100_000
        )
    (seen,) = mock_upstream.requests()
    forwarded = seen["body"]["max_tokens"]  # type: ignore[index]
    assert 0 < forwarded < 1000
    assert completion.usage is not None
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == completion.usage.total_tokens <= 1000
    assert after["heldTokens"] == 0


def test_token_limit_holds_for_streams(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=300)
    mock_upstream.reset()
    used = 0
    with client(till, key["scopedKey"], max_retries=0) as oa:
        for _ in range(20):
            try:
                stream = oa.chat.completions.create(
                    model="gpt-4o",
                    messages=MESSAGES,
                    stream=True,
                    extra_headers={"x-mock-output-tokens": "120"},
                )
                list(stream)
            except openai.APIStatusError as exc:
                assert exc.status_code == 402
                assert exc.code == "token_limit_reached"
                break
        else:
            pytest.fail("the token limit never tripped")
    used = mock_upstream.totals()["total_tokens"]
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == used <= 300
    assert after["heldTokens"] == 0


def test_spend_limit_refuses_unknown_models_and_meters_cents(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_spend_cents=5)
    mock_upstream.reset()
    with client(till, key["scopedKey"], max_retries=0) as oa:
        with pytest.raises(openai.BadRequestError) as caught:
            oa.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES)
        assert caught.value.code == "unknown_model_price"
        assert "no-such-model-xyz" in str(caught.value)
        assert mock_upstream.requests() == []
        raw = oa.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    after = get_key(admin, key["id"])
    assert 0 < after["usedSpendMicrocents"] < 5_000_000
    assert float(raw.headers["x-till-remaining-spend-cents"]) < 5


def test_ip_whitelist(till: Till, admin: httpx.Client, mock_upstream: Mock) -> None:
    far = create_key(admin, ip_whitelist=["10.0.0.0/8"])
    near = create_key(admin, ip_whitelist=["127.0.0.1"])
    mock_upstream.reset()
    with (
        client(till, far["scopedKey"], max_retries=0) as oa,
        pytest.raises(openai.PermissionDeniedError) as caught,
    ):
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "ip_not_allowed"
    assert mock_upstream.requests() == []
    with client(till, near["scopedKey"]) as oa:
        oa.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(mock_upstream.requests()) == 1


def test_upstream_error_passes_through_and_bills_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=10_000)
    with (
        client(till, key["scopedKey"], max_retries=0) as oa,
        pytest.raises(openai.InternalServerError),
    ):
        oa.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
        )
    after = get_key(admin, key["id"])
    # Documented rule: the activation counts, tokens and cents are not billed.
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == 0 and after["heldTokens"] == 0


def test_upstream_redirect_is_not_followed(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key['scopedKey']}", "x-mock-redirect": "1"},
        json={"model": "gpt-4o", "messages": MESSAGES},
    )
    assert resp.status_code == 502
    assert "location" not in resp.headers
    paths = [r["path"] for r in mock_upstream.requests()]
    assert paths == ["/v1/chat/completions"]


@pytest.mark.parametrize(
    "body",
    [b"{", b"[1,2]", b'{"model": NaN}', b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b""],
)
def test_malformed_bodies_get_400_and_change_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock, body: bytes
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    resp = httpx.post(
        f"{till.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key['scopedKey']}", "content-type": "application/json"},
        content=body,
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"
    assert mock_upstream.requests() == []
    assert get_key(admin, key["id"])["usedActivations"] == 0


def test_body_cap_answers_413_before_reading(till: Till, admin: httpx.Client) -> None:
    key = create_key(admin)
    host, port = till.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: till\r\n"
            + f"authorization: Bearer {key['scopedKey']}\r\n".encode()
            + b"content-type: application/json\r\ncontent-length: 10000000000\r\n\r\n{"
        )
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"payload_too_large" in reply
    assert get_key(admin, key["id"])["usedActivations"] == 0


def test_stored_conversation_input_is_reserved_for(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """A Responses call that continues a stored conversation has input the body cannot show:
    a limited key holds TILL_HIDDEN_INPUT_TOKENS (128,000 by default) for it."""
    small = create_key(admin, max_tokens=50_000)
    large = create_key(admin, max_tokens=1_000_000)
    mock_upstream.reset()
    with client(till, small["scopedKey"], max_retries=0) as oa:
        with pytest.raises(openai.APIStatusError) as caught:
            oa.responses.create(model="gpt-4o", input="go on", previous_response_id="resp_1")
        assert caught.value.status_code == 402
        assert caught.value.code == "token_limit_reached"
        assert mock_upstream.requests() == []
        oa.responses.create(model="gpt-4o", input="a fresh start")  # no stored input: fits
    with client(till, large["scopedKey"], max_retries=0) as oa:
        raw = oa.responses.with_raw_response.create(
            model="gpt-4o", input="go on", previous_response_id="resp_1", max_output_tokens=100
        )
    # The hold covered the hidden input; settlement charged what the provider reported.
    assert int(raw.headers["x-till-remaining-tokens"]) > 1_000_000 - 129_000
    assert get_key(admin, large["id"])["heldTokens"] == 0
