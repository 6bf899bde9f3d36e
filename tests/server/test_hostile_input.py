"""P18 through a live server: hostile input is a clean 4xx, never a 500 or a hang.

Tables of hostile requests go to a real ``till serve`` (embedded store, then Redis) with each
provider's scoped token, through httpx, raw HTTP/1.1 sockets (for what httpx refuses to send)
and raw HTTP/2 frames (the only way a CR or LF can sit inside a header value). For each:

* the answer comes (no hang) and is a 4xx; when Till itself answers, the body is JSON in the
  dialect of the path called (OpenAI's, Anthropic's or Gemini's error shape). Requests the HTTP
  server refuses before Till runs (h11/h2 protocol errors) are a bodiless 400 (501 for an
  unknown transfer coding, as RFC 9112 asks), or a refused HTTP/2 connection;
* the mock upstream received nothing;
* the key's counters (activations, tokens used and held, spend, last use) did not move.

Bodies that are valid JSON but hostile (numbers past what the store computes, wrong types,
repeated names) are forwarded or refused, never a 5xx, and what they are charged reconciles.
Requests that try to smuggle a header (CR/LF) are refused, or served with the header gone.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, Mock, Till, create_key, get_key
from till.server.app import formats
from till.server.providers.anthropic import ANTHROPIC_FORMAT
from till.server.providers.google import GEMINI_FORMAT

TIMEOUT = 30.0  # seconds: no answer by then is a hang
UPSTREAM_KEYS = {
    "openai": UPSTREAM_KEY,
    "anthropic": "sk-ant-test-upstream-0123456789abcdef",
    "google": "AIzaSy-test-upstream-google-0123456789",
}
GEMINI = "/v1beta/models/gemini-2.5-flash"
# Each provider's metered routes: a hostile body is read on every one of them.
ROUTES = {
    "openai": ["/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings"],
    "anthropic": ["/v1/messages", "/v1/chat/completions"],
    "google": [
        f"{GEMINI}:generateContent",
        f"{GEMINI}:streamGenerateContent?alt=sse",
        f"{GEMINI}:embedContent",
        "/v1/chat/completions",
    ],
}
N_ROUTES = sum(len(r) for r in ROUTES.values())
# Where each provider's SDK puts the token.
AUTH = {"openai": "authorization", "anthropic": "x-api-key", "google": "x-goog-api-key"}

# Sent with every request: a body every route would forward as it is.
FINE: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "hi"}],
    "input": "hi",
    "prompt": "hi",
    "max_tokens": 5,
    "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
    "content": {"parts": [{"text": "hi"}]},
}
FINE_BODY = json.dumps(FINE).encode()
CHAT_BODY = json.dumps({"model": "gpt-4o", "messages": FINE["messages"]}).encode()

# --- the tables ---

# Not one JSON object in UTF-8: 400 invalid_json on every route.
MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "whitespace only": b" \r\n\t ",
    "an open brace": b"{",
    "truncated object": b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"',
    "truncated string": b'{"model":"gpt-',
    "truncated escape": b'{"model":"\\u00',
    "truncated after a name": b'{"model"',
    "top-level array": b'[{"model":"gpt-4o"}]',
    "top-level string": b'"hello"',
    "top-level number": b"42",
    "top-level true": b"true",
    "top-level null": b"null",
    "NaN": b'{"model":"gpt-4o","temperature":NaN}',
    "Infinity": b'{"model":"gpt-4o","max_tokens":Infinity}',
    "-Infinity": b'{"max_tokens":-Infinity}',
    "escaped lone high surrogate": b'{"model":"\\ud800"}',
    "escaped lone low surrogate": b'{"messages":[{"content":"\\udc00x"}]}',
    "surrogates in the wrong order": b'{"model":"\\udc00\\ud800"}',
    "raw surrogate bytes in the model": b'{"model":"gpt\xed\xa0\x80"}',
    "raw surrogate bytes in a forwarded value": (
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xed\xb0\x80"}]}'
    ),
    "invalid UTF-8 in a name": b'{"\xff\xfe":1}',
    "overlong UTF-8": b'{"model":"\xc0\xaf"}',
    "Latin-1 text": b'{"model":"caf\xe9"}',
    "UTF-16": json.dumps(FINE).encode("utf-16"),
    "byte order mark": b"\xef\xbb\xbf" + FINE_BODY,
    "10,000-deep arrays": b'{"messages":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "10,000-deep objects": b'{"messages":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
    "10,000-deep at the top": b"[" * 10_000 + b"]" * 10_000,
    "1M-item array at the top": b"[" + b"0," * 999_999 + b"0]",
    "1M-item array, cut short": b'{"messages":[' + b"0," * 999_999 + b"0",
    "trailing garbage": FINE_BODY + b"x",
    "two objects": FINE_BODY + FINE_BODY,
    "trailing comma": b'{"model":"gpt-4o",}',
    "single quotes": b"{'model':'gpt-4o'}",
    "unquoted name": b'{model:"gpt-4o"}',
    "comment": b'{"model":"gpt-4o" /* hi */}',
    "leading zero": b'{"max_tokens":05}',
    "hexadecimal": b'{"max_tokens":0x10}',
    "bare exponent": b'{"max_tokens":1e}',
    "raw newline in a string": b'{"model":"gpt\n4o"}',
    "raw NUL in a string": b'{"model":"gpt\x004o"}',
    "unknown escape": b'{"model":"\\x41"}',
}

# Valid JSON, but hostile: forwarded (the output cap within the grant) or refused, never 5xx.
BIG = 10**30
HOSTILE_VALUES: dict[str, dict[str, Any]] = {
    "max_tokens past 2**53": {"max_tokens": 2**53 + 1},
    "max_tokens 10**30": {"max_tokens": BIG},
    "every cap 10**30": {
        "max_tokens": BIG,
        "max_completion_tokens": BIG,
        "max_output_tokens": BIG,
        "generationConfig": {
            "maxOutputTokens": BIG,
            "candidateCount": BIG,
            "thinkingConfig": {"thinkingBudget": BIG},
        },
        "thinking": {"type": "enabled", "budget_tokens": BIG},
    },
    "n 10**30": {"n": BIG, "best_of": BIG},
    "n -1": {"n": -1},
    "n as a string": {"n": "8"},
    "max_tokens as a string": {"max_tokens": "x"},
    "max_tokens negative": {"max_tokens": -1},
    "max_tokens 1e308": {"max_tokens": 1e308},
    "model a number": {"model": 5},
    "messages an object": {"messages": {}},
    "stream yes": {"stream": "yes"},
    "stream_options a number": {"stream": True, "stream_options": 5},
    "generationConfig a list": {"generationConfig": [1, 2]},
    "thinking budget a string": {"thinking": {"type": "enabled", "budget_tokens": "9e99"}},
    "a 20 KB model name": {"model": "m" * 20_000},
    "a 1M-item array in an unknown field": {"x_padding": [0] * 1_000_000},
}
HOSTILE_RAW: dict[str, bytes] = {
    "max_tokens with 5,000 digits": b'{"max_tokens":1' + b"0" * 5000 + b"}",
    "repeated model": b'{"model":"gpt-4o","model":"gpt-4o-mini"}',
    "repeated max_tokens, the big one first": b'{"max_tokens":100000,"max_tokens":5}',
    "repeated stream": b'{"stream":true,"stream":false}',
    "repeated generationConfig": (
        b'{"generationConfig":{"maxOutputTokens":100000},"generationConfig":{"maxOutputTokens":5}}'
    ),
    "an escaped name": b'{"max\\u005ftokens":100000}',
}

# Paths outside the inference list, tried with every provider's token: 404 not_found.
FORBIDDEN: list[tuple[str, str]] = [
    ("POST", "/v1/../admin/keys"),
    ("GET", "/v1/../admin/keys"),
    ("POST", "/v1/%2e%2e/files"),
    ("POST", "/v1/%2E%2E/admin/keys"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/organization/users"),
    ("GET", "/v1/organization/admin_api_keys"),
    ("GET", "/v1/organizations/me"),
    ("POST", "/v1/batches"),
    ("POST", "/v1/messages/batches"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1/chat/completions/.."),
    ("POST", "/v1/chat/completions/../../admin/keys"),
    ("POST", "/v1/chat%2Fcompletions%2F..%2F..%2Ffiles"),
    ("POST", "/v1/files%2F..%2Fchat%2Fcompletions"),
    ("GET", "/v1/models/gpt-4o%2F..%2F..%2Ffiles"),
    ("GET", "/v1/models/.."),
    ("GET", "/v1/models/%2e%2e"),
    ("POST", f"{GEMINI}%2F..%2F..%2Ffiles:generateContent"),
    ("POST", "/v1beta/models/..%2Ffiles:generateContent"),
    ("POST", "/v1beta/files"),
    ("POST", "/v1beta/cachedContents"),
    ("POST", f"{GEMINI}:batchGenerateContent"),
    ("POST", "/v1beta/tunedModels/x:generateContent"),
    ("GET", "/v1beta/models"),
    ("POST", "/v1/messages/../../v1/files"),
    ("POST", "/v1/messages%2F..%2F..%2Fv1%2Ffiles"),
    ("POST", "/v1/messages/count_tokens/.."),
    ("POST", "/V1/chat/completions"),
    ("POST", "/v1/Chat/Completions"),
    ("POST", "/v1/chat/completions;jsessionid=1"),
    ("POST", "/v1/chat/completions%00"),
    ("POST", "/v1/chat/completions%20"),
    ("POST", "/v1\\..\\files"),
    ("DELETE", "/v1/chat/completions"),
    ("PUT", "/v1/messages"),
    ("PATCH", f"{GEMINI}:generateContent"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/chat/completions?x=../../files"),
]


# --- clients ---


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (a refused HTTP/2 stream or connection)
    body: bytes
    note: str = ""


def send_httpx(
    http: httpx.Client, method: str, path: str, headers: dict[str, str], body: bytes
) -> Answer:
    try:
        resp = http.request(method, path, headers=headers, content=body)
    except httpx.TimeoutException:
        return Answer(None, b"", "hang")
    return Answer(resp.status_code, resp.content)


def http_request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 request with the exact target given (httpx normalises dot segments)."""
    lines = [f"{method} {path} HTTP/1.1", "host: till", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send_raw(till: Till, request: bytes) -> list[Answer]:
    """Bytes on a fresh HTTP/1.1 connection; every response read until the server closes."""
    host, port = till.url.removeprefix("http://").split(":")
    data = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            return [Answer(None, data, "hang")]
        except ConnectionResetError:
            pass
    answers = []
    while data.startswith(b"HTTP/1."):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
        size = int(fields.get(b"content-length", b"0"))
        answers.append(Answer(status, rest[:size]))
        data = rest[size:]
    return answers or [Answer(None, data, "no HTTP answer")]


def send_h2(till: Till, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    """One HTTP/2 request (prior knowledge, cleartext) whose headers are sent unchecked."""
    host, port = till.url.removeprefix("http://").split(":")
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )  # fmt: skip
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, headers)
    conn.send_data(stream, body, end_stream=True)
    status: int | None = None
    data = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(conn.data_to_send())
            while chunk := sock.recv(65536):
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream)
                    elif isinstance(event, h2.events.StreamEnded):
                        return Answer(status, data)
                    elif isinstance(event, h2.events.StreamReset):
                        return Answer(status, data, f"stream reset ({event.error_code!r})")
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return Answer(status, data, f"connection refused ({event.error_code!r})")
                sock.sendall(conn.data_to_send())
        except TimeoutError:
            return Answer(None, data, "hang")
        except (ConnectionResetError, BrokenPipeError, h2.exceptions.ProtocolError) as exc:
            return Answer(status, data, f"connection closed ({type(exc).__name__})")
    return Answer(status, data, "connection closed")


def auth(provider: str, token: str) -> dict[str, str]:
    """The token where the provider's SDK puts it (first), and what the SDK sends besides."""
    value = f"Bearer {token}" if AUTH[provider] == "authorization" else token
    headers = {AUTH[provider]: value, "content-type": "application/json"}
    if provider == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    return headers


def raw_request(
    provider: str, token: str, body: bytes = CHAT_BODY, path: str = "/v1/chat/completions",
    extra: bytes = b"", version: bytes = b"HTTP/1.1",
) -> bytes:  # fmt: skip
    name, value = next(iter(auth(provider, token).items()))
    return (
        b"POST " + path.encode() + b" " + version + b"\r\nhost: till\r\nconnection: close\r\n"
        + f"{name}: {value}\r\ncontent-type: application/json\r\n".encode()
        + extra + f"content-length: {len(body)}\r\n\r\n".encode() + body
    )  # fmt: skip


def h2_request(provider: str, token: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    name, value = next(iter(auth(provider, token).items()))
    return [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"till"),
        (b":path", b"/v1/chat/completions"), (name.encode(), value.encode()),
        (b"content-type", b"application/json"), *extra,
    ]  # fmt: skip


# --- what every answer must be ---


def dialect_problem(path: str, status: int, data: bytes) -> str | None:
    """Why ``data`` is not an error in the dialect of the SDK calling ``path``, else None."""
    try:
        body = json.loads(data)
    except ValueError:
        return f"not JSON: {data[:80]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return f"no error object: {data[:80]!r}"
    error = body["error"]
    decoded = unquote(path.partition("?")[0])
    fmt = next((f for f in formats() if f.speaks(decoded)), formats()[-1])
    if fmt is ANTHROPIC_FORMAT:
        ok = body.get("type") == "error" and bool(error.get("type")) and "message" in error
    elif fmt is GEMINI_FORMAT:
        ok = error.get("code") == status and bool(error.get("status")) and "till_code" in error
    else:
        ok = {"message", "type", "code"} <= set(error)
    return None if ok else f"not {fmt.name}'s error shape: {data[:120]!r}"


def till_code(data: bytes) -> Any:
    error = json.loads(data)["error"]
    return error.get("till_code", error.get("code"))


COUNTERS = (
    "usedActivations", "usedTokens", "heldTokens", "usedSpendMicrocents", "heldSpendCents",
    "lastUsedAt", "status",
)  # fmt: skip


@dataclass
class Key:
    provider: str
    id: str
    token: str


class Upstream:
    """The mock's records through one kept-alive connection (a new one costs ~30 ms)."""

    def __init__(self, mock: Mock) -> None:
        self.http = httpx.Client(base_url=mock.url, timeout=TIMEOUT)

    def requests(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.http.get("/_mock/requests").json()
        return records

    def reset(self) -> None:
        self.http.post("/_mock/reset").raise_for_status()


class Watch:
    """Checks, case by case, that nothing reached the upstream and no counter moved."""

    def __init__(self, admin: httpx.Client, mock: Upstream, keys: dict[str, Key]) -> None:
        self.admin, self.mock, self.keys = admin, mock, keys
        self.problems: list[str] = []
        self.tried = 0
        self.mock.reset()
        self.before = {p: self.counters(k) for p, k in keys.items()}

    def counters(self, key: Key) -> dict[str, Any]:
        record = get_key(self.admin, key.id)
        return {name: record[name] for name in COUNTERS}

    def untouched(self, case: str, provider: str) -> None:
        self.tried += 1
        seen = self.mock.requests()
        if seen:
            paths = [r["path"] for r in seen]
            self.problems.append(f"{case}: the upstream received {paths}")
            self.mock.reset()
        after = self.counters(self.keys[provider])
        if after != self.before[provider]:
            self.problems.append(f"{case}: counters moved {self.before[provider]} -> {after}")
            self.before[provider] = after

    def refused(self, case: str, path: str, answer: Answer, code: str | None) -> None:
        """A 4xx from Till in the path's dialect (with Till's ``code`` unless None)."""
        if answer.status is None or not 400 <= answer.status < 500:
            self.problems.append(f"{case}: {answer.status} {answer.note} {answer.body[:120]!r}")
            return
        problem = dialect_problem(path, answer.status, answer.body)
        if problem is None and code is not None and till_code(answer.body) != code:
            problem = f"code {till_code(answer.body)!r}, not {code!r}"
        if problem is not None:
            self.problems.append(f"{case}: {problem}")

    def refused_anywhere(self, case: str, path: str, answer: Answer) -> None:
        """Refused by Till (a 4xx in the path's dialect) or by the HTTP server before it."""
        if answer.status is not None and 400 <= answer.status < 500 and not answer.body:
            return  # a bare 4xx from the HTTP server: Till never ran
        if answer.status is None and answer.note not in ("", "hang"):
            return  # an HTTP/2 stream or connection refused
        self.refused(case, path, answer, None)

    def protocol_refused(self, case: str, answer: Answer) -> None:
        """Refused by the HTTP server itself (before Till runs), or by Till with a 4xx."""
        if answer.status is None:
            if answer.note == "hang" or not answer.note:
                self.problems.append(f"{case}: {answer.note or 'no answer'}")
            return  # an HTTP/2 connection or stream refused
        if answer.status == 501 and not answer.body:
            return  # an unknown transfer coding (RFC 9112, 6.1)
        if not 400 <= answer.status < 500:
            self.problems.append(f"{case}: {answer.status} {answer.body[:120]!r}")


@pytest.fixture
def upstream(mock_upstream: Mock) -> Iterator[Upstream]:
    mock = Upstream(mock_upstream)
    yield mock
    mock.http.close()


@pytest.fixture
def http(till: Till) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=till.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def keys(admin: httpx.Client) -> Iterator[dict[str, Key]]:
    made = {}
    for provider, real_key in UPSTREAM_KEYS.items():
        key = create_key(
            admin, provider=provider, upstream_key=real_key, max_activations=10_000,
            max_tokens=1_000_000,
        )  # fmt: skip
        made[provider] = Key(provider, key["id"], key["scopedKey"])
    yield made


# --- the tests ---


def test_malformed_bodies_are_a_400_on_every_route(
    http: httpx.Client, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    watch = Watch(admin, upstream, keys)
    for name, body in MALFORMED.items():
        for provider, paths in ROUTES.items():
            for path in paths:
                case = f"{name} on {provider} {path}"
                answer = send_httpx(http, "POST", path, auth(provider, keys[provider].token), body)
                if answer.status != 400:
                    watch.problems.append(f"{case}: {answer.status} {answer.body[:120]!r}")
                else:
                    watch.refused(case, path, answer, "invalid_json")
                watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(MALFORMED) * N_ROUTES


def test_forbidden_and_traversal_paths_are_a_404_with_every_token(
    till: Till, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    watch = Watch(admin, upstream, keys)
    for method, path in FORBIDDEN:
        for provider, key in keys.items():
            case = f"{method} {path} with a {provider} token"
            request = http_request(method, path, auth(provider, key.token), FINE_BODY)
            (answer,) = send_raw(till, request)
            if answer.status != 404:
                watch.problems.append(f"{case}: {answer.status} {answer.body[:120]!r}")
            else:
                watch.refused(case, path, answer, "not_found")
            watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(FORBIDDEN) * len(keys)


def test_an_encoded_slash_reaches_only_the_path_till_checked(
    till: Till, upstream: Upstream, keys: dict[str, Key]
) -> None:
    """The server decodes %2F before Till routes; Till forwards the path it checked, so the
    upstream never sees an encoding it might read otherwise."""
    upstream.reset()
    token = keys["openai"].token
    request = http_request("POST", "/v1/chat%2Fcompletions", auth("openai", token), CHAT_BODY)
    (answer,) = send_raw(till, request)
    assert answer.status == 200
    assert [r["path"] for r in upstream.requests()] == ["/v1/chat/completions"]


def test_protocol_abuse_is_refused_before_anything_is_forwarded(
    till: Till, http: httpx.Client, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    watch = Watch(admin, upstream, keys)
    for provider, key in keys.items():
        t = key.token
        cases: dict[str, bytes] = {
            "a bare CR in a header value": raw_request(provider, t, extra=b"x-a: 1\rx-b: 2\r\n"),
            "a NUL in a header value": raw_request(provider, t, extra=b"x-a: 1\x00x-b: 2\r\n"),
            "a header line without a colon": raw_request(provider, t, extra=b"x-a 1\r\n"),
            "a space in a header name": raw_request(provider, t, extra=b"x a: 1\r\n"),
            "a non-ASCII request target": raw_request(provider, t, path="/v1/\xff"),
            "a space in the request target": raw_request(provider, t, path="/v1/chat completions"),
            "a 64 KB request target": raw_request(provider, t, path="/v1/" + "a" * 65_536),
            "a non-numeric content-length": (
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: till\r\n"
                b"content-length: abc\r\nconnection: close\r\n\r\n{}"
            ),
            "a negative content-length": raw_request(provider, t, extra=b"content-length: -1\r\n"),
            "two different content-lengths": raw_request(
                provider, t, extra=b"content-length: 3\r\n"
            ),
            "a bad chunk size": (
                raw_request(provider, t, body=b"", extra=b"transfer-encoding: chunked\r\n").replace(
                    b"content-length: 0\r\n", b""
                )
                + b"zz\r\n{}\r\n0\r\n\r\n"
            ),
            "an unknown transfer coding": raw_request(
                provider, t, extra=b"transfer-encoding: xchunked\r\n"
            ).replace(b"content-length: ", b"x-was: "),
        }
        for name, request in cases.items():
            case = f"{name} ({provider})"
            for answer in send_raw(till, request):
                watch.protocol_refused(case, answer)
            watch.untouched(case, provider)
        # Oversized credentials: Till's own 401, in the dialect of the path.
        for name, headers in {
            "a 20 KB token": auth(provider, t + "A" * 20_000),
            "a 20 KB authorization header": {"authorization": "Bearer " + "A" * 20_000},
            "a 20 KB x-api-key": {"x-api-key": "k" * 20_000},
            "a 20 KB x-goog-api-key": {"x-goog-api-key": "k" * 20_000},
        }.items():
            path = ROUTES[provider][0]
            case = f"{name} ({provider} {path})"
            answer = send_httpx(http, "POST", path, headers, FINE_BODY)
            watch.refused(case, path, answer, "invalid_api_key")
            watch.untouched(case, provider)
        # HTTP/2 lets a CR, LF or NUL sit inside a header value or name: refused outright.
        for name, header in {
            "CRLF in a value": (b"x-a", b"1\r\nopenai-organization: org-evil"),
            "LF in a value": (b"x-a", b"1\nx-injected: 1"),
            "CR in a value": (b"x-a", b"1\rx-injected: 1"),
            "NUL in a value": (b"x-a", b"1\x00x-injected: 1"),
            "CRLF in a name": (b"x-a\r\nx-injected", b"1"),
            "a colon in a name": (b"x-injected: 1\r\nx-b", b"1"),
            "an upper-case name": (b"X-Injected", b"1"),
        }.items():
            case = f"HTTP/2 {name} ({provider})"
            watch.protocol_refused(case, send_h2(till, h2_request(provider, t, header), CHAT_BODY))
            watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(keys) * (12 + 4 + 7)


# Deny-listed headers a client might try to smuggle past the deny-list.
INJECTED = ("openai-organization", "openai-project", "x-goog-user-project", "x-forwarded-for")


def test_header_smuggling_is_refused_or_stripped(
    till: Till, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    """HTTP/1.1 ways to put a second header inside one: refused, or served without it (h11
    joins an obs-fold into the value, reads a bare LF as the end of a line; the deny-list then
    drops the header). The upstream never gets a deny-listed header, nor a CR or LF anywhere."""
    problems: list[str] = []
    tried = 0
    for provider, key in keys.items():
        t = key.token
        for injected in INJECTED:
            line = f"{injected}: evil".encode()
            cases = {
                "obs-fold": b"x-a: 1\r\n " + line + b"\r\n",
                "obs-fold with a tab": b"x-a: 1\r\n\t" + line + b"\r\n",
                "bare LF": b"x-a: 1\n" + line + b"\r\n",
                "bare CR": b"x-a: 1\r" + line + b"\r\n",
                "percent-encoded CRLF": b"x-a: 1%0d%0a" + line + b"\r\n",
            }
            for name, extra in cases.items():
                case = f"{name} + {injected} ({provider})"
                tried += 1
                upstream.reset()
                before = get_key(admin, key.id)
                (answer,) = send_raw(till, raw_request(provider, t, extra=extra))
                seen = upstream.requests()
                if answer.status is None or answer.status >= 500:
                    problems.append(f"{case}: {answer.status} {answer.note}")
                elif answer.status >= 400:
                    if (
                        seen
                        or get_key(admin, key.id)["usedActivations"] != before["usedActivations"]
                    ):
                        problems.append(f"{case}: refused, yet forwarded or counted")
                elif len(seen) != 1:
                    problems.append(f"{case}: served, but the upstream saw {len(seen)} requests")
                else:
                    headers: dict[str, str] = seen[0]["headers"]  # type: ignore[assignment]
                    if injected in headers:
                        problems.append(f"{case}: the upstream received {injected}")
                    if any("\r" in v or "\n" in v for v in headers.values()):
                        problems.append(f"{case}: a CR or LF reached the upstream")
        # A CRLF in the query is a value, re-encoded on the way: never a header.
        upstream.reset()
        tried += 1
        path = "/v1/chat/completions?x=1%0d%0aopenai-organization:%20evil"
        (answer,) = send_raw(till, raw_request(provider, t, path=path))
        for record in upstream.requests():
            if "openai-organization" in record["headers"]:  # type: ignore[operator]
                problems.append(f"CRLF in the query ({provider}): the header reached the upstream")
        if answer.status is None or answer.status >= 500:
            problems.append(f"CRLF in the query ({provider}): {answer.status} {answer.note}")
    assert not problems, "\n".join(problems)
    assert tried == len(keys) * (len(INJECTED) * 5 + 1)


def test_a_smuggled_second_request_is_a_request_of_its_own(
    till: Till, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    """Transfer-Encoding and Content-Length both: refused outright by the HTTP server (uvicorn's
    httptools: a bare 400, the connection closed), or the chunked reading wins (hypercorn: an
    empty body, a 400), and the request hidden behind it is read as the client's next one: a
    404 for /v1/files. Till makes its own upstream requests, so nothing reaches the provider."""
    watch = Watch(admin, upstream, keys)
    for provider, key in keys.items():
        name, value = next(iter(auth(provider, key.token).items()))
        hidden = (
            f"POST /v1/files HTTP/1.1\r\nhost: till\r\n{name}: {value}\r\n".encode()
            + b"connection: close\r\ncontent-length: 2\r\n\r\n{}"
        )
        body = b"0\r\n\r\n" + hidden
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: till\r\n"
            + f"{name}: {value}\r\n".encode()
            + f"transfer-encoding: chunked\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answers = send_raw(till, request)
        case = f"TE and CL ({provider})"
        statuses = [a.status for a in answers]
        if statuses == [400] and not answers[0].body:
            pass  # the server refused the whole of it: nothing was read past the first line
        elif statuses != [400, 404]:
            watch.problems.append(f"{case}: {statuses}")
        else:
            watch.refused(case, "/v1/chat/completions", answers[0], "invalid_json")
            watch.refused(case, "/v1/files", answers[1], "not_found")
        watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(keys)


def test_control_characters_in_forwarded_headers_are_a_400(
    till: Till, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    watch = Watch(admin, upstream, keys)
    for provider, key in keys.items():
        for char in (b"\x01", b"\x0b", b"\x1f", b"\x7f"):
            case = f"HTTP/1.1 x-a: a{char!r}b ({provider})"
            (answer,) = send_raw(
                till, raw_request(provider, key.token, extra=b"x-a: a" + char + b"b\r\n")
            )
            watch.refused_anywhere(case, "/v1/chat/completions", answer)
            watch.untouched(case, provider)
            case = f"HTTP/2 x-a: a{char!r}b ({provider})"
            answer = send_h2(
                till, h2_request(provider, key.token, (b"x-a", b"a" + char + b"b")), CHAT_BODY
            )
            watch.refused_anywhere(case, "/v1/chat/completions", answer)
            watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(keys) * 8


def test_a_20_kb_forwarded_header_is_refused_before_the_provider(
    http: httpx.Client, admin: httpx.Client, upstream: Upstream, keys: dict[str, Key]
) -> None:
    watch = Watch(admin, upstream, keys)
    for provider, key in keys.items():
        case = f"a 20 KB x-custom header ({provider})"
        headers = auth(provider, key.token) | {"x-custom": "v" * 20_000}
        answer = send_httpx(http, "POST", "/v1/chat/completions", headers, CHAT_BODY)
        watch.refused(case, "/v1/chat/completions", answer, None)
        watch.untouched(case, provider)
    assert not watch.problems, "\n".join(watch.problems)
    assert watch.tried == len(keys)


def test_valid_but_hostile_bodies_are_forwarded_within_the_grant_or_refused(
    http: httpx.Client, admin: httpx.Client, upstream: Upstream
) -> None:
    """Numbers past what the store computes exactly (once a 500), wrong types, repeated names:
    never a 5xx from Till; what reaches the provider asks for no more output than the key has
    left (whichever copy of a repeated name it reads), and the counters reconcile after each."""
    limit = 10_000_000
    keys = {}
    for provider, real_key in UPSTREAM_KEYS.items():
        key = create_key(
            admin, provider=provider, upstream_key=real_key, max_activations=10_000,
            max_tokens=limit,
        )  # fmt: skip
        keys[provider] = Key(provider, key["id"], key["scopedKey"])
    bodies = {name: json.dumps(FINE | fields).encode() for name, fields in HOSTILE_VALUES.items()}
    # The hostile copy last: the one Till reads.
    bodies |= {name: FINE_BODY[:-1] + b"," + raw[1:] for name, raw in HOSTILE_RAW.items()}
    problems: list[str] = []
    tried = served = 0
    for name, body in bodies.items():
        for provider, paths in ROUTES.items():
            key = keys[provider]
            for path in paths:
                case = f"{name} on {provider} {path}"
                tried += 1
                upstream.reset()
                before = get_key(admin, key.id)
                answer = send_httpx(http, "POST", path, auth(provider, key.token), body)
                after = get_key(admin, key.id)
                seen = upstream.requests()
                if answer.status is None or answer.status >= 500:
                    problems.append(f"{case}: {answer.status} {answer.body[:160]!r}")
                served += answer.status == 200
                counted = after["usedActivations"] - before["usedActivations"]
                if len(seen) > 1 or counted != len(seen):
                    moved = f"{before['usedActivations']} -> {after['usedActivations']}"
                    problems.append(f"{case}: {len(seen)} upstream requests, activations {moved}")
                if after["heldTokens"] or after["usedTokens"] + after["remainingTokens"] != limit:
                    problems.append(f"{case}: counters do not reconcile: {after}")
                for record in seen:
                    cap = forwarded_cap(path, record.get("body"))
                    if cap is not None and cap > before["remainingTokens"]:
                        left = before["remainingTokens"]
                        problems.append(f"{case}: forwarded a cap of {cap}, {left} left")
    assert not problems, "\n".join(problems)
    assert tried == len(bodies) * N_ROUTES
    assert served >= tried * 3 // 4  # most reach the provider: the caps above were checked


# Where each route keeps its output cap and its number of generations.
CAPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "/v1/chat/completions": (("max_tokens", "max_completion_tokens"), ("n",)),
    "/v1/completions": (("max_tokens",), ("n", "best_of")),
    "/v1/responses": (("max_output_tokens",), ()),
    "/v1/messages": (("max_tokens",), ()),
}
GEMINI_CAPS = (("maxOutputTokens", "max_output_tokens"), ("candidateCount", "candidate_count"))


def forwarded_cap(path: str, body: Any) -> int | None:
    """The most output a body the mock received on ``path`` asks for (as the mock parsed it):
    its largest per-generation cap times its generations; None where it sets none."""
    if not isinstance(body, dict):
        return None
    objects = [body]
    caps, counts = CAPS.get(path, ((), ()))
    if ":generateContent" in path or ":streamGenerateContent" in path:
        caps, counts = GEMINI_CAPS
        objects = [body.get(n) for n in ("generationConfig", "generation_config")]
    values = [o.get(f) for o in objects if isinstance(o, dict) for f in caps]
    gens = [o.get(f) for o in objects if isinstance(o, dict) for f in counts]
    numbers = [c for c in values if isinstance(c, int) and not isinstance(c, bool)]
    generations = [c for c in gens if isinstance(c, int) and not isinstance(c, bool)]
    return max(numbers) * max([1, *generations]) if numbers else None
