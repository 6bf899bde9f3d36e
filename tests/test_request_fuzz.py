"""P18 in process: the request path's readers never fail on hostile input.

No server here: the functions the proxy runs on a request before it reserves anything are
called directly, with what hypothesis makes of them.

* ``find_token`` and ``_upstream_query`` over any headers and query string: a token (str) or
  None, never an exception; the client's ``key`` parameter never goes upstream.
* ``decode_body`` over any bytes and over JSON-ish bodies written to hurt (lone surrogates,
  escaped and raw; integers past 64 bits; NaN and Infinity; wrong types in the fields Till
  reads; repeated names; nesting past the decoder's limit): ``BadRequest`` (the proxy's 400)
  or a body. Then every metered route's ``inspect`` and ``rewrite`` raise nothing, what the
  reservation is given stays within what the store's scripts compute exactly, and the body as
  forwarded is one valid JSON object whose output caps and generation counts are within the
  grant, however the provider reads a repeated name (first or last copy).
* Each provider's ``route`` over any method, path and query: None, or a route to one of its
  inference paths.
* Each format's ``usage`` and stream meters over any bytes from upstream: nothing raised.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote_from_bytes

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from till.server.access import find_token
from till.server.providers.anthropic import ANTHROPIC_FORMAT, AnthropicProvider
from till.server.providers.base import (
    MAX_ASKED_OUTPUT,
    BadRequest,
    Format,
    Route,
    decode_body,
    encode,
)
from till.server.providers.google import GEMINI_FORMAT, MAX_CANDIDATES, GoogleProvider
from till.server.providers.openai import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    OPENAI_FORMAT,
    OpenAIProvider,
)
from till.server.proxy import NO_OUTPUT_KINDS, _upstream_query

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The store's scripts compute in Lua numbers: integers are exact up to 2**53 - 1.
LUA_EXACT = 2**53 - 1
DEFAULT_MAX_OUTPUT = 4096  # TILL_DEFAULT_MAX_OUTPUT_TOKENS' default

OPENAI, ANTHROPIC, GOOGLE = OpenAIProvider(), AnthropicProvider(), GoogleProvider()
GEMINI = "/v1beta/models/gemini-2.5-flash"


def _route(provider: Any, path: str, query: bytes = b"") -> Route:
    route: Route | None = provider.route("POST", path, query)
    assert route is not None and route.metered, path
    return route


# Every metered route: the proxy decodes, inspects and rewrites the body of each.
METERED: list[Route] = [
    _route(OPENAI, "/v1/chat/completions"),
    _route(OPENAI, "/v1/completions"),
    _route(OPENAI, "/v1/responses"),
    _route(OPENAI, "/v1/embeddings"),
    _route(ANTHROPIC, "/v1/messages"),
    _route(ANTHROPIC, "/v1/chat/completions"),
    _route(GOOGLE, f"{GEMINI}:generateContent"),
    _route(GOOGLE, f"{GEMINI}:streamGenerateContent"),
    _route(GOOGLE, f"{GEMINI}:streamGenerateContent", b"alt=sse"),
    _route(GOOGLE, f"{GEMINI}:embedContent"),
    _route(GOOGLE, f"{GEMINI}:batchEmbedContents"),
    _route(GOOGLE, "/v1/chat/completions"),
]
FORMATS: list[Format] = [OPENAI_FORMAT, ANTHROPIC_FORMAT, GEMINI_FORMAT]

# --- JSON-ish values, written the way a hostile client would ---


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: its pairs in order, a name possibly more than once."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Deep:
    """A value under ``depth`` arrays or objects (written without recursion)."""

    depth: int
    objects: bool
    inner: Any


def dump(value: Any, raw_surrogates: bool) -> bytes:
    """JSON-ish bytes: NaN and Infinity as literals, lone surrogates escaped (\\ud800) or, with
    ``raw_surrogates``, as the three bytes UTF-8 forbids, integers of any size."""
    if isinstance(value, Deep):
        opener, closer = (b'{"a":', b"}") if value.objects else (b"[", b"]")
        inner = dump(value.inner, raw_surrogates)
        return opener * value.depth + inner + closer * value.depth
    if isinstance(value, Obj):
        return (
            b"{"
            + b",".join(
                dump(k, raw_surrogates) + b":" + dump(v, raw_surrogates) for k, v in value.pairs
            )
            + b"}"
        )
    if isinstance(value, list):
        return b"[" + b",".join(dump(v, raw_surrogates) for v in value) + b"]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=not raw_surrogates).encode("utf-8", "surrogatepass")
    if isinstance(value, bool) or value is None:
        return json.dumps(value).encode()
    if isinstance(value, int):
        return str(value).encode()
    assert isinstance(value, float)
    return json.dumps(value).encode()  # NaN, Infinity, -Infinity as literals


# Top-level fields the formats read, and the fields inside the objects they read.
TOP = [
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "n", "best_of", "thinking", "generationConfig", "generation_config",
    "contents", "tools", "cachedContent", "cached_content", "previous_response_id",
    "conversation", "input", "prompt", "system", "systemInstruction",
]  # fmt: skip
NESTED = [
    "maxOutputTokens", "max_output_tokens", "candidateCount", "candidate_count",
    "thinkingConfig", "thinking_config", "thinkingBudget", "thinking_budget", "budget_tokens",
    "type", "include_usage", "fileData", "fileUri", "file_uri", "functionDeclarations",
    "googleSearch", "temperature",
]  # fmt: skip
SURROGATE_TEXT = st.text(
    st.characters(codec=None, categories=["Cs", "Lu", "Ll", "Nd", "Zs", "Cc", "So"]), max_size=12
)
# fmt: off
EDGE_NUMBERS = [
    -1, 0, 1, 16, 1023, 1024, 1025, 4096, 2**31 - 1, 2**31, 2**53 - 1, 2**53 + 1, 2**63, 2**64,
    10**30, -(2**63) - 1, 10**4000, 1e308, -0.0, 0.5, 100.0, 1e3,
]
EDGE_TEXT = [
    "", "x", "100", " 100 ", "1e3", "1_000", "-5", "yes", "true", "enabled", "gpt-4o",
    "gemini-2.5-flash", "claude-sonnet-4-5",
]
# fmt: on
NUMBERS = st.one_of(st.integers(), st.floats(), st.sampled_from(EDGE_NUMBERS))  # nan, inf too
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, SURROGATE_TEXT, st.sampled_from(EDGE_TEXT))
NAMES = st.one_of(st.sampled_from(TOP + NESTED), SURROGATE_TEXT)


def objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Obj]:
    pairs = st.lists(st.tuples(NAMES, values), max_size=5)
    return pairs.map(lambda p: Obj(tuple(p)))


VALUES = st.recursive(
    SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=4), objects(kids)), max_leaves=16
)
DEEP = st.builds(
    Deep, st.integers(min_value=1, max_value=1200), st.booleans(), st.one_of(SCALARS, VALUES)
)
# What a generationConfig, thinking or stream_options object may hold.
CONFIG = st.lists(
    st.tuples(
        st.sampled_from(NESTED),
        st.one_of(SCALARS, objects(st.one_of(SCALARS, VALUES)), DEEP),
    ),
    max_size=6,
).map(lambda p: Obj(tuple(p)))
BODIES = st.one_of(
    # An object naming the fields Till reads, any name possibly twice, with hostile values.
    st.lists(st.tuples(NAMES, st.one_of(SCALARS, VALUES, CONFIG, DEEP)), max_size=10).map(
        lambda p: Obj(tuple(p))
    ),
    VALUES,  # anything at the top: arrays, strings, numbers, null
    DEEP,
)


# --- reading a forwarded body as a provider might ---


@contextmanager
def deep_parsing() -> Iterator[None]:
    # msgspec allows ~1000 levels; Python's json counts the test's own frames too.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _big_int(text: str) -> int:
    return int(text) if len(text) < 4000 else 10**3999


def read_as_provider(data: bytes, first: bool) -> Any:
    """The forwarded body as a parser keeping the first (or the last) copy of a name reads it."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if not (first and k in out):
                out[k] = v
        return out

    with deep_parsing():
        return json.loads(data, object_pairs_hook=pairs, parse_int=_big_int)


def lenient_int(value: Any) -> int | None:
    """A number as the most lenient upstream might read it (numeric strings and integral
    floats too, booleans as 0 and 1); None when no parser would (a 400 upstream)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text) if len(text) < 4000 else None
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return None


def assert_within(doc: dict[str, Any], names: tuple[str, ...], bound: int, what: str) -> None:
    for name in names:
        if name in doc:
            value = lenient_int(doc[name])
            assert value is not None and value <= bound, (what, name, doc[name], bound)


def assert_caps(route: Route, generations: int, grant: int, doc: Any) -> None:
    """The forwarded body asks for no more output than ``grant`` (the rewrite's promise)."""
    assert isinstance(doc, dict)
    kind = route.kind
    if route.format is OPENAI_FORMAT:
        if kind == "embeddings":
            return
        per = grant // generations
        gens = {"chat": ("n",), "completions": ("n", "best_of")}.get(kind, ())
        assert_within(doc, gens, generations, "generations")
        caps = {
            "chat": ("max_completion_tokens", "max_tokens"),
            "completions": ("max_tokens",),
            "responses": ("max_output_tokens",),
        }[kind]
        assert_within(doc, caps, per, "cap")
        if not any(c in doc for c in caps):
            # Only the legacy completions endpoint has a default cap (16 tokens).
            assert kind == "completions" and per >= COMPLETIONS_DEFAULT_MAX_TOKENS, doc
    elif route.format is ANTHROPIC_FORMAT:
        assert "max_tokens" in doc
        assert_within(doc, ("max_tokens",), grant, "cap")
    else:
        if kind not in ("generate", "generate_sse", "generate_json"):
            return
        assert 1 <= generations <= MAX_CANDIDATES
        per = max(1, grant // generations)
        configs = [doc[n] for n in ("generationConfig", "generation_config") if n in doc]
        assert configs, doc
        for config in configs:
            assert isinstance(config, dict), config
            caps = ("maxOutputTokens", "max_output_tokens")
            assert any(c in config for c in caps), config
            assert_within(config, caps, per, "cap")
            assert_within(config, ("candidateCount", "candidate_count"), generations, "gens")
            for t in ("thinkingConfig", "thinking_config"):
                thinking = config.get(t)
                if isinstance(thinking, dict):
                    assert_within(thinking, ("thinkingBudget", "thinking_budget"), per, "budget")


def assert_one_object(data: bytes) -> None:
    """One JSON object in UTF-8 (its integers may be longer than msgspec decodes: kept raw)."""
    data.decode("utf-8")
    msgspec.json.decode(data, type=dict[str, msgspec.Raw])


# The reserve script's answer for a request: (grant for the invariant, any other grant).
Grants = Callable[[Route, int, int], tuple[int, int]]


def drawn_grants(data: st.DataObject) -> Grants:
    """What the reserve script grants: -1 for a key without limits, else the request's cap (or
    the default) lowered to the room the key has left, at least the smallest answer. And any
    grant at all, for a second rewrite that must only not fail."""

    def grants(route: Route, asked: int, generations: int) -> tuple[int, int]:
        odd = data.draw(st.integers(min_value=-1, max_value=2**45), label="any grant")
        if data.draw(st.booleans(), label="unlimited"):
            return -1, odd
        min_out = 0 if route.kind in NO_OUTPUT_KINDS else generations
        wanted = asked if asked >= 0 else DEFAULT_MAX_OUTPUT * generations
        room = data.draw(
            st.one_of(
                st.integers(min_value=min_out, max_value=min_out + 5000),
                st.integers(min_value=min_out, max_value=10**12),
            ),
            label="room",
        )
        return min(wanted, room), odd

    return grants


def fixed_grants(room: int) -> Grants:
    def grants(route: Route, asked: int, generations: int) -> tuple[int, int]:
        wanted = asked if asked >= 0 else DEFAULT_MAX_OUTPUT * generations
        return min(wanted, max(room, generations)), 0

    return grants


def exercise(raw: bytes, grants: Grants) -> dict[str, bytes] | None:
    """Run the proxy's request steps over ``raw``: None when it is refused with a 400, else
    the body forwarded for each route (by its upstream path and kind)."""
    try:
        body = decode_body(raw)
    except BadRequest:
        return None
    assert isinstance(body, dict)
    sent: dict[str, bytes] = {}
    for route in METERED:
        mine = type(body)(body)  # each route gets its own copy, repeated-names mark included
        info = route.format.inspect(route, mine)
        # What the reservation is given stays where the store's scripts compute exactly.
        assert -1 <= info.asked_output <= MAX_ASKED_OUTPUT <= LUA_EXACT
        assert info.generations >= 1 and DEFAULT_MAX_OUTPUT * info.generations <= LUA_EXACT
        # The model is echoed in error bodies (unknown_model_price): it must encode.
        for fmt in FORMATS:
            msgspec.json.decode(
                fmt.error_body(400, "unknown_model_price", repr(info.model), {"model": info.model})
            )
        grant, odd = grants(route, info.asked_output, info.generations)
        changed = route.format.rewrite(route, mine, info, grant)
        forwarded = encode(mine) if changed else raw
        assert_one_object(forwarded)
        if grant >= 0:
            for first in (True, False):
                assert_caps(route, info.generations, grant, read_as_provider(forwarded, first))
        sent[f"{route.upstream_path} {route.kind}"] = forwarded
        # Any grant at all (not only the script's): still nothing raised, still valid JSON.
        other = type(body)(body)
        if route.format.rewrite(route, other, route.format.inspect(route, other), odd):
            assert_one_object(encode(other))
    return sent


# --- the properties ---


HEADER_NAMES = st.one_of(
    st.sampled_from([b"authorization", b"x-api-key", b"x-goog-api-key", b"content-type"]),
    st.binary(max_size=20),
)
HEADER_VALUES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"Bearer " + b),
    st.binary(max_size=50).map(lambda b: b"bEaReR" + b),
    st.sampled_from([b"", b"Bearer", b"Bearer ", b"Bearer  \t", b" ", b"Basic abc"]),
)
QUERIES = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.tuples(st.sampled_from([b"key", b"alt", b"KEY", b"key ", b"k%65y"]), st.binary()),
        max_size=4,
    ).map(lambda ps: b"&".join(k + b"=" + quote_from_bytes(v).encode() for k, v in ps)),
    st.sampled_from([b"key=", b"key", b"=x", b"key=%ff%fe", b"key=%00", b"key=a;key=b", b"&&"]),
)


def came_from_headers(token: str, headers: dict[bytes, bytes]) -> bool:
    try:
        raw = token.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return any(raw in value for value in headers.values())


@FUZZ
@given(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=6), QUERIES)
def test_find_token_returns_a_string_or_none(headers: dict[bytes, bytes], query: bytes) -> None:
    token = find_token(headers, query)
    assert token is None or isinstance(token, str)
    if token is not None:
        # It came from the request: a header's value, or the query's key parameter.
        assert came_from_headers(token, headers) or token in [
            v for k, v in parse_qsl(query.decode("latin-1")) if k == "key"
        ]
    forwarded = _upstream_query(query)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in forwarded)
    assert "key" not in {k for k, _ in forwarded}


@FUZZ
@given(st.binary(max_size=4000), st.data())
def test_any_bytes_are_a_400_or_a_body(raw: bytes, data: st.DataObject) -> None:
    exercise(raw, drawn_grants(data))


@FUZZ
@given(BODIES, st.booleans(), st.data())
def test_hostile_json_is_a_400_or_forwarded_within_the_grant(
    value: Any, raw_surrogates: bool, data: st.DataObject
) -> None:
    exercise(dump(value, raw_surrogates), drawn_grants(data))


@FUZZ
@given(BODIES, st.data())
def test_cut_or_flipped_json_is_a_400_or_a_body(value: Any, data: st.DataObject) -> None:
    raw = dump(value, False)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)), label="cut")
    exercise(raw[:cut], drawn_grants(data))
    if raw:
        i = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="flip")
        byte = data.draw(st.integers(min_value=0, max_value=255), label="byte")
        exercise(raw[:i] + bytes([byte]) + raw[i + 1 :], drawn_grants(data))


@pytest.mark.parametrize(
    "raw",
    [
        dump(Obj((("model", "\ud800"),)), False),  # an escaped lone surrogate
        dump(Obj((("model", "gpt\udfff"),)), True),  # its three raw bytes (CESU-8)
        b'{"model":"gpt-4o\xff","messages":[]}',  # invalid UTF-8 in a field Till reads
        b'{"\xff":1}',  # ... in a name
        b'{"messages":[{"content":"\xc3"}]}',  # ... in a value Till never reads
        dump(Obj((("max_tokens", math.nan),)), False),
        dump(Obj((("max_tokens", -math.inf),)), False),
        dump(Deep(10_000, False, 0), False),
        dump(Obj((("messages", Deep(10_000, True, 0)),)), False),
        b"[" + b"0," * 100_000 + b"0]",
        b'"a string"',
        b"42",
        b"null",
        b"",
        b'{"model":"gpt-4o"',
        b'{"a":1} {"b":2}',
        b'{"a":1,}',
        b"{'a':1}",
        b"\xef\xbb\xbf{}",  # a byte order mark
    ],
)
def test_unreadable_bodies_are_refused(raw: bytes) -> None:
    """Each is a BadRequest, the proxy's 400. The invalid UTF-8 ones used to escape as
    UnicodeDecodeError (a 500, after nothing was reserved)."""
    assert exercise(raw, fixed_grants(1000)) is None


def sent_for(raw: bytes, path: str, room: int = 1000) -> dict[str, Any]:
    sent = exercise(raw, fixed_grants(room))
    assert sent is not None
    (forwarded,) = [v for k, v in sent.items() if k.startswith(path + " ")]
    doc: dict[str, Any] = read_as_provider(forwarded, first=True)
    return doc


def test_integers_past_what_the_store_computes_are_written_over() -> None:
    """max_tokens or n at 2**53 and beyond reached the reserve script, which refused them as
    not integers: a 500. Now they read as no cap (or one generation), and a limited key's
    request goes out with a cap it can pay for."""
    for big in (2**53 + 1, 2**63, 10**30):
        raw = json.dumps({"model": "gpt-4o", "max_tokens": big, "n": big}).encode()
        doc = sent_for(raw, "/v1/chat/completions", room=1000)
        assert doc["max_tokens"] <= 1000 and doc["n"] == 1
        assert sent_for(raw, "/v1/messages")["max_tokens"] <= 1000
    raw = b'{"max_tokens":1' + b"0" * 5000 + b"}"  # more digits than msgspec reads
    assert sent_for(raw, "/v1/responses")["max_output_tokens"] <= 1000
    raw = json.dumps({"max_tokens": 2**31 - 1, "n": 2**31 - 1}).encode()
    body = decode_body(raw)
    info = OPENAI_FORMAT.inspect(METERED[0], body)
    assert info.asked_output == MAX_ASKED_OUTPUT  # (2**31 - 1)**2, kept exact for the store


@pytest.mark.parametrize(
    ("fields", "path", "caps"),
    [
        # Both chat caps: the client's smaller one stays, the other is lowered.
        ({"max_completion_tokens": 10, "max_tokens": 100_000}, "/v1/chat/completions",
         {"max_completion_tokens": 10, "max_tokens": 10}),
        # A count the upstream might read leniently is written back as budgeted.
        ({"max_tokens": 100, "n": "8"}, "/v1/chat/completions", {"max_tokens": 100, "n": 1}),
        ({"max_tokens": 100, "best_of": 3.0}, "/v1/completions",
         {"max_tokens": 100, "best_of": 1}),
        # No cap on the legacy endpoint is its default of 16, within the grant: left alone.
        ({"prompt": "x"}, "/v1/completions", {}),
    ],
)  # fmt: skip
def test_every_cap_and_count_the_request_has_is_within_the_grant(
    fields: dict[str, Any], path: str, caps: dict[str, Any]
) -> None:
    doc = sent_for(json.dumps({"model": "gpt-4o", **fields}).encode(), path, room=1000)
    assert {
        k: doc[k] for k in ("max_completion_tokens", "max_tokens", "n", "best_of") if k in doc
    } == caps


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/messages", f"{GEMINI}:generateContent"]
)
def test_a_repeated_name_is_forwarded_once_as_till_read_it(path: str) -> None:
    """The decoder keeps the last copy; a provider keeping the first would have read a cap of
    100,000 where Till budgeted 5. Within the grant, nothing else rewrote the body, so it went
    out as sent, both copies included."""
    raw = (
        b'{"model":"gpt-4o","max_tokens":100000,"stream":false,"max_tokens":5,'
        b'"generationConfig":{"maxOutputTokens":100000},"generationConfig":{"maxOutputTokens":5}}'
    )
    sent = exercise(raw, fixed_grants(1000))
    assert sent is not None
    (forwarded,) = [v for k, v in sent.items() if k.startswith(path + " ")]
    assert forwarded.count(b'"max_tokens"') == 1 and forwarded.count(b'"generationConfig"') == 1
    doc = json.loads(forwarded)
    assert doc["max_tokens"] == 5 and doc["generationConfig"]["maxOutputTokens"] == 5
    # Without limits too: the provider reads the copies Till read (model, stream).
    body = decode_body(raw)
    route = next(r for r in METERED if r.upstream_path == path)
    assert route.format.rewrite(route, body, route.format.inspect(route, body), -1)
    once = decode_body(b'{"model":"gpt-4o","max_tokens":5}')
    assert not route.format.rewrite(route, once, route.format.inspect(route, once), -1)


def test_upstream_bytes_that_are_not_utf8_are_no_usage() -> None:
    """A provider's answer with invalid UTF-8 in its model raised UnicodeDecodeError out of
    usage(): a 500 after the upstream had answered."""
    for route in METERED:
        for data in (b'{"model":"\xff","usage":{"prompt_tokens":1}}', b'{"modelVersion":"\xff"}'):
            _, model = route.format.usage(route, data)
            assert model == ""


@FUZZ
@given(
    st.sampled_from([OPENAI, ANTHROPIC, GOOGLE]),
    st.sampled_from(["POST", "GET", "PUT", "DELETE", "post", ""]),
    st.one_of(
        st.text(max_size=80),
        st.lists(
            st.sampled_from(
                [
                    "",
                    "v1",
                    "v1beta",
                    "..",
                    ".",
                    "%2e%2e",
                    "models",
                    "gemini-2.5-flash:generateContent",
                    "x:streamGenerateContent",
                    "chat",
                    "completions",
                    "messages",
                    "count_tokens",
                    "files",
                    "admin",
                    "organization",
                    "fine_tuning",
                    "jobs",
                    "batches",
                    "a/b",
                    "x%2F..%2Ffiles:generateContent",
                    "gpt-4o",
                    "\x00",
                    "\ud800",
                ]
            ),
            max_size=6,
        ).map(lambda parts: "/" + "/".join(parts)),
    ),
    QUERIES,
)
def test_routes_are_none_or_an_inference_path(
    provider: Any, method: str, path: str, query: bytes
) -> None:
    route = provider.route(method, path, query)
    if route is None:
        return
    up = route.upstream_path
    assert method in ("GET", "POST")
    assert up.startswith(("/v1/", "/v1beta/")) and "//" not in up and "\\" not in up
    assert not any(seg in (".", "..") for seg in up.split("/")), up
    assert all(c.isascii() and c.isprintable() for c in up), up
    tail = up.rsplit("/", 1)[-1]
    assert ".." not in tail, up


RESPONSES = st.one_of(
    st.binary(max_size=2000),
    BODIES.map(lambda v: dump(v, True)),
    st.sampled_from(
        [
            b'{"model":"\xff","usage":{"prompt_tokens":1}}',
            b'{"modelVersion":"\xed\xa0\x80"}',
            b'{"usage":{"input_tokens":99999999999999999999999}}',
            b'{"usageMetadata":{"totalTokenCount":-1,"promptTokenCount":1e999}}',
        ]
    ),
)


@FUZZ
@given(RESPONSES, st.integers(min_value=1, max_value=64))
def test_usage_and_meters_never_raise_on_upstream_bytes(data: bytes, size: int) -> None:
    for route in METERED:
        _, model = route.format.usage(route, data)
        assert isinstance(model, str)
        info = route.format.inspect(route, {})
        meter = route.format.meter(route, info)
        if meter.sse:
            for event in (data, b"data: " + data, b"event: message_delta\ndata: " + data):
                assert meter.keep(event) in (True, False)
        else:
            for i in range(0, len(data), size):
                meter.observe(data[i : i + size])
