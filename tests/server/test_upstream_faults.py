"""Upstream faults per wire format, with each provider's real SDK as the client.

One table (WIRES) drives every case over OpenAI chat, OpenAI responses, Anthropic messages and
Gemini streamGenerateContent (SSE); the mock upstream plays the fault (tests/mock_upstream.py):

- a 5xx before the first byte (``x-mock-status``): the SDK sees the provider's own error, with
  its status; the activation counts, no token is billed, the hold is released (README, "How
  limits work": a provider error counts as an activation but bills nothing);
- a reset mid-stream (``x-mock-cut-after``) and a silence mid-stream past
  TILL_UPSTREAM_READ_TIMEOUT (``x-mock-stall-after``): the client gets a terminating error in
  its dialect (each SDK raises), and the charging rule of Proxy._take_usage holds: a key with
  a token limit is charged its whole hold, a key without limits the usage seen so far;
- an upstream that never answers a plain request, or stops midway through its body: a clean
  504 ``upstream_timeout`` in the client's dialect; the usage is unknown, so a key with a token
  limit is charged its hold and a key without limits nothing.

One `till serve` for the module, on the session Redis server, with a one-second read timeout.
SDK retries are off (max_retries=0; google-genai retries only when told to), and every case
checks that the mock saw exactly one request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from tests.conftest import (
    UPSTREAM_KEY,
    Mock,
    RedisServer,
    Till,
    create_key,
    get_key,
    own_till,
)

READ_TIMEOUT = 1.0  # TILL_UPSTREAM_READ_TIMEOUT of the module's server
SLACK = 2.0  # how much later than the read timeout the client may learn of it
LIMIT = 300  # tokens of a limited key: every request asks for more, so its hold is all of it
ASKED = 1000  # the output cap each request asks for
BREAK_AFTER = 3  # events the upstream sends before it breaks off or goes silent
HELLO = "Hello there, tell me about faults"

# --- one row per wire format: how its SDK is called, and how it reports an error ---

Call = Callable[[Till, str, dict[str, str], list[Any]], None]


def _openai(till: Till, token: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{till.url}/v1", max_retries=0, timeout=30)


def _anthropic(till: Till, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=token, base_url=till.url, max_retries=0, timeout=30)


def _gemini(till: Till, token: str, headers: dict[str, str]) -> genai.Client:
    options = types.HttpOptions(base_url=till.url, api_version="v1beta", headers=headers)
    return genai.Client(api_key=token, http_options=options)


def chat_stream(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _openai(till, token) as oa:
        for chunk in oa.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": HELLO}],
            max_tokens=ASKED,
            stream=True,
            extra_headers=headers,
        ):
            seen.append(chunk)


def chat_plain(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _openai(till, token) as oa:
        seen.append(
            oa.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": HELLO}],
                max_tokens=ASKED,
                extra_headers=headers,
            )
        )


def responses_stream(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _openai(till, token) as oa:
        for event in oa.responses.create(
            model="gpt-4o", input=HELLO, max_output_tokens=ASKED, stream=True, extra_headers=headers
        ):
            seen.append(event)


def responses_plain(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _openai(till, token) as oa:
        seen.append(
            oa.responses.create(
                model="gpt-4o", input=HELLO, max_output_tokens=ASKED, extra_headers=headers
            )
        )


CLAUDE = "claude-sonnet-4-6"


def messages_stream(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _anthropic(till, token) as ac:
        for event in ac.messages.create(
            model=CLAUDE,
            max_tokens=ASKED,
            messages=[{"role": "user", "content": HELLO}],
            stream=True,
            extra_headers=headers,
        ):
            seen.append(event)


def messages_plain(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _anthropic(till, token) as ac:
        seen.append(
            ac.messages.create(
                model=CLAUDE,
                max_tokens=ASKED,
                messages=[{"role": "user", "content": HELLO}],
                extra_headers=headers,
            )
        )


GEMINI = "gemini-2.5-flash"
GEMINI_CONFIG = types.GenerateContentConfig(max_output_tokens=ASKED)


def gemini_stream(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _gemini(till, token, headers) as client:
        for chunk in client.models.generate_content_stream(
            model=GEMINI, contents=HELLO, config=GEMINI_CONFIG
        ):
            seen.append(chunk)


def gemini_plain(till: Till, token: str, headers: dict[str, str], seen: list[Any]) -> None:
    with _gemini(till, token, headers) as client:
        seen.append(
            client.models.generate_content(model=GEMINI, contents=HELLO, config=GEMINI_CONFIG)
        )


def _openai_status(exc: BaseException) -> int:
    assert isinstance(exc, openai.APIStatusError), exc
    return exc.status_code


def _openai_code(exc: BaseException) -> str | None:
    assert isinstance(exc, openai.APIError), exc
    return exc.code


def _openai_kind(exc: BaseException) -> str:
    assert isinstance(exc, openai.APIError), exc
    return str(exc.type)


def _anthropic_status(exc: BaseException) -> int:
    assert isinstance(exc, anthropic.APIStatusError), exc
    return exc.status_code


def _gemini_status(exc: BaseException) -> int:
    assert isinstance(exc, genai_errors.APIError), exc
    return exc.code


def _gemini_kind(exc: BaseException) -> str:
    assert isinstance(exc, genai_errors.APIError), exc
    return str(exc.status)


def _anthropic_error(exc: BaseException) -> dict[str, Any]:
    assert isinstance(exc, anthropic.APIStatusError) and isinstance(exc.body, dict), exc
    assert exc.body["type"] == "error"
    error: dict[str, Any] = exc.body["error"]
    return error


def _gemini_error(exc: BaseException) -> dict[str, Any]:
    assert isinstance(exc, genai_errors.APIError) and isinstance(exc.details, dict), exc
    error: dict[str, Any] = exc.details["error"]
    return error


@dataclass(frozen=True)
class Wire:
    id: str
    provider: str
    upstream_key: str
    stream: Call
    plain: Call
    # What the SDK raises for an error status before the first byte, and for the terminating
    # error event Till sends into a stream that broke off.
    status_error: type[BaseException]
    stream_error: type[BaseException]
    # The error's HTTP status, Till's error code (None if the error is not Till's own), and the
    # provider's own error kind (OpenAI's type, Anthropic's error.type, Google's status).
    status: Callable[[BaseException], int]
    till_code: Callable[[BaseException], str | None]
    kind: Callable[[BaseException], str]
    # A 5xx this provider sends, and the kind its error carries.
    server_status: int
    server_kind: str
    # Whether the stream reports usage before its end (so a key without limits pays what was
    # seen when the stream broke off). OpenAI's usage rides on the last chunk and on
    # response.completed; Anthropic's message_start has the input counts, but Till's meter
    # counts usage only from message_delta on (till/server/providers/anthropic.py,
    # MessagesMeter); each Gemini element has the usage so far.
    partial_usage: bool


OPENAI_ERRORS: dict[str, Any] = dict(
    status_error=openai.APIStatusError,
    stream_error=openai.APIError,
    status=_openai_status,
    till_code=_openai_code,
    kind=_openai_kind,
)
WIRES = [
    Wire(
        "openai-chat", "openai", UPSTREAM_KEY, chat_stream, chat_plain, **OPENAI_ERRORS,
        server_status=500, server_kind="server_error", partial_usage=False,
    ),
    Wire(
        "openai-responses", "openai", UPSTREAM_KEY, responses_stream, responses_plain,
        **OPENAI_ERRORS, server_status=503, server_kind="server_error", partial_usage=False,
    ),
    Wire(
        "anthropic-messages", "anthropic", "sk-ant-test-upstream-0123456789abcdef",
        messages_stream, messages_plain,
        status_error=anthropic.APIStatusError,
        # Anthropic's SDK raises an APIStatusError for an `event: error` too (status 200).
        stream_error=anthropic.APIStatusError,
        status=_anthropic_status,
        till_code=lambda e: _anthropic_error(e).get("code"),
        kind=lambda e: _anthropic_error(e)["type"],
        server_status=529, server_kind="overloaded_error", partial_usage=True,
    ),
    Wire(
        "gemini-sse", "google", "AIzaSy-test-upstream-google-0123456789",
        gemini_stream, gemini_plain,
        status_error=genai_errors.ServerError,
        stream_error=genai_errors.ServerError,
        status=_gemini_status,
        till_code=lambda e: _gemini_error(e).get("till_code"),
        kind=_gemini_kind,
        server_status=503, server_kind="UNAVAILABLE", partial_usage=True,
    ),
]  # fmt: skip
by_wire = pytest.mark.parametrize("wire", WIRES, ids=[w.id for w in WIRES])
by_limit = pytest.mark.parametrize("limited", [True, False], ids=["token-limit", "no-limit"])


# --- the server, the keys, the checks ---


@pytest.fixture(scope="module")
def till(redis_server: RedisServer, mock_upstream: Mock, log_dir: Path) -> Iterator[Till]:
    with own_till(
        "upstream-faults", mock_upstream.url, redis_server.url, log_dir,
        TILL_UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT),
    ) as server:  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def admin(till: Till) -> Iterator[httpx.Client]:
    with till.admin(till.new_tenant()) as client:
        yield client


def new_key(admin: httpx.Client, wire: Wire, limited: bool = True) -> dict[str, Any]:
    limits = {"max_tokens": LIMIT} if limited else {}
    return create_key(admin, provider=wire.provider, upstream_key=wire.upstream_key, **limits)


Result = tuple[BaseException, list[Any], float]


def call(fn: Call, till: Till, token: str, headers: dict[str, str]) -> Result:
    """Run one SDK call that must fail: the error, what came before it, and when it came."""
    seen: list[Any] = []
    started = time.monotonic()
    with pytest.raises(Exception) as caught:  # each case checks the class itself
        fn(till, token, headers, seen)
    return caught.value, seen, time.monotonic() - started


def side_by_side(calls: dict[str, Callable[[], Result]]) -> dict[str, Result]:
    """Run SDK calls at once, one thread each; their results by name."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(fn) for name, fn in calls.items()}
        return {name: future.result(timeout=60) for name, future in futures.items()}


def records_by_case(mock: Mock, cases: Iterable[str], timeout: float = 5.0) -> dict[str, Any]:
    """The mock's records by their x-case header (one each), once all are over."""
    names = set(cases)
    deadline = time.monotonic() + timeout
    while True:
        records = cast(list[dict[str, Any]], mock.requests())
        # One request per case: no retry, by SDK or by Till.
        assert sorted(r["headers"]["x-case"] for r in records) == sorted(names)
        if all(r["ended_at"] is not None for r in records) or time.monotonic() > deadline:
            return {r["headers"]["x-case"]: r for r in records}
        time.sleep(0.02)


def the_record(mock: Mock, timeout: float = 5.0) -> dict[str, Any]:
    """The one request the mock saw, once it is over (the mock ends it when Till hangs up)."""
    deadline = time.monotonic() + timeout
    while True:
        records = mock.requests()
        assert len(records) == 1, [r["path"] for r in records]  # no retry, by SDK or by Till
        record: dict[str, Any] = records[0]
        if record["ended_at"] is not None or time.monotonic() > deadline:
            return record
        time.sleep(0.02)


def final(admin: httpx.Client, key_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The key once nothing is held (settlement can trail the client's error by a moment)."""
    deadline = time.monotonic() + timeout
    key = get_key(admin, key_id)
    while key["heldTokens"] and time.monotonic() < deadline:
        time.sleep(0.02)
        key = get_key(admin, key_id)
    return key


def seen_so_far(record: dict[str, Any]) -> int:
    """Tokens in the usage the mock had reported when the stream broke off (0: none)."""
    usage = record["usage_normalized"]
    return 0 if not usage else int(usage["input_tokens"]) + int(usage["output_tokens"])


def assert_stream_charge(
    admin: httpx.Client, wire: Wire, key: dict[str, Any], limited: bool, record: dict[str, Any]
) -> None:
    after = final(admin, key["id"])
    assert after["usedActivations"] == 1
    assert after["heldTokens"] == 0
    if limited:
        # Usage unknown at the break: the hold is charged, and the hold was the whole budget
        # (input estimate + an output cap lowered to what remained).
        assert after["usedTokens"] == LIMIT
        assert after["usedTokens"] > seen_so_far(record)
    else:
        expected = seen_so_far(record) if wire.partial_usage else 0
        assert after["usedTokens"] == expected
        if wire.partial_usage:
            assert expected > 0  # the prompt and the first words were reported
    assert after["status"] == ("exhausted" if limited else "active")


def assert_terminating_error(wire: Wire, exc: BaseException, seen: list[Any]) -> None:
    assert isinstance(exc, wire.stream_error), repr(exc)
    assert wire.till_code(exc) == "upstream_unavailable"
    # Events before the break reached the client, and not the end of the stream.
    assert 1 <= len(seen) <= BREAK_AFTER


# --- the mock's stall, as these tests use it (its own tests do not cover it) ---


def test_mock_stall_goes_silent_after_n_events_and_ends_when_the_client_leaves(
    mock_upstream: Mock,
) -> None:
    mock_upstream.reset()
    events: list[str] = []
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
        http.stream(
            "POST",
            f"{mock_upstream.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}", "x-mock-stall-after": "2"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": HELLO}],
                  "stream": True},
        ) as resp,
    ):  # fmt: skip
        events.extend(line for line in resp.iter_lines() if line)
    assert len(events) == 2
    record = the_record(mock_upstream)
    assert record["stalled"] and record["disconnected"] and not record["completed"]
    assert record["events_sent"] == 2
    # Not streamed: the headers and the first bytes of the body, then silence.
    mock_upstream.reset()
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(
            f"{mock_upstream.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}", "x-mock-stall-after": "10"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": HELLO}]},
        )
    record = the_record(mock_upstream)
    assert record["stalled"] and record["disconnected"] and not record["completed"]


# --- 1. an error status before the first byte ---


@by_wire
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "plain"])
def test_upstream_5xx_before_the_first_byte_passes_through_and_bills_nothing(
    till: Till, admin: httpx.Client, mock_upstream: Mock, wire: Wire, streamed: bool
) -> None:
    key = new_key(admin, wire)
    mock_upstream.reset()
    headers = {"x-mock-status": str(wire.server_status)}
    exc, seen, _ = call(wire.stream if streamed else wire.plain, till, key["scopedKey"], headers)
    assert isinstance(exc, wire.status_error), repr(exc)
    assert seen == []
    # The provider's own error, as it sent it: its status and its kind, no Till code.
    assert wire.status(exc) == wire.server_status
    assert wire.kind(exc) == wire.server_kind
    assert wire.till_code(exc) is None
    record = the_record(mock_upstream)
    assert record["status"] == wire.server_status
    after = final(admin, key["id"])
    # The documented rule: the activation counts, nothing is billed, the hold is released.
    assert (after["usedActivations"], after["usedTokens"], after["heldTokens"]) == (1, 0, 0)


# --- 2. a reset mid-stream ---


@by_wire
@by_limit
def test_upstream_reset_mid_stream_ends_the_stream_with_an_error_and_charges_by_the_rule(
    till: Till, admin: httpx.Client, mock_upstream: Mock, wire: Wire, limited: bool
) -> None:
    key = new_key(admin, wire, limited)
    mock_upstream.reset()
    headers = {"x-mock-cut-after": str(BREAK_AFTER)}
    exc, seen, _ = call(wire.stream, till, key["scopedKey"], headers)
    assert_terminating_error(wire, exc, seen)
    record = the_record(mock_upstream)
    assert record["cut"] and record["events_sent"] == BREAK_AFTER
    assert_stream_charge(admin, wire, key, limited, record)


# --- 3. silence mid-stream, past the read timeout ---


@by_wire
def test_upstream_silent_mid_stream_times_out_with_an_error_and_charges_by_the_rule(
    till: Till, admin: httpx.Client, mock_upstream: Mock, wire: Wire
) -> None:
    # Both kinds of key at once: each waits out the read timeout, side by side.
    keys = {"token-limit": new_key(admin, wire, True), "no-limit": new_key(admin, wire, False)}
    mock_upstream.reset()
    results = side_by_side(
        {
            case: partial(
                call, wire.stream, till, key["scopedKey"],
                {"x-mock-stall-after": str(BREAK_AFTER), "x-case": case},
            )
            for case, key in keys.items()
        }
    )  # fmt: skip
    records = records_by_case(mock_upstream, keys)
    for case, (exc, seen, elapsed) in results.items():
        assert_terminating_error(wire, exc, seen)
        assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + SLACK, case
        record = records[case]
        assert record["stalled"] and record["events_sent"] == BREAK_AFTER
        # Till hung up on the silent upstream: the mock saw it leave, mid-silence.
        assert record["disconnected"] and not record["completed"]
        assert_stream_charge(admin, wire, keys[case], case == "token-limit", record)


# --- 4. a plain request the upstream never finishes answering ---

PLAIN_FAULTS = {
    "no-headers": {"x-mock-delay-ms": "30000"},
    "mid-body": {"x-mock-stall-after": "20"},
}


@by_wire
def test_upstream_silent_on_a_plain_request_is_a_504_charging_a_limited_key_its_hold(
    till: Till, admin: httpx.Client, mock_upstream: Mock, wire: Wire
) -> None:
    # Silent before the headers, and silent midway through the body, for a key with a token
    # limit and one without: side by side.
    cases = {(fault, limited) for fault in PLAIN_FAULTS for limited in (True, False)}
    keys = {case: new_key(admin, wire, limited=case[1]) for case in cases}
    names = {case: f"{case[0]}-{'limited' if case[1] else 'unlimited'}" for case in cases}
    mock_upstream.reset()
    results = side_by_side(
        {
            case: partial(
                call, wire.plain, till, keys[case]["scopedKey"],
                PLAIN_FAULTS[case[0]] | {"x-case": names[case]},
            )
            for case in cases
        }
    )  # fmt: skip
    records = records_by_case(mock_upstream, {names[c]: k for c, k in keys.items()})
    for case, (exc, seen, elapsed) in results.items():
        fault, limited = case
        assert isinstance(exc, wire.status_error), (case, repr(exc))
        assert seen == []
        assert wire.status(exc) == 504
        assert wire.till_code(exc) == "upstream_timeout"
        assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + SLACK, case
        record = records[names[case]]
        assert record["disconnected"] and not record["completed"]
        assert record["stalled"] == (fault == "mid-body")
        after = final(admin, keys[case]["id"])
        # The request reached the provider, which may bill it: the activation counts, and
        # the unknown usage charges a limited key its hold (proxy.py, _broke_off).
        charged = LIMIT if limited else 0
        assert (after["usedActivations"], after["usedTokens"], after["heldTokens"]) == (
            1, charged, 0,
        )  # fmt: skip
