"""The mock upstream speaks OpenAI's wire format well enough for the real ``openai`` SDK."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.mock_upstream import MockUpstream, MockUpstreamProcess

KEY = "sk-test-upstream"
MESSAGES = [
    {"role": "system", "content": "You are terse."},  # 3 + 3
    {"role": "user", "content": "Say hello to the world"},  # 3 + 5
]
MESSAGES_TOKENS = 14


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
def client(mock: MockUpstreamProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=mock.base_url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(mock: MockUpstreamProcess) -> Any:
    async with AsyncOpenAI(base_url=mock.base_url, api_key=KEY, max_retries=0) as c:
        yield c


def _wait_for_end(mock: MockUpstreamProcess, timeout: float = 5.0) -> dict[str, Any]:
    """The single record, once the mock has finished with it."""
    deadline = time.monotonic() + timeout
    while True:
        records = mock.requests()
        if records and records[-1]["ended_at"] is not None:
            return records[-1]
        assert time.monotonic() < deadline, records
        time.sleep(0.02)


def _sse_events(raw: str) -> list[dict[str, str]]:
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append(fields)
    return events


# --------------------------------------------------------------------------- chat


def test_chat_plain(client: OpenAI, mock: MockUpstreamProcess) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert choice.message.content is not None
    assert len(choice.message.content.split()) == 20  # the default output length
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (14, 20, 34)
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details
    assert usage.completion_tokens_details.reasoning_tokens == 0

    (record,) = mock.requests()
    assert record["method"] == "POST"
    assert record["path"] == "/v1/chat/completions"
    assert record["api_key"] == KEY
    assert record["headers"]["authorization"] == f"Bearer {KEY}"
    assert all(name == name.lower() for name in record["headers"])
    assert record["body"]["messages"] == MESSAGES
    assert record["model"] == "gpt-4o-mini"
    assert record["stream"] is False
    assert record["status"] == 200
    assert record["completed"] is True and record["disconnected"] is False
    assert record["usage"] == completion.usage.model_dump(exclude_none=True)
    assert record["planned_usage"] == {
        "prompt_tokens": 14,
        "completion_tokens": 20,
        "total_tokens": 34,
    }
    assert record["started_at"] <= record["ended_at"]


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_chat_honours_the_output_cap(client: OpenAI, cap_field: str) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={"x-mock-output-tokens": "50"},
        **{cap_field: 7},  # type: ignore[arg-type]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "alpha bravo charlie delta echo foxtrot golf"
    assert completion.usage and completion.usage.completion_tokens == 7


def test_chat_output_length_header_and_token_overrides(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={
            "x-mock-output-tokens": "30",
            "x-mock-prompt-tokens": "1000",
            "x-mock-cached-tokens": "600",
            "x-mock-reasoning-tokens": "10",
        },
    )
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1000, 30, 1030)
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 600
    assert usage.completion_tokens_details
    assert usage.completion_tokens_details.reasoning_tokens == 10
    content = completion.choices[0].message.content
    assert content is not None and len(content.split()) == 20  # reasoning is invisible


def test_chat_stream_without_usage(client: OpenAI, mock: MockUpstreamProcess) -> None:
    with client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=5, stream=True
    ) as stream:
        chunks = list(stream)
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 7
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert deltas == ["alpha", " bravo", " charlie", " delta", " echo"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)

    record = _wait_for_end(mock)
    assert record["stream"] is True and record["completed"] is True
    assert record["usage"] is None  # nothing reported...
    assert record["planned_usage"]["completion_tokens"] == 5  # ...though it was generated
    assert record["events_sent"] == 8  # role, 5 deltas, finish, [DONE]
    assert record["output_tokens_sent"] == 5


async def test_chat_stream_with_usage(aclient: AsyncOpenAI, mock: MockUpstreamProcess) -> None:
    stream = await aclient.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "100"},
    )
    chunks = [chunk async for chunk in stream]
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == MESSAGES_TOKENS
    assert last.usage.completion_tokens == 12
    assert last.usage.total_tokens == MESSAGES_TOKENS + 12
    assert all(c.usage is None for c in body)
    content_chunks = [c for c in body if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 12

    totals = mock.totals()
    assert totals == {
        "requests": 1,
        "prompt_tokens": MESSAGES_TOKENS,
        "completion_tokens": 12,
        "total_tokens": MESSAGES_TOKENS + 12,
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_wire_format(mock: MockUpstreamProcess, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 3}
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.base_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"].startswith("req_")
    events = _sse_events(resp.text)
    assert all(list(e) == ["data"] for e in events)
    assert events[-1]["data"] == "[DONE]"
    datas = [e["data"] for e in events[:-1]]
    assert all(", " not in d and '": ' not in d for d in datas)  # compact JSON
    chunks = [json.loads(d) for d in datas]
    if include_usage:
        assert len(chunks) == 6  # role, 3 deltas, finish, usage
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        assert chunks[-1]["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 0,
            "audio_tokens": 0,
        }
    else:
        assert len(chunks) == 5
        assert all("usage" not in c for c in chunks)


# --------------------------------------------------------------------------- legacy completions


def test_completions_plain(client: OpenAI) -> None:
    completion = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="one two three", max_tokens=4
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "alpha bravo charlie delta"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)


def test_completions_stream(client: OpenAI, mock: MockUpstreamProcess) -> None:
    with client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="one two three",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert mock.totals()["total_tokens"] == 9


# --------------------------------------------------------------------------- responses


def test_responses_plain(client: OpenAI, mock: MockUpstreamProcess) -> None:
    response = client.responses.create(
        model="gpt-4.1", instructions="Be brief.", input="Tell me a story", max_output_tokens=16
    )
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == " ".join(
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 2
    )
    usage = response.usage
    assert usage is not None
    assert usage.input_tokens == (3 + 2) + (3 + 4)
    assert usage.output_tokens == 16
    assert usage.total_tokens == 28
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    (record,) = mock.requests()
    assert record["usage"]["input_tokens"] == 12
    assert mock.totals()["completion_tokens"] == 16


def test_responses_stream_with_the_sdk_helper(client: OpenAI, mock: MockUpstreamProcess) -> None:
    with client.responses.stream(
        model="gpt-4.1",
        input=[{"role": "user", "content": "Hello there"}],
        extra_headers={"x-mock-output-tokens": "5"},
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.output_text == "alpha bravo charlie delta echo"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 5)
    record = _wait_for_end(mock)
    assert record["completed"] is True
    assert record["usage"]["output_tokens"] == 5


async def test_responses_stream_async(aclient: AsyncOpenAI) -> None:
    async with aclient.responses.stream(
        model="gpt-4.1",
        input="a b c",
        max_output_tokens=20,
        extra_headers={"x-mock-reasoning-tokens": "4"},
    ) as stream:
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert len(deltas) == 16
    assert final.usage is not None
    assert final.usage.output_tokens == 20
    assert final.usage.output_tokens_details.reasoning_tokens == 4
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_responses_wire_format(mock: MockUpstreamProcess) -> None:
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.base_url}/responses",
            json={"model": "gpt-4.1", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {KEY}", "x-mock-output-tokens": "2"},
        )
    events = _sse_events(resp.text)
    assert all(list(e) == ["event", "data"] for e in events)
    payloads = [json.loads(e["data"]) for e in events]
    assert [p["type"] for p in payloads] == [e["event"] for e in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert payloads[0]["response"]["usage"] is None
    assert payloads[-1]["type"] == "response.completed"
    assert payloads[-1]["response"]["usage"]["output_tokens"] == 2


def test_responses_incomplete(client: OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4.1", input="hi", max_output_tokens=16, extra_headers={"x-mock-incomplete": "1"}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage and response.usage.output_tokens == 16


def test_responses_reject_a_tiny_max_output_tokens(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-4.1", input="hi", max_output_tokens=5)
    assert info.value.code == "integer_below_min_value"
    assert info.value.param == "max_output_tokens"


# --------------------------------------------------------------------------- embeddings, models


def test_embeddings(client: OpenAI) -> None:
    result = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c d e"])
    assert [e.index for e in result.data] == [0, 1]
    assert all(len(e.embedding) == 16 for e in result.data)
    assert all(isinstance(x, float) for x in result.data[0].embedding)
    assert result.usage.prompt_tokens == 5
    assert result.usage.total_tokens == 5


def test_embeddings_encodings_agree(client: OpenAI) -> None:
    floats = client.embeddings.create(
        model="text-embedding-3-small", input="hello", dimensions=4, encoding_format="float"
    )
    b64 = client.embeddings.create(
        model="text-embedding-3-small", input="hello", dimensions=4, encoding_format="base64"
    )
    raw = base64.b64decode(b64.data[0].embedding)  # type: ignore[arg-type]
    assert list(struct.unpack("<4f", raw)) == pytest.approx(floats.data[0].embedding)


def test_models(client: OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "gpt-4o" in ids and "text-embedding-3-small" in ids
    assert client.models.retrieve("gpt-4o").object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --------------------------------------------------------------------------- errors & faults


def test_missing_key_is_rejected_like_openai(mock: MockUpstreamProcess) -> None:
    with httpx.Client() as http:
        resp = http.post(f"{mock.base_url}/chat/completions", json={"model": "gpt-4o"})
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["code"] == "invalid_api_key"
    (record,) = mock.requests()
    assert record["status"] == 401 and record["api_key"] is None


async def test_only_configured_keys_are_accepted() -> None:
    async with MockUpstream(api_keys=frozenset({"sk-real"})) as server:
        async with AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as info:
                await c.models.list()
        assert info.value.code == "invalid_api_key"
        async with AsyncOpenAI(base_url=server.base_url, api_key="sk-real", max_retries=0) as c:
            assert len((await c.models.list()).data) > 0
        assert [r["api_key"] for r in server.records] == ["sk-wrong", "sk-real"]


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(500, openai.InternalServerError), (429, openai.RateLimitError)],
)
def test_status_injection(
    client: OpenAI, mock: MockUpstreamProcess, status: int, error_class: type[Exception]
) -> None:
    with pytest.raises(error_class) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": str(status)}
        )
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    (record,) = mock.requests()
    assert record["status"] == status
    assert record["error"]["error"] == body
    assert record["usage"] is None


def test_status_injection_on_a_stream_fails_before_any_byte(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-mock-status": "500"}
        )


def test_cut_after_breaks_the_stream(client: OpenAI, mock: MockUpstreamProcess) -> None:
    received = []
    with (
        pytest.raises(openai.APIConnectionError),
        client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-cut-after": "4"},
        ) as stream,
    ):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 4
    assert all(chunk.usage is None for chunk in received)
    record = _wait_for_end(mock)
    assert record["cut"] is True
    assert record["completed"] is False
    assert record["events_sent"] == 4
    assert record["output_tokens_sent"] == 3
    assert record["usage"] is None


def test_cut_after_truncates_a_plain_body(mock: MockUpstreamProcess) -> None:
    with httpx.Client() as http, pytest.raises(httpx.RemoteProtocolError):
        http.post(
            f"{mock.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {KEY}", "x-mock-cut-after": "10"},
        )
    record = _wait_for_end(mock)
    assert record["cut"] is True and record["usage"] is None


def test_error_after_sends_an_in_stream_error(client: OpenAI, mock: MockUpstreamProcess) -> None:
    received = []
    with (
        pytest.raises(openai.APIError) as info,
        client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-error-after": "3"},
        ) as stream,
    ):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert "server had an error" in info.value.message
    record = _wait_for_end(mock)
    assert record["error"]["error"]["type"] == "server_error"
    assert record["completed"] is False


def test_redirect(mock: MockUpstreamProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-mock-redirect": "1"}
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.base_url}/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers=headers,
        )
        assert resp.status_code == 302
        location = resp.headers["location"]
        assert location.startswith(f"{mock.url}/_mock/redirect-target")
        assert [r["path"] for r in mock.requests()] == ["/v1/chat/completions"]
        # A client that follows the redirect shows up in the records, key and all.
        assert http.get(location, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    target = mock.requests()[-1]
    assert target["path"] == "/_mock/redirect-target"
    assert target["api_key"] == KEY
    assert target["query"] == {"from": "/v1/chat/completions"}


def test_bad_requests_get_openai_errors(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream_options={"include_usage": True}
        )
    assert info.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.NotFoundError):
        client.post("/no/such/endpoint", cast_to=object, body={})


def test_unparsable_body_is_recorded_and_rejected(mock: MockUpstreamProcess) -> None:
    with httpx.Client() as http:
        resp = http.post(
            f"{mock.base_url}/chat/completions",
            content=b"{not json",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    (record,) = mock.requests()
    assert record["body"] is None and record["body_text"] == "{not json"


# --------------------------------------------------------------------------- records & clients


def test_records_totals_and_reset(client: OpenAI, mock: MockUpstreamProcess) -> None:
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    client.embeddings.create(model="text-embedding-3-small", input="one two three")
    client.models.list()
    assert [r["path"] for r in mock.requests()] == [
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
    ]
    assert [r["path"] for r in mock.requests("/v1/embeddings")] == ["/v1/embeddings"]
    assert mock.totals() == {
        "requests": 3,
        "prompt_tokens": MESSAGES_TOKENS + 3,
        "completion_tokens": 2,
        "total_tokens": MESSAGES_TOKENS + 5,
    }
    mock.reset()
    assert mock.requests() == []
    assert mock.totals() == {
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


def test_client_closing_mid_stream_is_recorded(client: OpenAI, mock: MockUpstreamProcess) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-output-tokens": "500", "x-mock-delay-ms": "20"},
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    closed_at = time.time()
    record = _wait_for_end(mock)
    assert record["disconnected"] is True
    assert record["completed"] is False
    assert record["usage"] is None
    assert 3 <= record["output_tokens_sent"] < 20
    assert record["disconnected_at"] == pytest.approx(closed_at, abs=1.0)


async def test_async_client_closing_mid_stream_is_recorded(
    aclient: AsyncOpenAI, mock: MockUpstreamProcess
) -> None:
    stream = await aclient.responses.create(
        model="gpt-4.1",
        input="hi",
        stream=True,
        extra_headers={"x-mock-output-tokens": "500", "x-mock-delay-ms": "20"},
    )
    async for event in stream:
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    record = _wait_for_end(mock)
    assert record["disconnected"] is True
    assert record["usage"] is None
    assert record["output_tokens_sent"] < 20


def test_delay_paces_the_stream(client: OpenAI) -> None:
    started = time.monotonic()
    with client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        extra_headers={"x-mock-delay-ms": "50"},
    ) as stream:
        assert len(list(stream)) == 7
    assert time.monotonic() - started >= 8 * 0.05 * 0.9  # 8 events, each preceded by a delay


async def test_in_process_server_serves_the_async_sdk() -> None:
    async with MockUpstream() as server:
        async with AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as c:
            completion = await c.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=3
            )
        assert completion.usage and completion.usage.completion_tokens == 3
        assert server.totals()["total_tokens"] == MESSAGES_TOKENS + 3
