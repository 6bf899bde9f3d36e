"""Gemini's wire format and Google's routes, without a server."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from google.genai import errors as genai_errors

from till.server.pricing import Usage
from till.server.providers.base import Route, decode_body
from till.server.providers.google import (
    COUNT_TOKENS,
    EMBED,
    GEMINI_FORMAT,
    GENERATE,
    GENERATE_JSON,
    GENERATE_SSE,
    OPENAI_COMPAT_PATH,
    GeminiJSONArrayMeter,
    GeminiSSEMeter,
    GoogleProvider,
)
from till.server.providers.openai import OPENAI_FORMAT

GOOGLE = GoogleProvider()
MODEL = "gemini-2.5-flash"


def route(path: str, query: bytes = b"", method: str = "POST") -> Route:
    found = GOOGLE.route(method, path, query)
    assert found is not None, path
    return found


def body_of(route_: Route, data: dict[str, Any], grant: int) -> tuple[dict[str, Any], bool, int]:
    """Inspect and rewrite as the proxy does; the forwarded JSON, changed?, asked_output."""
    body = decode_body(json.dumps(data).encode())
    info = GEMINI_FORMAT.inspect(route_, body)
    changed = GEMINI_FORMAT.rewrite(route_, body, info, grant)
    return json.loads(msgspec.json.encode(body)), changed, info.asked_output


GEN = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
CONTENTS = [{"role": "user", "parts": [{"text": "Hello"}]}]


# --- paths ---


@pytest.mark.parametrize("version", ["v1beta", "v1"])
@pytest.mark.parametrize(
    ("call", "query", "kind", "stream", "metered"),
    [
        ("generateContent", b"", GENERATE, False, True),
        ("streamGenerateContent", b"alt=sse", GENERATE_SSE, True, True),
        ("streamGenerateContent", b"", GENERATE_JSON, True, True),
        ("streamGenerateContent", b"alt=json", GENERATE_JSON, True, True),
        ("streamGenerateContent", b"alt=sse&key=till_sk_x", GENERATE_SSE, True, True),
        ("countTokens", b"", COUNT_TOKENS, False, False),
        ("embedContent", b"", EMBED, False, True),
        ("batchEmbedContents", b"key=abc", EMBED, False, True),
    ],
)
def test_inference_routes(
    version: str, call: str, query: bytes, kind: str, stream: bool, metered: bool
) -> None:
    path = f"/{version}/models/{MODEL}:{call}"
    r = route(path, query)
    assert (r.format, r.kind, r.upstream_path) == (GEMINI_FORMAT, kind, path)
    assert (r.model, r.stream, r.metered) == (MODEL, stream, metered)
    assert GOOGLE.auth_headers("AIza-real", r) == [("x-goog-api-key", "AIza-real")]


def test_openai_sdk_reaches_googles_openai_compatible_endpoint() -> None:
    r = route("/v1/chat/completions")
    assert (r.format, r.kind, r.upstream_path, r.metered) == (
        OPENAI_FORMAT,
        "chat",
        OPENAI_COMPAT_PATH,
        True,
    )
    assert GOOGLE.auth_headers("AIza-real", r) == [("authorization", "Bearer AIza-real")]


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("POST", "/v1beta/files", b""),
        ("GET", "/v1beta/files", b""),
        ("POST", "/upload/v1beta/files", b""),
        ("POST", "/v1beta/cachedContents", b""),
        ("GET", "/v1beta/cachedContents/abc", b""),
        ("POST", "/v1beta/tunedModels", b""),
        ("POST", "/v1beta/tunedModels/my-model:generateContent", b""),
        ("GET", "/v1beta/models", b""),
        ("GET", f"/v1beta/models/{MODEL}", b""),
        ("POST", f"/v1beta/models/{MODEL}:batchGenerateContent", b""),
        ("POST", f"/v1beta/models/{MODEL}:predictLongRunning", b""),
        ("POST", f"/v1beta/models/{MODEL}:predict", b""),
        ("GET", f"/v1beta/models/{MODEL}:generateContent", b""),
        ("PUT", f"/v1beta/models/{MODEL}:generateContent", b""),
        ("POST", "/v1beta/models/../files:generateContent", b""),
        ("POST", "/v1beta/models/..:generateContent", b""),
        ("POST", "/v1beta/models/.:generateContent", b""),
        ("POST", "/v1beta/models/a..b:generateContent", b""),
        ("POST", "/v1beta/models/x/../../files:generateContent", b""),
        ("POST", "/v1beta/models/:generateContent", b""),
        ("POST", f"/v1beta/models/{'a' * 129}:generateContent", b""),
        ("POST", "/v1beta/models/gemini 2:generateContent", b""),
        ("POST", "/v1beta/models/gemini%2F..:generateContent", b""),
        ("POST", f"/v1beta/models/{MODEL}:generateContent:generateContent", b""),
        ("POST", f"/v2/models/{MODEL}:generateContent", b""),
        ("POST", f"/v1beta//models/{MODEL}:generateContent", b""),
        ("POST", f"/v1beta/models/{MODEL}:generateContent/", b""),
        ("POST", "/v1beta/openai/chat/completions", b""),
        ("POST", "/v1beta/batches", b""),
        ("GET", "/v1beta/operations", b""),
        ("POST", "/v1/embeddings", b""),
        ("POST", "/v1/responses", b""),
        ("GET", "/v1/models", b""),
        # Query parameters other than alt and key: a field mask could drop usageMetadata.
        ("POST", GEN, b"fields=candidates"),
        ("POST", GEN, b"%24fields=candidates"),
        ("POST", GEN, b"callback=x"),
        ("POST", GEN, b"prettyPrint=false"),
        ("POST", GEN, b"access_token=x"),
        ("POST", GEN, b"alt=sse"),
        ("POST", GEN, b"alt=proto"),
        ("POST", f"/v1beta/models/{MODEL}:streamGenerateContent", b"alt=sse&alt=json"),
        ("POST", f"/v1beta/models/{MODEL}:streamGenerateContent", b"alt=media"),
        ("POST", "/v1/chat/completions", b"alt=sse"),
        ("POST", "/v1/chat/completions", b"fields=usage"),
    ],
)
def test_everything_else_is_not_routed(method: str, path: str, query: bytes) -> None:
    assert GOOGLE.route(method, path, query) is None


@pytest.mark.parametrize(
    ("path", "speaks"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", True),
        ("/v1beta/files", True),
        ("/v1beta/anything", True),
        ("/v1/models/gemini-2.5-flash:generateContent", True),
        ("/v1/models/gemini-2.5-flash:streamGenerateContent", True),
        ("/v1/models/gemini-2.5-flash:batchGenerateContent", True),
        ("/v1/models/gpt-4o", False),
        ("/v1/models/ft:gpt-4o-mini:org:custom:abc123", False),
        ("/v1/models", False),
        ("/v1/chat/completions", False),
        ("/v1/messages", False),
    ],
)
def test_speaks(path: str, speaks: bool) -> None:
    assert GEMINI_FORMAT.speaks(path) is speaks


# --- inspect and rewrite ---


def test_inspect_reads_model_and_stream_from_the_route() -> None:
    r = route(f"/v1/models/{MODEL}:streamGenerateContent", b"alt=sse")
    info = GEMINI_FORMAT.inspect(r, decode_body(b'{"model": "other", "stream": false}'))
    assert (info.model, info.stream, info.asked_output, info.generations) == (MODEL, True, -1, 1)


@pytest.mark.parametrize(
    ("config", "asked", "generations"),
    [
        (None, -1, 1),
        ({}, -1, 1),
        ({"temperature": 0.2}, -1, 1),
        ({"maxOutputTokens": 100}, 100, 1),
        ({"max_output_tokens": 100}, 100, 1),
        ({"maxOutputTokens": "100"}, 100, 1),
        ({"maxOutputTokens": 100.0}, 100, 1),
        ({"maxOutputTokens": 100, "max_output_tokens": 300}, 300, 1),
        ({"maxOutputTokens": 100, "candidateCount": 3}, 300, 3),
        ({"maxOutputTokens": 100, "candidate_count": "2"}, 200, 2),
        ({"candidateCount": 3}, -1, 3),
        ({"maxOutputTokens": "lots"}, -1, 1),
        ({"maxOutputTokens": 1.5}, -1, 1),
        ({"maxOutputTokens": True}, -1, 1),
        ({"maxOutputTokens": None}, -1, 1),
        ({"maxOutputTokens": -5}, -1, 1),
        ({"maxOutputTokens": 2**40}, -1, 1),
        ({"maxOutputTokens": "1e300"}, -1, 1),
        ("not an object", -1, 1),
    ],
)
def test_inspect_asked_output(config: Any, asked: int, generations: int) -> None:
    data: dict[str, Any] = {"contents": CONTENTS}
    if config is not None:
        data["generationConfig"] = config
    info = GEMINI_FORMAT.inspect(route(GEN), decode_body(json.dumps(data).encode()))
    assert (info.asked_output, info.generations) == (asked, generations)


def test_embeddings_ask_for_no_output() -> None:
    r = route("/v1beta/models/gemini-embedding-001:embedContent")
    info = GEMINI_FORMAT.inspect(r, decode_body(b'{"content": {"parts": [{"text": "hi"}]}}'))
    assert (info.model, info.asked_output) == ("gemini-embedding-001", 0)
    assert not GEMINI_FORMAT.rewrite(r, {}, info, 500)


def test_rewrite_lowers_the_cap_and_keeps_everything_else() -> None:
    data = {
        "contents": CONTENTS,
        "generationConfig": {
            "maxOutputTokens": 100_000,
            "temperature": 0.5,
            "stopSequences": ["x"],
            "thinkingConfig": {"thinkingBudget": 8000, "includeThoughts": True},
        },
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "safetySettings": [],
    }
    sent, changed, asked = body_of(route(GEN), data, 1000)
    assert changed and asked == 100_000
    assert sent == {
        **data,
        "generationConfig": {
            "maxOutputTokens": 1000,
            "temperature": 0.5,
            "stopSequences": ["x"],
            "thinkingConfig": {"thinkingBudget": 1000, "includeThoughts": True},
        },
    }
    assert list(sent) == list(data), "key order kept"


def test_rewrite_leaves_other_fields_as_the_client_sent_them() -> None:
    raw = b'{"contents":[{"parts":[{"text":"a\\u00e9  b"}]}] , "generationConfig":{"topK":3}}'
    body = decode_body(raw)
    r = route(GEN)
    info = GEMINI_FORMAT.inspect(r, body)
    assert GEMINI_FORMAT.rewrite(r, body, info, 50)
    assert bytes(body["contents"]) == b'[{"parts":[{"text":"a\\u00e9  b"}]}]'
    assert msgspec.json.decode(body["generationConfig"]) == {"topK": 3, "maxOutputTokens": 50}


def test_rewrite_adds_a_cap_when_the_request_sets_none() -> None:
    sent, changed, asked = body_of(route(GEN), {"contents": CONTENTS}, 4096)
    assert changed and asked == -1
    assert sent["generationConfig"] == {"maxOutputTokens": 4096}


def test_rewrite_keeps_a_smaller_cap_and_dynamic_or_small_thinking() -> None:
    config = {"maxOutputTokens": 200, "thinkingConfig": {"thinkingBudget": -1}}
    sent, changed, _ = body_of(route(GEN), {"contents": CONTENTS, "generationConfig": config}, 999)
    assert changed and sent["generationConfig"] == config
    config = {"maxOutputTokens": 200, "thinkingConfig": {"thinkingBudget": 0}}
    sent, _, _ = body_of(route(GEN), {"contents": CONTENTS, "generationConfig": config}, 150)
    assert sent["generationConfig"] == {
        "maxOutputTokens": 150,
        "thinkingConfig": {"thinkingBudget": 0},
    }


def test_no_limit_means_no_rewrite() -> None:
    data = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 100_000}}
    sent, changed, _ = body_of(route(GEN), data, -1)
    assert not changed and sent == data


def test_rewrite_splits_the_grant_between_candidates() -> None:
    data = {"contents": CONTENTS, "generationConfig": {"maxOutputTokens": 900, "candidateCount": 3}}
    sent, _, asked = body_of(route(GEN), data, 600)
    assert asked == 2700
    assert sent["generationConfig"] == {"maxOutputTokens": 200, "candidateCount": 3}


def test_rewrite_writes_back_the_candidate_count_it_budgeted() -> None:
    for count, budgeted in (("4", 4), ("many", 1), (50, 8)):
        data = {"contents": CONTENTS, "generationConfig": {"candidateCount": count}}
        sent, _, _ = body_of(route(GEN), data, 800)
        assert sent["generationConfig"] == {
            "candidateCount": budgeted,
            "maxOutputTokens": 800 // budgeted,
        }


def test_rewrite_covers_proto_field_names_and_both_spellings() -> None:
    data = {
        "contents": CONTENTS,
        "generation_config": {
            "max_output_tokens": "100000",
            "thinking_config": {"thinking_budget": "5000"},
        },
        "generationConfig": {"maxOutputTokens": 10, "max_output_tokens": 100_000},
    }
    sent, _, asked = body_of(route(GEN), data, 500)
    assert asked == 100_000
    assert sent["generation_config"] == {
        "max_output_tokens": 500,
        "thinking_config": {"thinking_budget": 500},
    }
    assert sent["generationConfig"] == {"maxOutputTokens": 500, "max_output_tokens": 500}


def test_rewrite_drops_duplicate_keys_so_upstream_reads_what_was_budgeted() -> None:
    raw = (
        b'{"contents":[],"generationConfig":{"maxOutputTokens":100000},'
        b'"generationConfig":{"maxOutputTokens":5}}'
    )
    body = decode_body(raw)
    r = route(GEN)
    info = GEMINI_FORMAT.inspect(r, body)
    assert GEMINI_FORMAT.rewrite(r, body, info, 300)
    sent = msgspec.json.encode(body)
    assert sent.count(b"generationConfig") == 1
    assert json.loads(sent)["generationConfig"] == {"maxOutputTokens": 5}
    raw = b'{"contents":[],"generationConfig":{"maxOutputTokens":5,"maxOutputTokens":100000}}'
    body = decode_body(raw)
    info = GEMINI_FORMAT.inspect(r, body)
    assert GEMINI_FORMAT.rewrite(r, body, info, 300)
    assert msgspec.json.encode(body).count(b"maxOutputTokens") == 1


# --- usage ---


def response(usage: dict[str, Any] | None, model: str = "gemini-2.5-flash-001") -> bytes:
    data: dict[str, Any] = {
        "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}],
        "modelVersion": model,
    }
    if usage is not None:
        data["usageMetadata"] = usage
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (
            {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
            Usage(10, 5),
        ),
        (  # cached content is already inside promptTokenCount; thoughts are output
            {
                "promptTokenCount": 100,
                "cachedContentTokenCount": 60,
                "candidatesTokenCount": 5,
                "thoughtsTokenCount": 30,
                "totalTokenCount": 135,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100}],
            },
            Usage(100, 35, cache_read_tokens=60),
        ),
        (  # tool results fed back to the model are input
            {
                "promptTokenCount": 10,
                "toolUsePromptTokenCount": 40,
                "candidatesTokenCount": 5,
                "totalTokenCount": 55,
            },
            Usage(50, 5),
        ),
        (  # a total beyond the parts is charged as output
            {"promptTokenCount": 10, "totalTokenCount": 25},
            Usage(10, 15),
        ),
        ({"promptTokenCount": 10, "totalTokenCount": 10}, Usage(10, 0)),
        # Trimmed by a field mask, or not Google's: not trusted, the hold is charged.
        ({"promptTokenCount": 10, "candidatesTokenCount": 5}, None),
        ({"promptTokenCount": -10, "totalTokenCount": 5}, None),
        ({"promptTokenCount": "10", "totalTokenCount": 5}, None),
    ],
)
def test_usage(meta: dict[str, Any], expected: Usage | None) -> None:
    usage, model = GEMINI_FORMAT.usage(route(GEN), response(meta))
    assert usage == expected
    if expected is not None:
        assert model == "gemini-2.5-flash-001"


def test_usage_without_metadata_is_unknown() -> None:
    embed = route("/v1beta/models/gemini-embedding-001:embedContent")
    assert GEMINI_FORMAT.usage(embed, b'{"embedding": {"values": [0.1]}}') == (None, "")
    assert GEMINI_FORMAT.usage(route(GEN), response(None)) == (None, "")
    assert GEMINI_FORMAT.usage(route(GEN), b"not json") == (None, "")
    assert GEMINI_FORMAT.usage(route(GEN), b"[]") == (None, "")


def test_model_version_is_validated() -> None:
    meta = {"promptTokenCount": 1, "totalTokenCount": 1}
    assert GEMINI_FORMAT.usage(route(GEN), response(meta, "models/gemini-2.0-flash"))[1] == (
        "gemini-2.0-flash"
    )
    assert GEMINI_FORMAT.usage(route(GEN), response(meta, "../x y"))[1] == ""


# --- streams ---


def usage_chunk(i: int, final: bool = False) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": f"w{i} "}], "role": "model"}}
    if final:
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": 7,
            "candidatesTokenCount": i,
            "totalTokenCount": 7 + i + 3,
            "thoughtsTokenCount": 3,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 7}],
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": "abc",
    }


def test_sse_meter_keeps_the_latest_cumulative_usage() -> None:
    meter = GEMINI_FORMAT.meter(route(STREAM, b"alt=sse"), _i())
    assert isinstance(meter, GeminiSSEMeter) and meter.sse
    events = [
        b"data: %s\r\n\r\n" % json.dumps(usage_chunk(i, i == 3), separators=(",", ": ")).encode()
        for i in (1, 2, 3)
    ]
    for ev in events[:2]:
        assert meter.keep(ev)
    assert meter.usage == Usage(7, 5)
    assert meter.keep(events[2])
    assert meter.keep(b"data: not json\r\n\r\n")
    assert meter.usage == Usage(7, 6)
    assert meter.model == "gemini-2.5-flash"


def _i() -> Any:
    return GEMINI_FORMAT.inspect(route(GEN), {})


def json_array(elements: list[dict[str, Any]]) -> bytes:
    """As Google sends it: pretty-printed elements joined by ``\\n,\\r\\n``."""
    parts = [json.dumps(e, indent=2) for e in elements]
    return ("[" + "\n,\r\n".join(parts) + "]").encode()


def feed(data: bytes, size: int) -> GeminiJSONArrayMeter:
    meter = GEMINI_FORMAT.meter(route(STREAM), _i())
    assert isinstance(meter, GeminiJSONArrayMeter) and not meter.sse
    for i in range(0, len(data), size):
        meter.observe(data[i : i + size])
    return meter


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100_000])
def test_json_array_meter_reads_usage_across_any_chunking(size: int) -> None:
    data = json_array([usage_chunk(i, i == 4) for i in range(1, 5)])
    meter = feed(data, size)
    assert meter.usage == Usage(7, 7)
    assert meter.model == "gemini-2.5-flash"


def test_json_array_meter_keeps_the_latest_when_cut() -> None:
    data = json_array([usage_chunk(i) for i in range(1, 5)])
    cut = data.index(b'"candidatesTokenCount": 4')
    meter = feed(data[:cut], 5)
    assert meter.usage == Usage(7, 6)


def test_json_array_meter_ignores_lookalikes_in_text_and_function_arguments() -> None:
    fake = {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2}
    tricky = usage_chunk(9, final=True)
    tricky["candidates"][0]["content"]["parts"] = [
        {"text": 'say "usageMetadata": {"promptTokenCount": 1, "totalTokenCount": 2} \\'},
        {"text": '\\\\"usageMetadata\\": {"totalTokenCount": 1}'},
        {"functionCall": {"name": "f", "args": {"usageMetadata": fake, "modelVersion": "x"}}},
    ]
    later = {"candidates": [{"content": {"parts": [{"functionCall": {"args": fake}}]}}]}
    data = json_array([tricky, later])
    for size in (1, 4, 9, len(data)):
        meter = feed(data, size)
        assert meter.usage == Usage(7, 12), size
        assert meter.model == "gemini-2.5-flash"


def test_json_array_meter_without_usage_or_total_reports_none() -> None:
    bare = usage_chunk(3)
    del bare["usageMetadata"]["totalTokenCount"]
    assert feed(json_array([bare]), 3).usage is None
    assert feed(b"[]", 1).usage is None


def test_json_array_meter_memory_stays_bounded() -> None:
    big = usage_chunk(2, final=True)
    big["candidates"][0]["content"]["parts"] = [{"inlineData": {"data": "QUJD" * 500_000}}]
    meter = feed(json_array([big]), 4096)
    assert meter.usage == Usage(7, 5)
    assert meter._string is None or len(meter._string) <= 64
    assert meter._capture is None
    # An absurd "usage" object is dropped, not buffered.
    huge = b'[{"usageMetadata": {"x": "' + b"a" * 200_000 + b'", "totalTokenCount": 1}}]'
    meter = feed(huge, 1000)
    assert meter.usage is None and meter._capture is None


# --- errors ---


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (402, "PERMISSION_DENIED"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (413, "INVALID_ARGUMENT"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (502, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
    ],
)
def test_error_body_in_googles_shape(status: int, name: str) -> None:
    body = json.loads(GEMINI_FORMAT.error_body(status, "some_code", "Words.", {}))
    error = body["error"]
    assert (error["code"], error["status"], error["message"]) == (status, name, "Words.")
    assert error["till_code"] == "some_code"


def test_limit_error_reads_as_a_final_client_error_in_google_genai() -> None:
    extra = {"limit": 3, "used": 3, "remaining": 0, "unit": "activations"}
    body = json.loads(GEMINI_FORMAT.error_body(402, "activation_limit_reached", "Done.", extra))
    error = body["error"]
    assert (error["limit"], error["used"], error["remaining"]) == (3, 3, 0)
    (info,) = error["details"]
    assert info == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "ACTIVATION_LIMIT_REACHED",
        "domain": "till",
        "metadata": {
            "till_code": "activation_limit_reached",
            "limit": "3",
            "used": "3",
            "remaining": "0",
            "unit": "activations",
        },
    }
    with pytest.raises(genai_errors.ClientError) as caught:
        genai_errors.APIError.raise_error(402, body, None)
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        402,
        "PERMISSION_DENIED",
        "Done.",
    )


# --- input the body does not show ---


@pytest.mark.parametrize(
    ("extra", "hidden"),
    [
        ({}, False),
        ({"tools": None}, False),
        ({"tools": []}, False),
        ({"tools": [{"functionDeclarations": [{"name": "f"}]}]}, False),
        ({"tools": [{"function_declarations": [{"name": "f"}]}, {}]}, False),
        ({"toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}, False),
        ({"cachedContent": "cachedContents/abc"}, True),
        ({"cached_content": "cachedContents/abc"}, True),
        ({"tools": [{"googleSearch": {}}]}, True),
        ({"tools": [{"url_context": {}}]}, True),
        ({"tools": [{"codeExecution": {}}]}, True),
        ({"tools": [{"functionDeclarations": [], "fileSearch": {}}]}, True),
        ({"tools": "nonsense"}, True),
        ({"systemInstruction": {"parts": [{"fileData": {"fileUri": "files/x"}}]}}, True),
    ],
)
def test_hidden_input(extra: dict[str, Any], hidden: bool) -> None:
    data = {"contents": CONTENTS, **extra}
    info = GEMINI_FORMAT.inspect(route(GEN), decode_body(json.dumps(data).encode()))
    assert info.hidden_input is hidden


@pytest.mark.parametrize(
    ("raw", "hidden"),
    [
        (b'{"contents":[{"parts":[{"text":"no file here"}]}]}', False),
        (b'{"contents":[{"parts":[{"text":"caf\\u00e9"}]}]}', False),
        (b'{"contents":[{"parts":[{"text":"a \\"fileUri\\" in text"}]}]}', False),
        (b'{"contents":[{"parts":[{"file_data":{"file_uri":"https://youtu.be/x"}}]}]}', True),
        (b'{"contents":[{"parts":[{"fileData":{"fileUri":"files/abc"}}]}]}', True),
        # A key spelled with escapes is the same key to Google's parser.
        (b'{"contents":[{"parts":[{"file\\u0044ata":{"file\\u0055ri":"files/a"}}]}]}', True),
        (b'{"content":{"parts":[{"fileData":{"fileUri":"files/abc"}}]}}', True),
    ],
)
def test_files_named_by_uri_are_hidden_input(raw: bytes, hidden: bool) -> None:
    for path in (GEN, "/v1beta/models/gemini-embedding-001:embedContent"):
        info = GEMINI_FORMAT.inspect(route(path), decode_body(raw))
        assert info.hidden_input is hidden
