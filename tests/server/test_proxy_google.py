"""The Google proxy path through the real google-genai and openai SDKs, against the mock."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.conftest import Mock, Till, get_key
from tests.conftest import create_key as new_key
from till.server.pricing import Pricer, Usage

# A Google-looking key: the log scan (AIza) would catch it if it leaked.
GOOGLE_KEY = "AIzaSy-test-upstream-google-0123456789"
MODEL = "gemini-2.5-flash"  # priced by genai-prices
HELLO = "Hello there"
create_key = partial(new_key, provider="google", upstream_key=GOOGLE_KEY)


def gemini(
    till: Till,
    token: str,
    api_version: str = "v1beta",
    headers: dict[str, str] | None = None,
    retry: types.HttpRetryOptions | None = None,
) -> genai.Client:
    return genai.Client(
        api_key=token,
        http_options=types.HttpOptions(
            base_url=till.url, api_version=api_version, headers=headers, retry_options=retry
        ),
    )


def google_records(mock: Mock) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [r for r in mock.requests() if r["provider"] == "google"]  # type: ignore[misc]
    return records


def google_totals(mock: Mock) -> dict[str, int]:
    totals: dict[str, int] = httpx.get(f"{mock.url}/_mock/totals?by_provider=1").json()[
        "by_provider"
    ]["google"]
    return totals


def assert_clean_upstream_auth(record: dict[str, Any]) -> None:
    """The mock saw the real key in x-goog-api-key, and no Till token anywhere."""
    assert record["headers"]["x-goog-api-key"] == GOOGLE_KEY
    assert record["api_key"] == GOOGLE_KEY
    assert "key" not in record["query"]
    assert "authorization" not in record["headers"]
    assert "till_sk_" not in json.dumps(record)


def raw_post(
    till: Till, path: str, token: str | None, body: bytes, **headers: str
) -> httpx.Response:
    """A request with an exact path (httpx would normalise dot segments) and body."""
    with httpx.Client(timeout=30) as http:
        request = http.build_request(
            "POST",
            till.url,
            content=body,
            headers={"content-type": "application/json", **headers}
            | ({"x-goog-api-key": token} if token else {}),
        )
        request.url = request.url.copy_with(raw_path=path.encode())
        return http.send(request)


GENERATE_BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": HELLO}]}]}).encode()


# --- the SDK's calls ---


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
def test_generate_content_reaches_upstream_with_the_real_key(
    till: Till, admin: httpx.Client, mock_upstream: Mock, api_version: str
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with gemini(till, key["scopedKey"], api_version) as client:
        response = client.models.generate_content(model=MODEL, contents=HELLO)
    assert response.text
    assert response.usage_metadata is not None
    (seen,) = google_records(mock_upstream)
    assert seen["path"] == f"/{api_version}/models/{MODEL}:generateContent"
    assert_clean_upstream_auth(seen)
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == response.usage_metadata.total_token_count
    assert after["heldTokens"] == 0


@pytest.mark.parametrize("api_version", ["v1beta", "v1"])
def test_sse_stream_is_metered(
    till: Till, admin: httpx.Client, mock_upstream: Mock, api_version: str
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with gemini(till, key["scopedKey"], api_version) as client:
        chunks = list(client.models.generate_content_stream(model=MODEL, contents=HELLO))
    text = "".join(c.text or "" for c in chunks)
    (seen,) = google_records(mock_upstream)
    assert seen["path"] == f"/{api_version}/models/{MODEL}:streamGenerateContent"
    assert seen["query"] == {"alt": "sse"}
    assert_clean_upstream_auth(seen)
    final = chunks[-1].usage_metadata
    assert final is not None and final.candidates_token_count == len(text.split())
    after = get_key(admin, key["id"])
    assert (
        after["usedTokens"]
        == final.total_token_count
        == google_totals(mock_upstream)["total_tokens"]
    )
    assert after["usedActivations"] == 1 and after["heldTokens"] == 0


def test_count_tokens_is_free(till: Till, admin: httpx.Client, mock_upstream: Mock) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    with gemini(till, key["scopedKey"]) as client:
        counted = client.models.count_tokens(model=MODEL, contents=HELLO)
    assert counted.total_tokens == 5  # 3 + two words
    (seen,) = google_records(mock_upstream)
    assert seen["path"] == f"/v1beta/models/{MODEL}:countTokens"
    assert_clean_upstream_auth(seen)
    after = get_key(admin, key["id"])
    assert (after["usedActivations"], after["usedTokens"], after["heldTokens"]) == (1, 0, 0)


def test_embeddings_charge_the_input_estimate(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    # Gemini reports no usage for embeddings, so the hold is charged: for a key with a limit
    # that is the input estimate (request bytes / 3 + 1, never below the real count). A key
    # without limits holds nothing, so nothing is charged (see the report).
    key = create_key(admin, max_tokens=100_000)
    mock_upstream.reset()
    # google-genai's embed_content calls :batchEmbedContents on the Gemini API.
    with gemini(till, key["scopedKey"]) as client:
        result = client.models.embed_content(
            model="gemini-embedding-001", contents=["first text", "second one here"]
        )
    assert result.embeddings is not None and len(result.embeddings) == 2
    (seen,) = google_records(mock_upstream)
    assert seen["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert seen["usage"] is None
    assert_clean_upstream_auth(seen)
    after = get_key(admin, key["id"])
    assert after["usedTokens"] >= seen["planned_usage"]["total_tokens"] > 0
    assert after["heldTokens"] == 0
    # embedContent, with exact bytes: the charge is exactly the estimate.
    body = b'{"content": {"parts": [{"text": "one two three"}]}}'
    path = "/v1beta/models/gemini-embedding-001:embedContent"
    resp = raw_post(till, path, key["scopedKey"], body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["embedding"]["values"]
    assert get_key(admin, key["id"])["usedTokens"] == after["usedTokens"] + len(body) // 3 + 1


# --- the JSON-array stream, and the token in the query ---


def test_json_array_stream_passes_chunk_by_chunk_and_is_metered(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    path = f"/v1beta/models/{MODEL}:streamGenerateContent"
    arrivals: list[tuple[float, bytes]] = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{till.url}{path}",
            content=GENERATE_BODY,
            headers={
                "x-goog-api-key": key["scopedKey"],
                "content-type": "application/json",
                "x-mock-delay-ms": "150",
                "x-mock-output-tokens": "6",
            },
        ) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json")
        for chunk in resp.iter_raw():
            arrivals.append((time.time(), chunk))
    elements = json.loads(b"".join(c for _, c in arrivals))
    assert isinstance(elements, list) and len(elements) == 6
    (seen,) = google_records(mock_upstream)
    assert seen["query"] == {} and seen["completed"]
    assert_clean_upstream_auth(seen)
    # Relayed as it came: the first element was out well before the mock wrote the last one.
    assert len(arrivals) > 1
    assert arrivals[0][0] < seen["ended_at"] - 0.3
    final = elements[-1]["usageMetadata"]
    after = get_key(admin, key["id"])
    assert (
        after["usedTokens"]
        == final["totalTokenCount"]
        == google_totals(mock_upstream)["total_tokens"]
    )
    assert after["heldTokens"] == 0


@pytest.mark.parametrize("query", ["", "alt=sse&"])
def test_token_in_the_query_is_accepted_and_never_forwarded(
    till: Till, admin: httpx.Client, mock_upstream: Mock, query: str
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    method = "streamGenerateContent" if query else "generateContent"
    resp = httpx.post(
        f"{till.url}/v1beta/models/{MODEL}:{method}?{query}key={key['scopedKey']}",
        content=GENERATE_BODY,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    (seen,) = google_records(mock_upstream)
    assert seen["query"] == ({"alt": "sse"} if query else {})
    assert_clean_upstream_auth(seen)
    assert get_key(admin, key["id"])["usedTokens"] > 0


# --- money ---


def test_spend_matches_genai_prices_with_thoughts_and_cache(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_spend_cents=100)
    mock_upstream.reset()
    steer = {"x-mock-reasoning-tokens": "7", "x-mock-cached-tokens": "3"}
    long_prompt = "word " * 40
    config = types.GenerateContentConfig(max_output_tokens=12)  # the mock writes exactly 12
    with gemini(till, key["scopedKey"], headers=steer) as client:
        client.models.generate_content(model=MODEL, contents=long_prompt, config=config)
        list(
            client.models.generate_content_stream(model=MODEL, contents=long_prompt, config=config)
        )
    body = {
        "contents": [{"role": "user", "parts": [{"text": HELLO}]}],
        "generationConfig": {"maxOutputTokens": 12},
    }
    resp = httpx.post(
        f"{till.url}/v1beta/models/{MODEL}:streamGenerateContent",
        content=json.dumps(body).encode(),
        headers={"x-goog-api-key": key["scopedKey"], "content-type": "application/json", **steer},
        timeout=30,
    )
    assert resp.status_code == 200
    records = google_records(mock_upstream)
    assert len(records) == 3
    pricer = Pricer()
    expected_cost = 0
    for record in records:
        usage = Usage(**record["usage_normalized"])
        assert usage.cache_read_tokens == 3 and usage.output_tokens == 12
        cost = pricer.cost_microcents("google", MODEL, usage)
        assert cost is not None
        expected_cost += cost
    totals = google_totals(mock_upstream)
    assert totals["thoughts_tokens"] == 3 * 7 and totals["cached_tokens"] == 3 * 3
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == totals["total_tokens"]
    assert after["usedSpendMicrocents"] == expected_cost > 0
    assert after["heldSpendCents"] == 0
    # Thoughts are billed at the output rate: pricing them as input would cost less.
    as_input = sum(
        pricer.cost_microcents(  # type: ignore[misc]
            "google",
            MODEL,
            Usage(
                r["usage_normalized"]["input_tokens"] + 7,
                r["usage_normalized"]["output_tokens"] - 7,
                r["usage_normalized"]["cache_read_tokens"],
            ),
        )
        for r in records
    )
    assert as_input < expected_cost


# --- limits ---


def test_token_limit_lowers_max_output_tokens_and_thinking_budget(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    config = types.GenerateContentConfig(
        max_output_tokens=100_000,
        temperature=0.3,
        thinking_config=types.ThinkingConfig(thinking_budget=50_000),
    )
    with gemini(till, key["scopedKey"]) as client:
        response = client.models.generate_content(model=MODEL, contents=HELLO, config=config)
    (seen,) = google_records(mock_upstream)
    sent = seen["body"]["generationConfig"]
    assert 0 < sent["maxOutputTokens"] < 1000
    # google-genai writes the thinking config with proto field names (snake_case).
    assert sent["thinkingConfig"] == {"thinking_budget": sent["maxOutputTokens"]}
    assert sent["temperature"] == 0.3
    assert response.usage_metadata is not None
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == response.usage_metadata.total_token_count <= 1000
    assert after["heldTokens"] == 0


def test_token_limit_holds_for_streams(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=300)
    mock_upstream.reset()
    with gemini(till, key["scopedKey"], headers={"x-mock-output-tokens": "120"}) as client:
        for _ in range(20):
            try:
                list(client.models.generate_content_stream(model=MODEL, contents=HELLO))
            except genai_errors.ClientError as exc:
                assert (exc.code, exc.status) == (402, "PERMISSION_DENIED")
                assert exc.details["error"]["till_code"] == "token_limit_reached"
                break
        else:
            pytest.fail("the token limit never tripped")
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == google_totals(mock_upstream)["total_tokens"] <= 300
    assert after["heldTokens"] == 0


def test_exhausted_key_is_a_final_402_even_with_sdk_retries_on(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    sent: list[str] = []
    http = httpx.Client(timeout=30, event_hooks={"request": [lambda r: sent.append(r.url.path)]})
    retry = types.HttpRetryOptions(attempts=4, initial_delay=0.01, max_delay=0.02)

    def client(token: str, **headers: str) -> genai.Client:
        options = types.HttpOptions(
            base_url=till.url, headers=headers, retry_options=retry, httpx_client=http
        )
        return genai.Client(api_key=token, http_options=options)

    # The counter sees retries: a 429 from the provider is retried (4 attempts).
    with (
        client(create_key(admin)["scopedKey"], **{"x-mock-status": "429"}) as flaky,
        pytest.raises(genai_errors.ClientError) as caught,
    ):
        flaky.models.generate_content(model=MODEL, contents=HELLO)
    assert caught.value.code == 429 and len(sent) == 4

    key = create_key(admin, max_activations=2)
    mock_upstream.reset()
    sent.clear()
    with client(key["scopedKey"]) as sdk:
        sdk.models.generate_content(model=MODEL, contents=HELLO)
        list(sdk.models.generate_content_stream(model=MODEL, contents=HELLO))
        for call in (
            lambda: sdk.models.generate_content(model=MODEL, contents=HELLO),
            lambda: list(sdk.models.generate_content_stream(model=MODEL, contents=HELLO)),
        ):
            with pytest.raises(genai_errors.ClientError) as caught:
                call()
            assert (caught.value.code, caught.value.status) == (402, "PERMISSION_DENIED")
            error = caught.value.details["error"]
            assert error["till_code"] == "activation_limit_reached"
            assert (error["limit"], error["used"], error["remaining"]) == (2, 2, 0)
    http.close()
    assert len(sent) == 4, "one request per call: the 402 is not retried"
    assert len(google_records(mock_upstream)) == 2
    after = get_key(admin, key["id"])
    assert (after["usedActivations"], after["status"]) == (2, "exhausted")


def test_bad_token_gets_401_in_googles_shape(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    with (
        gemini(till, token[:-2] + "xx") as client,
        pytest.raises(genai_errors.ClientError) as caught,
    ):
        client.models.generate_content(model=MODEL, contents=HELLO)
    assert (caught.value.code, caught.value.status) == (401, "UNAUTHENTICATED")
    assert caught.value.details["error"]["till_code"] == "invalid_api_key"
    for bad in ("garbage", token + "A", "till_sk_" + "a" * 5000):
        resp = raw_post(till, f"/v1/models/{MODEL}:generateContent", bad, GENERATE_BODY)
        assert resp.status_code == 401
        assert resp.json()["error"]["status"] == "UNAUTHENTICATED"
    assert mock_upstream.requests() == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1beta/files"),
        ("GET", "/v1beta/files"),
        ("POST", "/upload/v1beta/files"),
        ("POST", "/v1beta/cachedContents"),
        ("GET", "/v1beta/cachedContents"),
        ("POST", "/v1beta/tunedModels"),
        ("POST", "/v1beta/tunedModels/mine:generateContent"),
        ("GET", "/v1beta/models"),
        ("GET", f"/v1beta/models/{MODEL}"),
        ("POST", "/v1beta/models/x:batchGenerateContent"),
        ("POST", "/v1beta/models/../files:generateContent"),
        ("POST", "/v1beta/models/%2e%2e/files:generateContent"),
        ("POST", "/v1beta/models/x%2F..%2Ffiles:generateContent"),
        ("POST", "/v1/models/../../v1beta/files:generateContent"),
        ("GET", f"/v1beta/models/{MODEL}:generateContent"),
        ("POST", f"/v1beta/models/{MODEL}:generateContent?fields=candidates"),
        ("POST", f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse&%24fields=x"),
        ("POST", "/v1beta/openai/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
    ],
)
def test_paths_outside_the_inference_list_are_not_forwarded(
    till: Till, admin: httpx.Client, mock_upstream: Mock, method: str, path: str
) -> None:
    token = create_key(admin)["scopedKey"]
    mock_upstream.reset()
    with httpx.Client(base_url=till.url) as http:
        request = http.build_request(
            method, till.url, headers={"x-goog-api-key": token}, content=GENERATE_BODY
        )
        request.url = request.url.copy_with(raw_path=path.encode())  # the query included
        resp = http.send(request)
    assert resp.status_code == 404
    error = resp.json()["error"]
    if path.startswith("/v1beta/"):
        assert (error["code"], error["status"]) == (404, "NOT_FOUND")
    # Gemini's shape under /v1beta, OpenAI's elsewhere: either way Till's code is not_found.
    assert error.get("till_code", error["code"]) == "not_found"
    assert mock_upstream.requests() == []


def test_upstream_error_passes_through_and_bills_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin, max_tokens=10_000)
    with (
        gemini(till, key["scopedKey"], headers={"x-mock-status": "500"}) as client,
        pytest.raises(genai_errors.ServerError) as caught,
    ):
        client.models.generate_content(model=MODEL, contents=HELLO)
    assert (caught.value.code, caught.value.status) == (500, "INTERNAL")
    after = get_key(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["usedTokens"] == 0 and after["heldTokens"] == 0


def test_client_leaving_a_json_array_stream_is_charged_what_it_saw(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{till.url}/v1beta/models/{MODEL}:streamGenerateContent",
            content=GENERATE_BODY,
            headers={
                "x-goog-api-key": key["scopedKey"],
                "content-type": "application/json",
                "x-mock-delay-ms": "200",
                "x-mock-output-tokens": "50",
            },
        ) as resp,
    ):
        first = next(resp.iter_raw())
        assert first.startswith(b"[")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (seen,) = google_records(mock_upstream)
        after = get_key(admin, key["id"])
        if seen["ended_at"] is not None and after["heldTokens"] == 0:
            break
        time.sleep(0.1)
    assert seen["disconnected"] and not seen["completed"]
    # The latest usage Till saw: the prompt and a few words, at most what the mock wrote.
    assert (
        5
        < after["usedTokens"]
        <= seen["usage_normalized"]["input_tokens"] + seen["usage_normalized"]["output_tokens"]
        < 5 + 50
    )


# --- the OpenAI SDK with a Google key ---


@pytest.fixture
def google_openai(till: Till, admin: httpx.Client) -> Iterator[tuple[openai.OpenAI, str]]:
    key = create_key(admin)
    with openai.OpenAI(api_key=key["scopedKey"], base_url=f"{till.url}/v1") as client:
        yield client, key["id"]


def test_openai_sdk_reaches_googles_openai_compatible_endpoint(
    admin: httpx.Client, mock_upstream: Mock, google_openai: tuple[openai.OpenAI, str]
) -> None:
    client, key_id = google_openai
    mock_upstream.reset()
    messages: Any = [{"role": "user", "content": HELLO}]
    completion = client.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    assert completion.usage is not None and chunks
    plain, streamed = google_records(mock_upstream)
    for seen in (plain, streamed):
        assert seen["path"] == "/v1beta/openai/chat/completions"
        assert seen["headers"]["authorization"] == f"Bearer {GOOGLE_KEY}"
        assert "x-goog-api-key" not in seen["headers"]
        assert "till_sk_" not in json.dumps(seen)
    assert streamed["body"]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks), "the usage chunk Till asked for is withheld"
    after = get_key(admin, key_id)
    assert after["usedActivations"] == 2
    assert after["usedTokens"] == google_totals(mock_upstream)["total_tokens"]
    assert after["heldTokens"] == 0


@pytest.mark.parametrize(
    "body",
    [b"{", b"[1,2]", b'{"contents": NaN}', b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b""],
)
def test_malformed_bodies_get_400_in_googles_shape_and_change_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock, body: bytes
) -> None:
    key = create_key(admin, max_tokens=1000)
    mock_upstream.reset()
    resp = raw_post(till, f"/v1beta/models/{MODEL}:generateContent", key["scopedKey"], body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["status"], error["till_code"]) == (
        400,
        "INVALID_ARGUMENT",
        "invalid_json",
    )
    assert mock_upstream.requests() == []
    assert get_key(admin, key["id"])["usedActivations"] == 0


def test_input_the_body_does_not_show_is_reserved_for(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    """A cached context or a file named by URI adds input Till cannot see in the body: a
    limited key holds TILL_HIDDEN_INPUT_TOKENS (128,000 by default) for it."""
    small = create_key(admin, max_tokens=50_000)
    mock_upstream.reset()
    cached = types.GenerateContentConfig(cached_content="cachedContents/abc123")
    video = types.Part.from_uri(file_uri="https://www.youtube.com/watch?v=x", mime_type="video/*")
    with gemini(till, small["scopedKey"]) as client:
        for call in (
            lambda: client.models.generate_content(model=MODEL, contents=HELLO, config=cached),
            lambda: client.models.generate_content(model=MODEL, contents=[video, HELLO]),
        ):
            with pytest.raises(genai_errors.ClientError) as caught:
                call()
            assert caught.value.code == 402
            assert caught.value.details["error"]["till_code"] == "token_limit_reached"
        assert mock_upstream.requests() == []
        client.models.generate_content(model=MODEL, contents=HELLO)  # nothing hidden: fits
    # Room for the hidden input and a little more: the output cap is what is left over.
    key = create_key(admin, max_tokens=130_000)
    mock_upstream.reset()
    with gemini(till, key["scopedKey"]) as client:
        response = client.models.generate_content(model=MODEL, contents=HELLO, config=cached)
    (seen,) = google_records(mock_upstream)
    assert seen["body"]["cachedContent"] == "cachedContents/abc123"
    assert 0 < seen["body"]["generationConfig"]["maxOutputTokens"] < 2000  # not 4096
    assert response.usage_metadata is not None
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == response.usage_metadata.total_token_count
    assert after["heldTokens"] == 0


def test_count_tokens_with_a_spend_limited_key(till: Till, admin: httpx.Client) -> None:
    key = create_key(admin, max_spend_cents=5)
    with gemini(till, key["scopedKey"]) as client:
        assert client.models.count_tokens(model=MODEL, contents=HELLO).total_tokens == 5
    after = get_key(admin, key["id"])
    assert (after["usedActivations"], after["usedSpendMicrocents"]) == (1, 0)


def test_google_system_parameter_headers_are_not_forwarded(
    till: Till, admin: httpx.Client, mock_upstream: Mock
) -> None:
    key = create_key(admin)
    mock_upstream.reset()
    headers = {"x-goog-fieldmask": "candidates", "x-http-method-override": "GET"}
    resp = raw_post(
        till, f"/v1beta/models/{MODEL}:generateContent", key["scopedKey"], GENERATE_BODY, **headers
    )
    assert resp.status_code == 200
    (seen,) = google_records(mock_upstream)
    assert not set(headers) & set(seen["headers"])


def test_embeddings_on_a_key_without_limits_are_charged_the_estimate(
    till: Till, admin: httpx.Client
) -> None:
    key = create_key(admin)
    body = b'{"content": {"parts": [{"text": "one two three"}]}}'
    path = "/v1beta/models/gemini-embedding-001:embedContent"
    assert raw_post(till, path, key["scopedKey"], body).status_code == 200
    after = get_key(admin, key["id"])
    assert after["usedTokens"] == len(body) // 3 + 1
    assert after["usedSpendMicrocents"] > 0
