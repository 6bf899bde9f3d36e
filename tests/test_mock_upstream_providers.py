"""The mock upstream speaks Anthropic's and Gemini's wire formats well enough for their SDKs.

Each provider is driven with its real SDK straight at the mock (no Till in between); the
assertions are on what the SDK parsed, on the mock's records (``provider``, ``api_key``,
``usage``, ``usage_normalized``) and on ``/_mock/totals?by_provider=1``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from openai import OpenAI

from tests.mock_upstream import MockUpstream, MockUpstreamProcess

ANT_KEY = "sk-ant-test"
GOOGLE_KEY = "AIza-test"
CLAUDE = "claude-test-1"  # not a real model name: the SDK warns about deprecated ones
GEMINI = "gemini-2.0-flash"
SYSTEM = "You are terse."  # 3 + 3
USER = "Say hello to the world"  # 3 + 5
PROMPT_TOKENS = 14
ANT_MESSAGES = [{"role": "user", "content": USER}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstreamProcess]:
    with MockUpstreamProcess() as proc:
        yield proc
        proc.stop()
        stderr = proc.stderr_text()
    assert "Traceback" not in stderr, stderr
    assert "Error handling request" not in stderr, stderr


@pytest.fixture(autouse=True)
def _clean(mock: MockUpstreamProcess) -> None:
    mock.reset()


@pytest.fixture
def claude(mock: MockUpstreamProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key=ANT_KEY, base_url=mock.url, max_retries=0) as c:
        yield c


def _gemini(
    mock: MockUpstreamProcess, api_version: str = "v1beta", headers: dict[str, str] | None = None
) -> genai.Client:
    options = genai_types.HttpOptions(base_url=mock.url, api_version=api_version, headers=headers)
    return genai.Client(api_key=GOOGLE_KEY, http_options=options)


@pytest.fixture
def gemini(mock: MockUpstreamProcess) -> Iterator[genai.Client]:
    client = _gemini(mock)
    yield client
    client.close()


def _wait_for_end(mock: MockUpstreamProcess, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        records = mock.requests()
        if records and records[-1]["ended_at"] is not None:
            return records[-1]
        assert time.monotonic() < deadline, records
        time.sleep(0.02)


def _normalized(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
    }


def _check_totals_add_up(mock: MockUpstreamProcess) -> dict[str, Any]:
    """Totals equal the sums of the records' usage_normalized, overall and per provider."""
    totals = mock.totals(by_provider=True)
    records = mock.requests()
    for name, scope in [(None, totals), *totals["by_provider"].items()]:
        mine = [r for r in records if name is None or r["provider"] == name]
        usages = [r["usage_normalized"] for r in mine if r["usage_normalized"]]
        assert scope["requests"] == len(mine)
        assert scope["prompt_tokens"] == sum(u["input_tokens"] for u in usages)
        assert scope["completion_tokens"] == sum(u["output_tokens"] for u in usages)
        assert scope["total_tokens"] == scope["prompt_tokens"] + scope["completion_tokens"]
    legacy = {k: v for k, v in totals.items() if k != "by_provider"}
    assert mock.totals() == legacy  # the default shape is unchanged
    return totals


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_plain(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    message = claude.messages.create(
        model=CLAUDE, max_tokens=1024, system=SYSTEM, messages=ANT_MESSAGES
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == CLAUDE
    assert message.stop_reason == "end_turn"
    (block,) = message.content
    assert block.type == "text" and len(block.text.split()) == 20
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)

    (record,) = mock.requests()
    assert record["path"] == "/v1/messages"
    assert record["provider"] == "anthropic"
    assert record["api_key"] == ANT_KEY
    assert record["headers"]["authorization"] == f"Bearer {ANT_KEY}"  # what anthropic>=2 sends
    assert record["anthropic_version"] == anthropic._constants.ANTHROPIC_API_VERSION
    assert record["anthropic_beta"] is None
    assert record["model"] == CLAUDE and record["stream"] is False
    assert record["usage_format"] == "anthropic"
    assert record["usage"] == message.usage.model_dump(exclude_none=True)
    assert record["usage_normalized"] == _normalized(PROMPT_TOKENS, 20)
    assert record["planned_usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 20,
        "total_tokens": PROMPT_TOKENS + 20,
    }
    totals = _check_totals_add_up(mock)
    assert totals["by_provider"]["anthropic"]["total_tokens"] == PROMPT_TOKENS + 20
    assert totals["by_provider"]["openai"]["requests"] == 0


def test_anthropic_x_api_key_and_beta_header(mock: MockUpstreamProcess) -> None:
    headers = {"x-api-key": ANT_KEY, "anthropic-version": "2023-06-01"}
    headers["anthropic-beta"] = "prompt-caching-2024-07-31"
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.url}/v1/messages",
            json={"model": CLAUDE, "max_tokens": 3, "messages": ANT_MESSAGES},
            headers=headers,
        )
    assert resp.status_code == 200
    assert resp.headers["request-id"].startswith("req_")
    assert resp.json()["stop_reason"] == "max_tokens"
    (record,) = mock.requests()
    assert record["api_key"] == ANT_KEY
    assert record["anthropic_version"] == "2023-06-01"
    assert record["anthropic_beta"] == "prompt-caching-2024-07-31"
    assert record["request_id"] == resp.headers["request-id"]


@pytest.mark.parametrize(
    ("max_tokens", "output_header", "expected", "stop_reason"),
    [(5, None, 5, "max_tokens"), (50, "7", 7, "end_turn"), (7, "7", 7, "max_tokens")],
)
def test_anthropic_output_length(
    claude: anthropic.Anthropic,
    max_tokens: int,
    output_header: str | None,
    expected: int,
    stop_reason: str,
) -> None:
    headers = {"x-mock-output-tokens": output_header} if output_header else {}
    message = claude.messages.create(
        model=CLAUDE, max_tokens=max_tokens, messages=ANT_MESSAGES, extra_headers=headers
    )
    assert message.stop_reason == stop_reason
    assert message.usage.output_tokens == expected
    assert message.content[0].type == "text"
    assert len(message.content[0].text.split()) == expected


def test_anthropic_cache_headers(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    message = claude.messages.create(
        model=CLAUDE,
        max_tokens=1024,
        messages=ANT_MESSAGES,
        extra_headers={
            "x-mock-prompt-tokens": "1000",
            "x-mock-cache-creation-tokens": "300",
            "x-mock-cache-read-tokens": "600",
            "x-mock-output-tokens": "4",
        },
    )
    usage = message.usage
    assert usage.input_tokens == 100  # the prompt minus cache reads and writes
    assert usage.cache_creation_input_tokens == 300
    assert usage.cache_read_input_tokens == 600
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == 300
    (record,) = mock.requests()
    assert record["usage_normalized"] == _normalized(1000, 4, cache_read=600, cache_write=300)
    anthropic_totals = _check_totals_add_up(mock)["by_provider"]["anthropic"]
    assert anthropic_totals == {
        "requests": 1,
        "prompt_tokens": 1000,
        "completion_tokens": 4,
        "total_tokens": 1004,
        "cache_read_tokens": 600,
        "cache_write_tokens": 300,
        "cache_creation_tokens": 300,
    }


def test_anthropic_stream_helper(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    with claude.messages.stream(
        model=CLAUDE,
        max_tokens=1024,
        system=SYSTEM,
        messages=ANT_MESSAGES,
        extra_headers={"x-mock-output-tokens": "6", "x-mock-cache-read-tokens": "4"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "alpha bravo charlie delta echo foxtrot"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == PROMPT_TOKENS - 4
    assert final.usage.cache_read_input_tokens == 4
    assert final.usage.output_tokens == 6
    record = _wait_for_end(mock)
    assert record["stream"] is True and record["completed"] is True
    assert record["events_sent"] == 6 + 6  # start, block start, ping, 6 deltas, stop, delta, stop
    assert record["output_tokens_sent"] == 6
    assert record["usage"] == final.usage.model_dump(exclude_none=True)
    assert record["usage_normalized"] == _normalized(PROMPT_TOKENS, 6, cache_read=4)
    _check_totals_add_up(mock)


def test_anthropic_create_stream_events(claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(model=CLAUDE, max_tokens=3, messages=ANT_MESSAGES, stream=True)
    with stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK drops the ping
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.input_tokens == 8
    assert start.message.stop_reason is None and start.message.content == []
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 3  # cumulative
    assert delta.usage.input_tokens == 8
    assert delta.usage.cache_read_input_tokens == 0


def test_anthropic_stream_wire_format(mock: MockUpstreamProcess) -> None:
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.url}/v1/messages",
            json={"model": CLAUDE, "max_tokens": 2, "messages": ANT_MESSAGES, "stream": True},
            headers={"x-api-key": ANT_KEY, "anthropic-version": "2023-06-01"},
        )
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.endswith("\n\n") and "\r" not in resp.text
    blocks = [b.split("\n") for b in resp.text[:-2].split("\n\n")]
    assert all(len(b) == 2 and b[0].startswith("event: ") for b in blocks)
    names = [b[0].removeprefix("event: ") for b in blocks]
    datas = [json.loads(b[1].removeprefix("data: ")) for b in blocks]
    assert names == [d["type"] for d in datas]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [d["delta"]["text"] for d in datas if d["type"] == "content_block_delta"] == [
        "alpha",
        " bravo",
    ]


def test_anthropic_count_tokens(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    count = claude.messages.count_tokens(model=CLAUDE, system=SYSTEM, messages=ANT_MESSAGES)
    assert count.input_tokens == PROMPT_TOKENS
    (record,) = mock.requests()
    assert record["path"] == "/v1/messages/count_tokens"
    assert record["provider"] == "anthropic"
    assert record["usage"] is None and record["usage_normalized"] is None
    totals = _check_totals_add_up(mock)
    assert totals["requests"] == 1 and totals["total_tokens"] == 0


def test_anthropic_errors(mock: MockUpstreamProcess) -> None:
    body = {"model": CLAUDE, "max_tokens": 5, "messages": ANT_MESSAGES}
    version = {"anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=mock.url) as http:
        missing_key = http.post("/v1/messages", json=body, headers=version)
        no_version = http.post("/v1/messages", json=body, headers={"x-api-key": ANT_KEY})
        no_max = http.post(
            "/v1/messages",
            json={"model": CLAUDE, "messages": ANT_MESSAGES},
            headers={"x-api-key": ANT_KEY, **version},
        )
    assert missing_key.status_code == 401
    assert missing_key.json()["error"] == {
        "type": "authentication_error",
        "message": "x-api-key header is required",
    }
    assert no_version.status_code == 400
    assert no_version.json()["error"]["message"] == "anthropic-version: header is required"
    assert no_max.status_code == 400
    error = no_max.json()
    assert error["type"] == "error"
    assert error["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    assert error["request_id"].startswith("req_")
    assert [r["status"] for r in mock.requests()] == [401, 400, 400]
    assert mock.requests()[2]["error"] == error


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (529, anthropic.APIStatusError, "overloaded_error"),
    ],
)
def test_anthropic_status_injection(
    claude: anthropic.Anthropic,
    mock: MockUpstreamProcess,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error_class) as info:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=5,
            messages=ANT_MESSAGES,
            extra_headers={"x-mock-status": str(status)},
        )
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == error_type
    (record,) = mock.requests()
    assert record["status"] == status and record["usage_normalized"] is None


def test_anthropic_error_after(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    received = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        claude.messages.stream(
            model=CLAUDE,
            max_tokens=50,
            messages=ANT_MESSAGES,
            extra_headers={"x-mock-error-after": "5"},
        ) as stream,
    ):
        received.extend(stream.text_stream)
    assert received == ["alpha", " bravo"]  # start, block start, ping, 2 deltas, then the error
    assert isinstance(info.value.body, dict)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    record = _wait_for_end(mock)
    assert record["error"] == info.value.body
    assert record["completed"] is False
    # message_start already told the client about the input: that partial usage is recorded.
    assert record["usage"]["output_tokens"] == 1
    assert record["usage_normalized"] == _normalized(3 + 5, 1)


def test_anthropic_cut_after(claude: anthropic.Anthropic, mock: MockUpstreamProcess) -> None:
    # The SDK lets the transport's error through when the body breaks mid-stream.
    with (
        pytest.raises(httpx2.RemoteProtocolError),
        claude.messages.stream(
            model=CLAUDE,
            max_tokens=50,
            messages=ANT_MESSAGES,
            extra_headers={"x-mock-cut-after": "4"},
        ) as stream,
    ):
        stream.get_final_message()
    record = _wait_for_end(mock)
    assert record["cut"] is True and record["completed"] is False
    assert record["events_sent"] == 4 and record["output_tokens_sent"] == 1
    assert record["usage"]["output_tokens"] == 1  # only message_start's usage got through


def test_anthropic_openai_compatible_endpoint(mock: MockUpstreamProcess) -> None:
    with OpenAI(base_url=mock.base_url, api_key=ANT_KEY, max_retries=0) as client:
        completion = client.chat.completions.create(
            model=CLAUDE, messages=[{"role": "user", "content": USER}], max_tokens=4
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model=CLAUDE,
                messages=[{"role": "user", "content": USER}],
                extra_headers={"Authorization": ""},
            )
    record = mock.requests()[0]
    assert record["path"] == "/v1/chat/completions"
    assert record["provider"] == "anthropic"
    assert record["api_key"] == ANT_KEY
    assert record["usage_format"] == "openai"
    assert record["usage_normalized"] == _normalized(3 + 5, 4)
    totals = _check_totals_add_up(mock)
    assert totals["by_provider"]["anthropic"]["total_tokens"] == 12
    assert totals["by_provider"]["openai"]["requests"] == 1  # the keyless one


# --------------------------------------------------------------------------- Gemini


def test_gemini_generate_content(gemini: genai.Client, mock: MockUpstreamProcess) -> None:
    response = gemini.models.generate_content(
        model=GEMINI,
        contents=USER,
        config=genai_types.GenerateContentConfig(system_instruction=SYSTEM),
    )
    assert response.text is not None and len(response.text.split()) == 20
    assert response.candidates and response.candidates[0].finish_reason == "STOP"
    assert response.model_version == GEMINI
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == PROMPT_TOKENS
    assert usage.candidates_token_count == 20
    assert usage.total_token_count == PROMPT_TOKENS + 20
    assert usage.thoughts_token_count is None and usage.cached_content_token_count is None

    (record,) = mock.requests()
    assert record["path"] == f"/v1beta/models/{GEMINI}:generateContent"
    assert record["provider"] == "google"
    assert record["api_key"] == GOOGLE_KEY
    assert record["headers"]["x-goog-api-key"] == GOOGLE_KEY
    assert record["model"] == GEMINI and record["stream"] is False
    assert record["usage_format"] == "gemini"
    assert record["usage"] == usage.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert record["usage_normalized"] == _normalized(PROMPT_TOKENS, 20)
    _check_totals_add_up(mock)


def test_gemini_thoughts_cache_and_cap(mock: MockUpstreamProcess) -> None:
    headers = {"x-mock-reasoning-tokens": "2", "x-mock-cached-tokens": "5"}
    with _gemini(mock, headers=headers) as client:
        response = client.models.generate_content(
            model=GEMINI,
            contents=USER,
            config=genai_types.GenerateContentConfig(max_output_tokens=6),
        )
    assert response.candidates and response.candidates[0].finish_reason == "MAX_TOKENS"
    assert response.text == "alpha bravo charlie delta"  # 6 output tokens, 2 of them thoughts
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == 8
    assert usage.candidates_token_count == 4
    assert usage.thoughts_token_count == 2
    assert usage.cached_content_token_count == 5
    assert usage.total_token_count == 8 + 4 + 2  # thoughts count apart from candidates
    (record,) = mock.requests()
    assert record["usage_normalized"] == _normalized(8, 6, cache_read=5)
    google = _check_totals_add_up(mock)["by_provider"]["google"]
    assert google == {
        "requests": 1,
        "prompt_tokens": 8,
        "completion_tokens": 6,
        "total_tokens": 14,
        "cache_read_tokens": 5,
        "cache_write_tokens": 0,
        "cached_tokens": 5,
        "thoughts_tokens": 2,
    }


def test_gemini_stream_with_the_sdk(gemini: genai.Client, mock: MockUpstreamProcess) -> None:
    chunks = list(
        gemini.models.generate_content_stream(
            model=GEMINI,
            contents=USER,
            config=genai_types.GenerateContentConfig(max_output_tokens=5),
        )
    )
    assert [c.text for c in chunks] == ["alpha", " bravo", " charlie", " delta", " echo"]
    counts = [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata]
    assert counts == [1, 2, 3, 4, 5]  # cumulative: the last chunk holds the totals
    assert [c.candidates[0].finish_reason for c in chunks if c.candidates] == [
        None,
        None,
        None,
        None,
        "MAX_TOKENS",
    ]
    record = _wait_for_end(mock)
    assert record["path"] == f"/v1beta/models/{GEMINI}:streamGenerateContent"
    assert record["query"]["alt"] == "sse"  # the SDK streams SSE
    assert record["stream"] is True and record["completed"] is True
    assert record["events_sent"] == 5 and record["output_tokens_sent"] == 5
    assert record["usage_normalized"] == _normalized(8, 5)
    _check_totals_add_up(mock)


def _gemini_stream_request(
    mock: MockUpstreamProcess, query: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {
        "contents": [{"role": "user", "parts": [{"text": USER}]}],
        "systemInstruction": {"parts": [{"text": SYSTEM}]},
        "generationConfig": {"maxOutputTokens": 3},
    }
    with httpx.Client() as http:
        return http.post(
            f"{mock.url}/v1beta/models/{GEMINI}:streamGenerateContent?{query}",
            json=body,
            headers=headers or {"x-goog-api-key": GOOGLE_KEY},
        )


def test_gemini_sse_wire_format(mock: MockUpstreamProcess) -> None:
    resp = _gemini_stream_request(mock, "alt=sse")
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.text.endswith("\r\n\r\n")
    events = resp.text[: -len("\r\n\r\n")].split("\r\n\r\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events]
    assert '"candidates": [{"content": {"parts": [{"text": "alpha"}],"role": "model"}' in events[0]
    assert [c["usageMetadata"].get("candidatesTokenCount") for c in chunks] == [1, 2, 3]
    assert chunks[-1]["usageMetadata"]["totalTokenCount"] == PROMPT_TOKENS + 3
    assert chunks[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])


def test_gemini_json_array_stream(mock: MockUpstreamProcess) -> None:
    resp = _gemini_stream_request(mock, f"key={GOOGLE_KEY}", headers={})
    assert resp.headers["content-type"].startswith("application/json")
    text = resp.text
    assert text.startswith("[{\n") and text.endswith("}\n]")
    assert text.count("\n,\r\n") == 2
    chunks = json.loads(text)
    assert isinstance(chunks, list) and len(chunks) == 3
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == (
        "alpha bravo charlie"
    )
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    (record,) = mock.requests()
    assert record["api_key"] == GOOGLE_KEY and record["query"]["key"] == GOOGLE_KEY
    assert record["events_sent"] == 3
    assert record["usage_normalized"] == _normalized(PROMPT_TOKENS, 3)


def test_gemini_json_array_stream_is_written_incrementally(mock: MockUpstreamProcess) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 3}}
    with (
        httpx.Client() as http,
        http.stream(
            "POST",
            f"{mock.url}/v1/models/{GEMINI}:streamGenerateContent",
            json=body,
            headers={"x-goog-api-key": GOOGLE_KEY, "x-mock-delay-ms": "100"},
        ) as resp,
    ):
        pieces = [piece.decode() for piece in resp.iter_raw()]
    # The first element arrives on its own, long before the array is closed.
    assert len(pieces) >= 2
    assert pieces[0].startswith("[{") and not pieces[0].endswith("]")
    assert len(json.loads("".join(pieces))) == 3


def test_gemini_count_tokens_and_embeddings(
    gemini: genai.Client, mock: MockUpstreamProcess
) -> None:
    count = gemini.models.count_tokens(model=GEMINI, contents="one two three")
    assert count.total_tokens == 3 + 3
    embedded = gemini.models.embed_content(
        model="text-embedding-004",
        contents=["one two", "three"],
        config=genai_types.EmbedContentConfig(output_dimensionality=8),
    )
    assert embedded.embeddings is not None and len(embedded.embeddings) == 2
    assert all(e.values is not None and len(e.values) == 8 for e in embedded.embeddings)
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.url}/v1beta/models/text-embedding-004:embedContent",
            json={"content": {"parts": [{"text": "four five six"}]}},
            headers={"x-goog-api-key": GOOGLE_KEY},
        )
    assert set(resp.json()) == {"embedding"}
    assert len(resp.json()["embedding"]["values"]) == 16

    count_rec, batch_rec, embed_rec = mock.requests()
    assert count_rec["path"] == f"/v1beta/models/{GEMINI}:countTokens"
    assert batch_rec["path"] == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert embed_rec["path"] == "/v1beta/models/text-embedding-004:embedContent"
    assert all(r["usage"] is None and r["usage_normalized"] is None for r in mock.requests())
    assert batch_rec["planned_usage"]["prompt_tokens"] == 3  # recorded, never reported
    assert embed_rec["planned_usage"]["prompt_tokens"] == 3
    totals = _check_totals_add_up(mock)
    assert totals["requests"] == 3 and totals["total_tokens"] == 0


def test_gemini_v1(mock: MockUpstreamProcess) -> None:
    with _gemini(mock, api_version="v1") as client:
        response = client.models.generate_content(model=GEMINI, contents="hi there")
        chunks = list(client.models.generate_content_stream(model=GEMINI, contents="hi"))
    assert response.usage_metadata and response.usage_metadata.prompt_token_count == 5
    assert len(chunks) == 20
    assert [r["path"] for r in mock.requests()] == [
        f"/v1/models/{GEMINI}:generateContent",
        f"/v1/models/{GEMINI}:streamGenerateContent",
    ]
    assert {r["provider"] for r in mock.requests()} == {"google"}


def test_gemini_errors(mock: MockUpstreamProcess) -> None:
    with httpx.Client(base_url=mock.url) as http:
        no_key = http.post(f"/v1beta/models/{GEMINI}:generateContent", json={"contents": []})
        no_contents = http.post(
            f"/v1beta/models/{GEMINI}:generateContent",
            json={},
            headers={"x-goog-api-key": GOOGLE_KEY},
        )
        unknown = http.post(
            f"/v1beta/models/{GEMINI}:doSomething",
            json={},
            headers={"x-goog-api-key": GOOGLE_KEY},
        )
    assert no_key.status_code == 403
    assert no_key.json()["error"]["status"] == "PERMISSION_DENIED"
    assert no_contents.status_code == 400
    assert no_contents.json() == {
        "error": {
            "code": 400,
            "message": "* GenerateContentRequest.contents: contents is not specified\n",
            "status": "INVALID_ARGUMENT",
        }
    }
    assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"


def test_gemini_status_injection(mock: MockUpstreamProcess) -> None:
    with (
        _gemini(mock, headers={"x-mock-status": "429"}) as client,
        pytest.raises(genai_errors.ClientError) as info,
    ):
        client.models.generate_content(model=GEMINI, contents="hi")
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"
    (record,) = mock.requests()
    assert record["error"]["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_gemini_error_after(mock: MockUpstreamProcess) -> None:
    received = []
    with (
        _gemini(mock, headers={"x-mock-error-after": "2"}) as client,
        pytest.raises(genai_errors.ServerError) as info,
    ):
        for chunk in client.models.generate_content_stream(model=GEMINI, contents="hi"):
            received.append(chunk.text)
    assert received == ["alpha", " bravo"]
    assert info.value.code == 500 and info.value.status == "INTERNAL"
    record = _wait_for_end(mock)
    assert record["error"]["error"]["code"] == 500
    assert record["usage_normalized"] == _normalized(4, 2)  # the last usage the client saw


async def test_only_configured_keys_are_accepted() -> None:
    async with MockUpstream(api_keys=frozenset({"AIza-real", "sk-ant-real"})) as server:
        url = f"http://{server.host}:{server.port}"
        body = {"contents": [{"parts": [{"text": "hi"}]}]}
        async with httpx.AsyncClient(base_url=url) as http:
            wrong = await http.post(
                f"/v1beta/models/{GEMINI}:generateContent",
                json=body,
                headers={"x-goog-api-key": "AIza-wrong"},
            )
            right = await http.post(
                f"/v1beta/models/{GEMINI}:generateContent?key=AIza-real", json=body
            )
            ant = await http.post(
                "/v1/messages",
                json={"model": CLAUDE, "max_tokens": 1, "messages": ANT_MESSAGES},
                headers={"x-api-key": "sk-ant-wrong", "anthropic-version": "2023-06-01"},
            )
        assert wrong.status_code == 400
        assert wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        assert right.status_code == 200
        assert ant.status_code == 401
        assert ant.json()["error"] == {
            "type": "authentication_error",
            "message": "invalid x-api-key",
        }
        assert [r["api_key"] for r in server.records] == ["AIza-wrong", "AIza-real", "sk-ant-wrong"]


def test_google_openai_compatible_endpoint(mock: MockUpstreamProcess) -> None:
    with OpenAI(base_url=f"{mock.url}/v1beta/openai", api_key=GOOGLE_KEY, max_retries=0) as c:
        chunks = list(
            c.chat.completions.create(
                model=GEMINI,
                messages=[{"role": "user", "content": USER}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8 + 3
    (record,) = mock.requests()
    assert record["path"] == "/v1beta/openai/chat/completions"
    assert record["provider"] == "google"
    assert record["api_key"] == GOOGLE_KEY
    assert record["usage_normalized"] == _normalized(8, 3)
    totals = _check_totals_add_up(mock)
    assert totals["by_provider"]["google"]["total_tokens"] == 11


# --------------------------------------------------------------------------- all together


def test_totals_over_all_providers(
    claude: anthropic.Anthropic, gemini: genai.Client, mock: MockUpstreamProcess
) -> None:
    with OpenAI(base_url=mock.base_url, api_key="sk-test-upstream", max_retries=0) as oa:
        oa.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": USER}],
            max_tokens=2,
            extra_headers={"x-mock-cached-tokens": "3", "x-mock-reasoning-tokens": "1"},
        )
    claude.messages.create(
        model=CLAUDE,
        max_tokens=3,
        messages=ANT_MESSAGES,
        extra_headers={"x-mock-cache-creation-tokens": "2"},
    )
    gemini.models.generate_content(
        model=GEMINI, contents=USER, config=genai_types.GenerateContentConfig(max_output_tokens=4)
    )
    assert [r["provider"] for r in mock.requests()] == ["openai", "anthropic", "google"]
    assert [r["usage_normalized"] for r in mock.requests()] == [
        _normalized(8, 2, cache_read=3),
        _normalized(8, 3, cache_write=2),
        _normalized(8, 4),
    ]
    totals = _check_totals_add_up(mock)
    assert {k: v for k, v in totals.items() if k != "by_provider"} == {
        "requests": 3,
        "prompt_tokens": 24,
        "completion_tokens": 9,
        "total_tokens": 33,
    }
    assert totals["by_provider"]["openai"]["cache_read_tokens"] == 3
    assert totals["by_provider"]["anthropic"]["cache_creation_tokens"] == 2
    assert list(mock.totals()) == ["requests", "prompt_tokens", "completion_tokens", "total_tokens"]
