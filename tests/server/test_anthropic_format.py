"""Anthropic's Messages format and provider, without a server."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest

from till.errors import STATUS
from till.server.pricing import Usage
from till.server.providers.anthropic import (
    ANTHROPIC_FORMAT,
    MIN_THINKING_BUDGET,
    AnthropicProvider,
    MessagesMeter,
)
from till.server.providers.base import Body, Route, decode_body, encode
from till.server.providers.openai import OPENAI_FORMAT
from till.server.relay import EventSplitter

PROVIDER = AnthropicProvider()
KEY = "sk-ant-unit-0123456789"


def route(path: str = "/v1/messages") -> Route:
    found = PROVIDER.route("POST", path, b"")
    assert found is not None
    return found


def body_of(**fields: Any) -> Body:
    return decode_body(encode({"model": "claude-sonnet-4-5", "messages": [], **fields}))


def plain(body: Body) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(encode(body))
    return decoded


# --- provider: routes and auth ---


def test_native_routes_and_auth() -> None:
    messages = route()
    assert (messages.format, messages.kind, messages.upstream_path) == (
        ANTHROPIC_FORMAT,
        "messages",
        "/v1/messages",
    )
    assert messages.metered
    count = route("/v1/messages/count_tokens")
    assert (count.kind, count.upstream_path, count.metered) == (
        "count_tokens",
        "/v1/messages/count_tokens",
        False,
    )
    for r in (messages, count):
        assert PROVIDER.auth_headers(KEY, r) == [("x-api-key", KEY)]


def test_openai_sdk_route_goes_to_the_compatible_endpoint_with_bearer() -> None:
    chat = route("/v1/chat/completions")
    assert (chat.format, chat.kind, chat.upstream_path, chat.metered) == (
        OPENAI_FORMAT,
        "chat",
        "/v1/chat/completions",
        True,
    )
    assert PROVIDER.auth_headers(KEY, chat) == [("authorization", f"Bearer {KEY}")]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/messages"),
        ("POST", "/v1/messages/"),
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages/batches"),
        ("POST", "/v1/messages/count_tokens/x"),
        ("POST", "/v1/files"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/claude-sonnet-4-5"),
        ("POST", "/v1/complete"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/organizations/me"),
        ("POST", "/v1/organizations/api_keys"),
        ("POST", "/v1/../v1/messages"),
        ("POST", "//v1/messages"),
        ("POST", "/V1/MESSAGES"),
    ],
)
def test_everything_else_is_not_forwarded(method: str, path: str) -> None:
    assert PROVIDER.route(method, path, b"") is None


def test_speaks_messages_paths_only() -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches"):
        assert ANTHROPIC_FORMAT.speaks(path)
    for path in ("/v1/messagesx", "/v1/chat/completions", "/v1/files", "/v1beta/models"):
        assert not ANTHROPIC_FORMAT.speaks(path)


# --- inspect and rewrite ---


def test_inspect_reads_model_stream_and_max_tokens() -> None:
    info = ANTHROPIC_FORMAT.inspect(route(), body_of(max_tokens=512, stream=True))
    assert (info.model, info.stream, info.asked_output, info.generations) == (
        "claude-sonnet-4-5",
        True,
        512,
        1,
    )
    assert ANTHROPIC_FORMAT.inspect(route(), body_of()).asked_output == -1
    assert ANTHROPIC_FORMAT.inspect(route(), body_of(max_tokens="9")).asked_output == -1
    assert ANTHROPIC_FORMAT.inspect(route(), body_of(max_tokens=1.5)).asked_output == -1
    assert not ANTHROPIC_FORMAT.inspect(route(), body_of(max_tokens=5)).stream
    count = ANTHROPIC_FORMAT.inspect(route("/v1/messages/count_tokens"), body_of(max_tokens=99))
    assert count.asked_output == 0


def test_rewrite_lowers_max_tokens_only() -> None:
    r = route()
    body = body_of(max_tokens=100_000)
    info = ANTHROPIC_FORMAT.inspect(r, body)
    assert ANTHROPIC_FORMAT.rewrite(r, body, info, 900)
    assert plain(body)["max_tokens"] == 900
    # Never raised, never touched without a grant.
    for grant in (-1, 100_000, 200_000):
        body = body_of(max_tokens=100_000)
        assert not ANTHROPIC_FORMAT.rewrite(r, body, ANTHROPIC_FORMAT.inspect(r, body), grant)
        assert plain(body)["max_tokens"] == 100_000


def test_rewrite_caps_a_missing_or_unreadable_max_tokens() -> None:
    # Whatever the upstream makes of the request, what reaches it is a cap the key can pay for.
    r = route()
    for raw in ({}, {"max_tokens": 5000.0}, {"max_tokens": "5000"}, {"max_tokens": None}):
        body = body_of(**raw)
        info = ANTHROPIC_FORMAT.inspect(r, body)
        assert info.asked_output == -1
        assert ANTHROPIC_FORMAT.rewrite(r, body, info, 300)
        assert plain(body)["max_tokens"] == 300
        body = body_of(**raw)
        assert not ANTHROPIC_FORMAT.rewrite(r, body, info, -1)


def test_rewrite_leaves_count_tokens_alone() -> None:
    r = route("/v1/messages/count_tokens")
    body = body_of(max_tokens=100_000)
    assert not ANTHROPIC_FORMAT.rewrite(r, body, ANTHROPIC_FORMAT.inspect(r, body), 10)
    assert plain(body)["max_tokens"] == 100_000


@pytest.mark.parametrize(
    ("budget", "grant", "expected"),
    [
        (8000, 4000, 3999),  # budget above the new cap: lowered to cap - 1
        (4000, 4000, 3999),  # equal is not allowed either (budget < max_tokens)
        (2000, 4000, 2000),  # already below the new cap: untouched
        (8000, MIN_THINKING_BUDGET + 1, MIN_THINKING_BUDGET),  # the lowest legal budget
        # Cannot fit (budget would go under 1024): left as sent; Anthropic answers 400.
        (8000, MIN_THINKING_BUDGET, 8000),
        (8000, 500, 8000),
    ],
)
def test_rewrite_keeps_a_thinking_budget_below_the_new_cap(
    budget: int, grant: int, expected: int
) -> None:
    r = route()
    thinking = {"type": "enabled", "budget_tokens": budget}
    body = body_of(max_tokens=16_000, thinking=thinking)
    assert ANTHROPIC_FORMAT.rewrite(r, body, ANTHROPIC_FORMAT.inspect(r, body), grant)
    out = plain(body)
    assert out["max_tokens"] == grant
    assert out["thinking"] == {"type": "enabled", "budget_tokens": expected}


@pytest.mark.parametrize(
    "thinking",
    [
        {"type": "disabled"},
        {"type": "adaptive"},
        {"type": "enabled", "budget_tokens": "8000"},
        {"type": "enabled", "budget_tokens": True},
        {"type": "enabled"},
        "enabled",
        None,
    ],
)
def test_rewrite_forwards_other_thinking_settings_untouched(thinking: Any) -> None:
    r = route()
    body = body_of(max_tokens=16_000, thinking=thinking)
    before = bytes(body["thinking"])
    assert ANTHROPIC_FORMAT.rewrite(r, body, ANTHROPIC_FORMAT.inspect(r, body), 2000)
    assert bytes(body["thinking"]) == before
    assert plain(body)["max_tokens"] == 2000


def test_rewrite_keeps_everything_else_byte_for_byte() -> None:
    r = route()
    raw = (
        b'{"model":"claude-sonnet-4-5","max_tokens":9000,'
        b'"messages":[{"role":"user","content":"caf\\u00e9 \xf0\x9f\x98\x80"}],'
        b'"metadata":{"user_id":"u 1"},"tools":[{"name":"t","input_schema":{"type":"object"}}]}'
    )
    body = decode_body(raw)
    assert ANTHROPIC_FORMAT.rewrite(r, body, ANTHROPIC_FORMAT.inspect(r, body), 10)
    assert encode(body) == raw.replace(b"9000", b"10")


# --- usage from a Message ---


def message(**usage: Any) -> bytes:
    return json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "usage": usage,
        }
    ).encode()


def test_usage_sums_fresh_and_cached_input() -> None:
    data = message(
        input_tokens=10,
        cache_creation_input_tokens=200,
        cache_read_input_tokens=3000,
        cache_creation={"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 0},
        output_tokens=42,
        service_tier="standard",
        server_tool_use=None,
    )
    usage, model = ANTHROPIC_FORMAT.usage(route(), data)
    assert model == "claude-sonnet-4-5-20250929"
    assert usage == Usage(
        input_tokens=3210, output_tokens=42, cache_read_tokens=3000, cache_write_tokens=200
    )
    assert usage.total_tokens == 3252


def test_usage_without_cache_fields_and_with_nulls() -> None:
    usage, _ = ANTHROPIC_FORMAT.usage(route(), message(input_tokens=7, output_tokens=3))
    assert usage == Usage(7, 3)
    data = message(
        input_tokens=7,
        output_tokens=3,
        cache_creation_input_tokens=None,
        cache_read_input_tokens=None,
    )
    assert ANTHROPIC_FORMAT.usage(route(), data)[0] == Usage(7, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"model": 5}',
        b'{"model": "m", "usage": {"input_tokens": "7", "output_tokens": 1}}',
        b'{"model": "m", "usage": {"input_tokens": 1.5, "output_tokens": 1}}',
        b'{"model": "m", "usage": null}',
        b'{"model": "m", "usage": {"input_tokens": 5}}',
        b'{"model": "m"}',
    ],
)
def test_unreadable_usage_is_unknown(data: bytes) -> None:
    # Unknown usage: the proxy charges the hold.
    assert ANTHROPIC_FORMAT.usage(route(), data)[0] is None


def test_count_tokens_has_no_usage() -> None:
    r = route("/v1/messages/count_tokens")
    assert ANTHROPIC_FORMAT.usage(r, b'{"input_tokens": 55}') == (None, "")


# --- the stream meter ---


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


START_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "output_tokens": 1,
}


def stream_events(delta_usage: dict[str, Any] | None = None) -> list[bytes]:
    start = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [],
        "stop_reason": None,
        "usage": START_USAGE,
    }
    return [
        sse("message_start", {"message": start}),
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("ping", {}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "a"}}),
        # Text that names the events must not confuse the byte test.
        sse(
            "content_block_delta",
            {"index": 0, "delta": {"type": "text_delta", "text": '"message_delta" usage'}},
        ),
        sse("content_block_stop", {"index": 0}),
        sse(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": delta_usage if delta_usage is not None else {"output_tokens": 57},
            },
        ),
        sse("message_stop", {}),
    ]


def run_meter(events: list[bytes]) -> MessagesMeter:
    meter = ANTHROPIC_FORMAT.meter(route(), ANTHROPIC_FORMAT.inspect(route(), body_of()))
    assert meter.sse
    assert all(meter.keep(ev) for ev in events), "Anthropic streams are never withheld"
    return meter


def test_meter_reads_start_and_delta() -> None:
    meter = run_meter(stream_events())
    assert meter.model == "claude-sonnet-4-5-20250929"
    assert meter.usage == Usage(
        input_tokens=2112, output_tokens=57, cache_read_tokens=2000, cache_write_tokens=100
    )


def test_meter_takes_the_latest_counts_from_message_delta() -> None:
    delta = {
        "input_tokens": 20,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 2500,
        "output_tokens": 80,
        "server_tool_use": {"web_search_requests": 1},
    }
    meter = run_meter(stream_events(delta))
    assert meter.usage == Usage(
        input_tokens=20 + 100 + 2500,
        output_tokens=80,
        cache_read_tokens=2500,
        cache_write_tokens=100,
    )


def test_meter_usage_is_unknown_until_message_delta() -> None:
    events = stream_events()
    meter = run_meter(events[:6])  # cut before message_delta
    assert meter.usage is None
    assert meter.model == "claude-sonnet-4-5-20250929"
    # A message_delta without output_tokens does not make usage known either.
    meter = run_meter(stream_events({"input_tokens": 3}))
    assert meter.usage is None


def test_meter_on_raw_chunks_through_the_relay_splitter() -> None:
    # Split at arbitrary byte offsets, with \r\n line endings and "data:" without a space.
    wire = b"".join(stream_events()).replace(b"\n", b"\r\n").replace(b"data: ", b"data:")
    for size in (1, 7, 64, len(wire)):
        splitter = EventSplitter()
        meter = MessagesMeter()
        for i in range(0, len(wire), size):
            for event in splitter.feed(wire[i : i + size]):
                assert meter.keep(event)
        assert meter.usage is not None and meter.usage.output_tokens == 57


@pytest.mark.parametrize(
    "event",
    [
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":"x"}}\n\n',
        b"event: message_delta\ndata: {not json\n\n",
        b'event: message_start\ndata: {"type":"message_start","message":7}\n\n',
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n',
        b"",
    ],
)
def test_meter_passes_odd_events_and_stays_unknown(event: bytes) -> None:
    meter = MessagesMeter()
    assert meter.keep(event)
    assert meter.usage is None


# --- errors in Anthropic's shape ---


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
    ],
)
def test_error_body_shape(status: int, kind: str) -> None:
    body = json.loads(ANTHROPIC_FORMAT.error_body(status, "some_code", "Nope.", {}))
    assert body == {
        "type": "error",
        "error": {"type": kind, "message": "Nope.", "code": "some_code"},
    }


def test_every_till_code_maps_to_an_anthropic_type() -> None:
    for code, status in STATUS.items():
        error = json.loads(ANTHROPIC_FORMAT.error_body(status, code, "m", {}))["error"]
        assert error["type"].endswith("_error") or error["type"] == "request_too_large"
        assert error["code"] == code


def test_limit_error_carries_the_numbers_and_the_sdk_reads_it() -> None:
    extra = {"limit": 3, "used": 3, "remaining": 0, "unit": "activations"}
    data = ANTHROPIC_FORMAT.error_body(402, "activation_limit_reached", "Limit reached.", extra)
    body = json.loads(data)
    assert body["error"] == {
        "type": "billing_error",
        "message": "Limit reached.",
        "code": "activation_limit_reached",
        **extra,
    }
    # Extra fields never replace the shape's own.
    clash = json.loads(ANTHROPIC_FORMAT.error_body(402, "c", "m", {"type": "x", "message": "y"}))
    assert clash["error"]["type"] == "billing_error" and clash["error"]["message"] == "m"

    client = anthropic.Anthropic(api_key="x", base_url="http://till.invalid", max_retries=2)
    request = httpx2.Request("POST", "http://till.invalid/v1/messages")
    response = httpx2.Response(
        402, content=data, headers={"content-type": "application/json"}, request=request
    )
    # The SDK does not retry a 402 (it retries 408, 409, 429 and 5xx), so a spent key is final.
    assert not client._should_retry(response)
    err = client._make_status_error_from_response(response)
    assert isinstance(err, anthropic.APIStatusError)
    assert err.status_code == 402
    assert err.type == "billing_error"
    assert err.api_message == "Limit reached."
    for retried in (408, 409, 429, 500, 502, 503, 504):
        assert client._should_retry(httpx2.Response(retried, request=request))
    client.close()


def test_sse_error_is_a_named_error_event_the_sdk_raises_on() -> None:
    body = ANTHROPIC_FORMAT.error_body(502, "upstream_unavailable", "Broke off.", {})
    event = ANTHROPIC_FORMAT.stream_error(route(), body)
    assert event == b"event: error\ndata: " + body + b"\n\n"
    (parsed,) = EventSplitter().feed(event)
    assert parsed == event
    client = anthropic.Anthropic(api_key="x", base_url="http://till.invalid", max_retries=0)
    request = httpx2.Request("POST", "http://till.invalid/v1/messages")
    ok_start = sse("message_start", {"message": {"id": "m", "model": "x", "usage": START_USAGE}})
    response = httpx2.Response(
        200,
        content=ok_start + event,
        headers={"content-type": "text/event-stream"},
        request=request,
    )
    stream = anthropic.Stream(cast_to=object, response=response, client=client)
    with pytest.raises(anthropic.APIStatusError) as caught:
        list(stream)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "upstream_unavailable"
    client.close()
