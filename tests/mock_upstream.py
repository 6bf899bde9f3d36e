"""A mock LLM upstream speaking OpenAI's, Anthropic's and Gemini's wire formats, for tests.

Run it as a process (the primary use)::

    python tests/mock_upstream.py --port 0 [--host 127.0.0.1] [--api-key KEY ...]
        [--default-output-tokens 20] [--max-output-tokens 10000]

It prints exactly one line, ``LISTENING <port>``, to stdout and then serves until SIGTERM or
SIGINT. ``MockUpstreamProcess`` wraps that for tests; ``MockUpstream`` runs it in-process. One
process serves all three providers on one port: point each SDK's base URL at it (OpenAI:
``<mock>/v1``; Anthropic and google-genai: ``<mock>``; Google's OpenAI-compatible API:
``<mock>/v1beta/openai``). Any key is accepted unless ``--api-key`` lists the accepted ones
(one list for all providers).

OpenAI endpoints (``Authorization: Bearer <key>``; a missing/wrong key gets OpenAI's 401
``invalid_api_key``)::

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses
    POST /v1/embeddings         GET  /v1/models        GET  /v1/models/{model}

Like OpenAI, the mock rejects (400) ``stream_options`` without ``stream: true``, a cap below 1
(``max_output_tokens`` below 16), a missing model/messages/prompt/input, and unparsable JSON;
other /v1 paths get 404. It always returns one choice (``n`` is ignored). Embeddings have
``dimensions`` (default 16) deterministic floats, base64-packed when asked (the SDK's default).

``POST /v1/chat/completions`` is also Anthropic's OpenAI-compatible endpoint: the path is the
same, so the key decides whose request it is (``provider_for_key``): a Bearer key starting
``sk-ant-`` is recorded as provider "anthropic", one starting ``AIza`` as "google", any other as
"openai". Google's OpenAI-compatible endpoints are ``POST /v1beta/openai/chat/completions`` and
``POST /v1beta/openai/embeddings`` (Bearer key, provider "google"). All of them behave exactly
like OpenAI's (OpenAI usage, errors and streams).

Anthropic endpoints (provider "anthropic"; key in ``x-api-key``, or ``Authorization: Bearer``,
which is what the anthropic>=2 SDK sends for ``api_key``; a missing/wrong key gets 401
``authentication_error``; an ``anthropic-version`` header is required, 400 without)::

    POST /v1/messages                a Message, or its event stream with "stream": true
    POST /v1/messages/count_tokens   {"input_tokens": N}; nothing is billed (usage stays null)

``model``, a non-empty ``messages`` and ``max_tokens`` (>= 1) are required (400 as Anthropic
words it). Errors have Anthropic's shape ``{"type": "error", "error": {"type":
"invalid_request_error" | "authentication_error" | "permission_error" | "not_found_error" |
"rate_limit_error" | "api_error" | "overloaded_error" (529) | ..., "message": ...},
"request_id": ...}``; replies carry a ``request-id`` header (the record's request_id). A stream
is ``event: X\\ndata: {json}\\n\\n`` events: message_start (the message, content [], usage with
the input counts and output_tokens 1), content_block_start, ping, one content_block_delta
(text_delta) per visible output token, content_block_stop, message_delta (stop_reason and
cumulative usage: input_tokens, cache_creation_input_tokens, cache_read_input_tokens,
output_tokens), message_stop. ``x-mock-error-after`` sends ``event: error`` with
``overloaded_error``.

Gemini endpoints (provider "google", under both ``/v1beta`` and ``/v1``; key in
``x-goog-api-key`` or ``?key=``; no key: 403 PERMISSION_DENIED; a wrong key: 400
INVALID_ARGUMENT ``API_KEY_INVALID``)::

    POST /v1beta/models/{model}:generateContent        a GenerateContentResponse
    POST /v1beta/models/{model}:streamGenerateContent  ?alt=sse: ``data: {json}\\r\\n\\r\\n``
                                                       events; without: a JSON array written
                                                       element by element (``[{...}``,
                                                       ``\\n,\\r\\n{...}``, ..., ``\\n]``),
                                                       elements pretty-printed
    POST /v1beta/models/{model}:countTokens            {"totalTokens": N, ...}; not billed
    POST /v1beta/models/{model}:embedContent           {"embedding": {"values": [...]}}
    POST /v1beta/models/{model}:batchEmbedContents     {"embeddings": [...]} (what
                                                       google-genai's embed_content calls)

Errors have Google's shape ``{"error": {"code": 400, "message": ..., "status":
"INVALID_ARGUMENT"}}``; other /v1beta paths get 404 NOT_FOUND. Each streamed element carries one
word of text and the *cumulative* usageMetadata; only the last one has finishReason. Gemini
reports no usage for embeddings: their token count is in the record's planned_usage only.

Control endpoints (no auth)::

    GET  /_mock/requests[?path=/v1/...]  every recorded request, oldest first (JSON list)
    POST /_mock/reset                    forget all records
    GET  /_mock/totals                   {requests, prompt_tokens, completion_tokens, total_tokens}
                                         over all providers: requests = number of records;
                                         tokens = sums of the records' usage_normalized, i.e. of
                                         the usage the mock *reported* to clients
    GET  /_mock/totals?by_provider=1     the same plus "by_provider": {openai, anthropic,
                                         google}, each {requests, prompt_tokens,
                                         completion_tokens, total_tokens, cache_read_tokens,
                                         cache_write_tokens}, plus cache_creation_tokens for
                                         anthropic and cached_tokens, thoughts_tokens for google
    *    /_mock/redirect-target          where ``x-mock-redirect: 1`` points (recorded too)

(``by_provider`` is opt-in so that the plain /_mock/totals keeps its exact old shape.) In every
totals scope prompt_tokens includes cache reads and writes, completion_tokens includes
reasoning/thoughts, and total_tokens = prompt_tokens + completion_tokens.

Token rule (deterministic, so a test can compute what the mock will report):

* words(text) = ``len(text.split())``; a message's text is its ``content`` string, or the
  ``text`` of each part when ``content`` is a list (non-text parts count 0).
* chat prompt_tokens = sum over ``messages`` of ``3 + words(content)``.
* responses input_tokens = ``3 + words(instructions)`` if given, plus ``3 + words(input)`` for a
  string input, or ``3 + words(item content or output)`` per item of a list input.
* completions prompt_tokens = words(prompt) (token-id arrays count their length).
* embeddings prompt_tokens = words of every input (token-id arrays count their length).
* Anthropic prompt = ``3 + words(system)`` if a system prompt is given (string or text blocks),
  plus ``3 + words(content)`` per message. count_tokens returns that prompt.
* Gemini prompt = ``3 + words(parts' text)`` per entry of ``contents`` and for
  ``systemInstruction`` when given; countTokens returns it (of ``generateContentRequest`` if
  that is given). Embeddings: words of the parts' text (no per-content 3).
* ``x-mock-prompt-tokens: N`` overrides the prompt; ``x-mock-cached-tokens: N`` reports N (at
  most the prompt) as cached (OpenAI ``cached_tokens``, Gemini ``cachedContentTokenCount``,
  Anthropic cache reads when ``x-mock-cache-read-tokens`` is absent).
* Anthropic: ``x-mock-cache-read-tokens: R`` and ``x-mock-cache-creation-tokens: W`` split the
  prompt P as Anthropic does: ``input_tokens = P - R - W`` (R capped at P, W at P - R),
  ``cache_read_input_tokens = R``, ``cache_creation_input_tokens = W`` (all 5-minute).
* output tokens = ``min(request cap or x-mock-output-tokens or 20, --max-output-tokens)``, where
  the request cap is the smallest of ``max_tokens`` / ``max_completion_tokens`` (chat),
  ``max_tokens`` (completions), ``max_output_tokens`` (responses) or
  ``generationConfig.maxOutputTokens`` (Gemini). A request cap is always reached exactly
  (finish_reason ``length``, Gemini ``MAX_TOKENS``); otherwise ``stop`` / ``STOP``.
* Anthropic's ``max_tokens`` is only a ceiling: output = ``min(max_tokens, x-mock-output-tokens
  or 20, --max-output-tokens)``; stop_reason ``max_tokens`` when that equals max_tokens, else
  ``end_turn``.
* Every output token is one streamed content delta of one word ("alpha", " bravo", ...), so
  ``len(text.split()) == completion_tokens``. ``x-mock-reasoning-tokens: N`` spends the first
  min(N, output) tokens on (invisible) reasoning: they count in completion_tokens and
  reasoning_tokens but produce no delta. Gemini reports them as ``thoughtsTokenCount``, apart
  from ``candidatesTokenCount`` (= the visible ones), with totalTokenCount = prompt + candidates
  + thoughts; Anthropic counts them in output_tokens (and output_tokens_details.thinking_tokens).
* Gemini omits zero counts as the real API does (candidatesTokenCount, thoughtsTokenCount,
  cachedContentTokenCount); promptTokenCount and totalTokenCount are always there.

Streams: chat and completions send ``data: {json}\\n\\n`` chunks and ``data: [DONE]``; usage is
sent in a final ``"choices": []`` chunk only when ``stream_options.include_usage`` is true, and
then every earlier chunk carries ``"usage": null``. Responses streams send typed
``event: X\\ndata: {json}\\n\\n`` events ending with ``response.completed`` (which carries usage)
and no ``[DONE]``, as OpenAI does. Anthropic and Gemini streams are described above.

Request headers that steer the mock (all optional; applied after authentication; every provider
unless said otherwise)::

    x-mock-output-tokens: N     output length when the request sets no cap
    x-mock-delay-ms: N          stream: sleep before every event; otherwise once before replying
    x-mock-status: CODE         reply CODE (>= 400) with the provider's error body
    x-mock-cut-after: N         stream: close the connection after N events (no [DONE]);
                                non-stream: send the headers and N bytes of the body, then close
    x-mock-stall-after: N       stream: after N events go silent for STALL_SECONDS (30 s; a
                                client that leaves ends it), then go on; non-stream: send the
                                headers and N bytes of the body, then the same silence
    x-mock-error-after: N       stream: after N events send the provider's in-stream error, end
                                (OpenAI: server_error; Anthropic: ``event: error``
                                overloaded_error; Gemini: an {"error": {"code": 500, ...,
                                "status": "INTERNAL"}} element)
    x-mock-redirect: 1|URL      reply 302 to /_mock/redirect-target on this server (or to URL)
    x-mock-prompt-tokens: N     force the prompt token count
    x-mock-cached-tokens: N     report N cached prompt tokens
    x-mock-reasoning-tokens: N  spend N of the output tokens on reasoning / thoughts
    x-mock-incomplete: 1        responses: finish as status "incomplete" (response.incomplete)
    x-mock-cache-read-tokens: N      Anthropic: N prompt tokens read from the cache
    x-mock-cache-creation-tokens: N  Anthropic: N prompt tokens written to the cache

Each record holds: id, request_id, method, path, query, headers (lower-case names), body (parsed
JSON) or body_text (when not JSON), api_key, provider ("openai", "anthropic" or "google"; from
the route, or from the key on OpenAI-shaped /v1 paths), anthropic_version and anthropic_beta
(those headers, or null), model, stream, status, error (the error body sent), redirected_to,
usage (exactly as reported to the client, or null), usage_format (how ``usage`` reads:
"openai", "anthropic" or "gemini"), usage_normalized, planned_usage (normalised
{prompt_tokens, completion_tokens, total_tokens} the mock computed, reported or not),
events_sent, output_tokens_sent, completed, cut, stalled (x-mock-stall-after went silent),
disconnected, started_at, ended_at, disconnected_at (``time.time()`` floats; ended_at is null
while the request is in flight).

``usage_normalized`` is ``usage`` in one shape for every provider, or null when no usage was
reported: {input_tokens (ALL input: Anthropic's input_tokens + cache reads + cache writes;
Gemini's promptTokenCount, which already includes cached tokens; OpenAI's prompt/input tokens),
output_tokens (reasoning/thoughts included: Gemini candidates + thoughts), cache_read_tokens,
cache_write_tokens}. For an Anthropic or Gemini stream ``usage`` is the usage the client has
accumulated so far (message_start's updated by message_delta; the latest Gemini element), so a
stream cut or failed midway can still have a (partial) usage: ``completed`` tells them apart.
OpenAI streams only have usage once the usage chunk / response.completed went out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

import msgspec
from aiohttp import web

JSON = dict[str, Any]

DEFAULT_OUTPUT_TOKENS = 20
DEFAULT_MAX_OUTPUT_TOKENS = 10_000
DEFAULT_EMBEDDING_DIMENSIONS = 16
STALL_SECONDS = 30.0  # x-mock-stall-after: long past any read timeout a test sets, yet bounded
TOKENS_PER_MESSAGE = 3
SYSTEM_FINGERPRINT = "fp_mock0001"
VOCAB = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
MODEL_IDS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-5",
    "gpt-5-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
MODELS_CREATED = 1_700_000_000

_encode = msgspec.json.encode  # compact separators, keeps dict order


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error reply; the route's provider turns it into its wire shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        details: list[JSON] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_  # OpenAI's error type; Google's status string (e.g. "INVALID_ARGUMENT")
        self.code = code
        self.param = param
        self.details = details  # Google's error details

    @classmethod
    def injected(cls, status: int) -> ApiError:
        """The error OpenAI sends for ``status`` (used by ``x-mock-status``)."""
        if status == 401:
            return cls(401, "Incorrect API key provided.", code="invalid_api_key")
        if status == 403:
            return cls(403, "You are not allowed to sample from this model.", code=None)
        if status == 404:
            return cls(404, "The model does not exist.", code="model_not_found")
        if status == 429:
            return cls(
                429,
                "Rate limit reached for requests. Please try again in 1s.",
                type_="requests",
                code="rate_limit_exceeded",
            )
        if status >= 500:
            return cls(
                status,
                "The server had an error while processing your request. Sorry about that!",
                type_="server_error",
            )
        return cls(status, f"Mock error with status {status}.")


# --------------------------------------------------------------------------- providers


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def _openai_api_key(request: web.Request) -> str | None:
    return _bearer_key(request)


def _openai_check_key(key: str | None, allowed: frozenset[str]) -> None:
    if key is None:
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="invalid_api_key",
        )
    if allowed and key not in allowed:
        shown = f"{key[:3]}*****{key[-4:]}" if len(key) > 8 else "*****"
        raise ApiError(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )


def _openai_error_body(err: ApiError) -> JSON:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def _openai_headers(record: JSON) -> dict[str, str]:
    elapsed_ms = int((time.time() - record["started_at"]) * 1000)
    return {
        "x-request-id": record["request_id"],
        "openai-version": "2020-10-01",
        "openai-organization": "mock-org",
        "openai-processing-ms": str(elapsed_ms),
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-limit-tokens": "10000000",
        "x-ratelimit-remaining-tokens": "9999000",
    }


OPENAI_INVALID_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means "
    "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
    "payload, but what was sent was not valid JSON.)"
)


@dataclass(frozen=True)
class Provider:
    """How one provider authenticates, shapes its errors and labels its replies."""

    name: str
    api_key: Callable[[web.Request], str | None]  # the key the request presents, if any
    check_key: Callable[[str | None, frozenset[str]], None]  # raises ApiError(401)
    error_body: Callable[[ApiError], JSON]
    injected: Callable[[int], ApiError] = ApiError.injected  # the x-mock-status error
    stream_failure: Callable[[], ApiError] = lambda: ApiError.injected(500)  # x-mock-error-after
    headers: Callable[[JSON], dict[str, str]] = _openai_headers  # response headers
    invalid_json: str = OPENAI_INVALID_JSON  # the message for an unparsable body


OPENAI = Provider("openai", _openai_api_key, _openai_check_key, _openai_error_body)


# Anthropic -----------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _anthropic_api_key(request: web.Request) -> str | None:
    """``x-api-key``, or a Bearer token (what anthropic>=2 sends for ``api_key``)."""
    key = request.headers.get("x-api-key", "").strip()
    return key or _bearer_key(request)


def _anthropic_check_key(key: str | None, allowed: frozenset[str]) -> None:
    if key is None:
        raise ApiError(401, "x-api-key header is required")
    if allowed and key not in allowed:
        raise ApiError(401, "invalid x-api-key")


def _anthropic_error_body(err: ApiError) -> JSON:
    default = "api_error" if err.status >= 500 else "invalid_request_error"
    kind = ANTHROPIC_ERROR_TYPES.get(err.status, default)
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def _anthropic_injected(status: int) -> ApiError:
    messages = {
        401: "invalid x-api-key",
        403: "Your API key does not have permission to use the specified resource.",
        404: "The requested resource could not be found.",
        413: "Request exceeds the maximum allowed number of bytes.",
        429: "This request would exceed your organization's rate limit of 50 requests per "
        "minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
        500: "Internal server error",
        529: "Overloaded",
    }
    return ApiError(status, messages.get(status, f"Mock error with status {status}."))


def _anthropic_headers(record: JSON) -> dict[str, str]:
    return {
        "request-id": record["request_id"],
        "anthropic-organization-id": "00000000-0000-4000-8000-000000000000",
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
        "anthropic-ratelimit-input-tokens-limit": "2000000",
        "anthropic-ratelimit-input-tokens-remaining": "1999000",
        "anthropic-ratelimit-output-tokens-limit": "400000",
        "anthropic-ratelimit-output-tokens-remaining": "399000",
    }


ANTHROPIC = Provider(
    "anthropic",
    _anthropic_api_key,
    _anthropic_check_key,
    _anthropic_error_body,
    injected=_anthropic_injected,
    stream_failure=lambda: ApiError(529, "Overloaded"),
    headers=_anthropic_headers,
    invalid_json="There was an error parsing the body of your request. "
    "Please check that your request body is valid JSON.",
)


# Google --------------------------------------------------------------------

GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _google_api_key(request: web.Request) -> str | None:
    key = request.headers.get("x-goog-api-key", "").strip() or request.query.get("key", "")
    return key.strip() or None


def _google_check_key(key: str | None, allowed: frozenset[str]) -> None:
    if key is None:
        raise ApiError(
            403,
            "Method doesn't allow unregistered callers (callers without established "
            "identity). Please use API Key or other form of API consumer identity to call "
            "this API.",
            type_="PERMISSION_DENIED",
        )
    if allowed and key not in allowed:
        raise ApiError(
            400,
            "API key not valid. Please pass a valid API key.",
            type_="INVALID_ARGUMENT",
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        )


def _google_error_body(err: ApiError) -> JSON:
    if err.type in GOOGLE_STATUSES.values():
        status = err.type
    else:
        status = GOOGLE_STATUSES.get(err.status, "INTERNAL" if err.status >= 500 else "UNKNOWN")
    error: JSON = {"code": err.status, "message": err.message, "status": status}
    if err.details:
        error["details"] = err.details
    return {"error": error}


def _google_injected(status: int) -> ApiError:
    messages = {
        400: "Request contains an invalid argument.",
        401: "Request had invalid authentication credentials.",
        403: "The caller does not have permission",
        404: "Requested entity was not found.",
        429: "Resource has been exhausted (e.g. check quota).",
        500: "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
        503: "The model is overloaded. Please try again later.",
        504: "Deadline expired before operation could complete.",
    }
    return ApiError(status, messages.get(status, f"Mock error with status {status}."))


def _google_headers(record: JSON) -> dict[str, str]:
    elapsed_ms = int((time.time() - record["started_at"]) * 1000)
    return {
        "server-timing": f"gfet4t7; dur={elapsed_ms}",
        "vary": "Origin, X-Origin, Referer",
        "x-content-type-options": "nosniff",
    }


GOOGLE = Provider(
    "google",
    _google_api_key,
    _google_check_key,
    _google_error_body,
    injected=_google_injected,
    stream_failure=lambda: _google_injected(500),
    headers=_google_headers,
    invalid_json="Invalid JSON payload received. Unexpected token.",
)

PROVIDER_NAMES = ("openai", "anthropic", "google")


def provider_for_key(key: str | None) -> str:
    """Who a key on a shared OpenAI-shaped path belongs to: ``sk-ant-``/``AIza`` prefixes."""
    if key and key.startswith("sk-ant-"):
        return "anthropic"
    if key and key.startswith("AIza"):
        return "google"
    return "openai"


def _any_api_key(request: web.Request) -> str | None:
    return _bearer_key(request) or _anthropic_api_key(request) or _google_api_key(request)


# --------------------------------------------------------------------------- options & plan


def _header_int(headers: Any, name: str, minimum: int = 0) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"Mock header {name} must be an integer, got {raw!r}.") from None
    if value < minimum:
        raise ApiError(400, f"Mock header {name} must be >= {minimum}, got {value}.")
    return value


@dataclass(frozen=True)
class MockOptions:
    """The ``x-mock-*`` request headers."""

    output_tokens: int | None = None
    delay_ms: int = 0
    status: int | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    redirect: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    incomplete: bool = False
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0

    @classmethod
    def from_headers(cls, headers: Any) -> MockOptions:
        status = _header_int(headers, "x-mock-status", minimum=100)
        redirect = headers.get("x-mock-redirect", "").strip()
        return cls(
            output_tokens=_header_int(headers, "x-mock-output-tokens"),
            delay_ms=_header_int(headers, "x-mock-delay-ms") or 0,
            status=status if status is not None and status >= 400 else None,
            cut_after=_header_int(headers, "x-mock-cut-after"),
            stall_after=_header_int(headers, "x-mock-stall-after"),
            error_after=_header_int(headers, "x-mock-error-after"),
            redirect=None if redirect in ("", "0") else redirect,
            prompt_tokens=_header_int(headers, "x-mock-prompt-tokens"),
            cached_tokens=_header_int(headers, "x-mock-cached-tokens") or 0,
            reasoning_tokens=_header_int(headers, "x-mock-reasoning-tokens") or 0,
            incomplete=headers.get("x-mock-incomplete", "") not in ("", "0"),
            cache_creation_tokens=_header_int(headers, "x-mock-cache-creation-tokens") or 0,
            cache_read_tokens=_header_int(headers, "x-mock-cache-read-tokens") or 0,
        )


@dataclass(frozen=True)
class Plan:
    """What a generation will produce: the token counts and the output words."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int  # completion tokens, reasoning included
    reasoning_tokens: int
    finish_reason: str  # "stop" or "length"

    @property
    def pieces(self) -> list[str]:
        """One streamed delta per visible output token: "alpha", " bravo", ..."""
        visible = self.output_tokens - self.reasoning_tokens
        return [(" " if i else "") + VOCAB[i % len(VOCAB)] for i in range(visible)]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def normalised_usage(self) -> JSON:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


def words(value: Any) -> int:
    """Whitespace-separated words in a string, a list of content parts, or token ids."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # token ids
        return sum(words(v.get("text") if isinstance(v, dict) else v) for v in value)
    return 0


@dataclass
class Ctx:
    """Everything an endpoint function needs about one request."""

    request: web.Request
    body: JSON
    opts: MockOptions
    record: JSON
    server: MockUpstream

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    def model(self) -> str:
        model = self.body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(
                400,
                "you must provide a model parameter",
                param="model",
                code="missing_required_parameter",
            )
        self.record["model"] = model
        return model

    def stream_option(self, name: str) -> Any:
        options = self.body.get("stream_options")
        if options is None:
            return None
        if not self.stream:
            raise ApiError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
                code="invalid_value",
            )
        if not isinstance(options, dict):
            raise ApiError(400, "Invalid type for 'stream_options'.", param="stream_options")
        return options.get(name)

    def plan(self, prompt_tokens: int, cap_fields: Iterable[str], cap_minimum: int = 1) -> Plan:
        caps = [self._cap(name, cap_minimum) for name in cap_fields]
        requested = min((c for c in caps if c is not None), default=None)
        return self.plan_for(prompt_tokens, requested)

    def plan_for(
        self, prompt_tokens: int, requested: int | None, *, ceiling: int | None = None
    ) -> Plan:
        """The plan for a request cap ``requested`` (used as the length when given) or a
        ``ceiling`` (Anthropic's required ``max_tokens``: it only bounds the length)."""
        wanted = requested
        if wanted is None:
            wanted = self.opts.output_tokens
        if wanted is None:
            wanted = self.server.default_output_tokens
        output = min(wanted, self.server.max_output_tokens)
        if ceiling is not None:
            output = min(output, ceiling)
        hit = (requested is not None and output == requested) or output == ceiling
        if self.opts.prompt_tokens is not None:
            prompt_tokens = self.opts.prompt_tokens
        plan = Plan(
            prompt_tokens=prompt_tokens,
            cached_tokens=min(self.opts.cached_tokens, prompt_tokens),
            output_tokens=output,
            reasoning_tokens=min(self.opts.reasoning_tokens, output),
            finish_reason="length" if hit else "stop",
        )
        self.record["planned_usage"] = plan.normalised_usage()
        return plan

    def _cap(self, name: str, minimum: int) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(
                400,
                f"Invalid type for '{name}': expected an integer, "
                f"but got {type(value).__name__} instead.",
                param=name,
                code="invalid_type",
            )
        if value < minimum:
            raise ApiError(
                400,
                f"Invalid '{name}': integer below minimum value. "
                f"Expected a value >= {minimum}, but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
        return value


# --------------------------------------------------------------------------- SSE


@dataclass
class SSEEvent:
    """One server-sent event; ``tokens``/``usage`` feed the request record once it is sent."""

    data: JSON | str
    event: str | None = None
    tokens: int = 0  # visible output tokens this event carries
    usage: JSON | None = None  # usage this event reports to the client

    def payload(self) -> bytes:
        return self.data.encode() if isinstance(self.data, str) else _encode(self.data)

    def encode(self, newline: bytes = b"\n") -> bytes:
        head = f"event: {self.event}".encode() + newline if self.event else b""
        return head + b"data: " + self.payload() + newline + newline


DONE = SSEEvent("[DONE]")


@dataclass
class StreamReply:
    """A streamed reply. ``framing`` says how its events go on the wire:

    * ``sse``: ``[event: X\\n]data: {json}\\n\\n`` (OpenAI, Anthropic);
    * ``sse-crlf``: ``data: {json}\\r\\n\\r\\n`` (Gemini with ``alt=sse``);
    * ``json-array``: ``[{...}`` then ``\\n,\\r\\n{...}`` per further event, then ``\\n]``
      (Gemini's default streaming form).
    """

    events: Iterator[SSEEvent]
    error_event: Callable[[ApiError], SSEEvent]  # the provider's in-stream error event
    framing: str = "sse"
    content_type: str = "text/event-stream; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _openai_stream_error(err: ApiError) -> SSEEvent:
    return SSEEvent(_openai_error_body(err))


def _alive(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def _stall(request: web.Request, record: JSON) -> None:
    """x-mock-stall-after: go silent (bounded); a client that leaves meanwhile ends it."""
    record["stalled"] = True
    await _pause(request, int(STALL_SECONDS * 1000))


async def _pause(request: web.Request, delay_ms: int) -> None:
    """Sleep, noticing a client that goes away meanwhile (raises ConnectionResetError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay_ms / 1000
    while True:
        if not _alive(request):
            raise ConnectionResetError("client went away")
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, 0.01))


# --------------------------------------------------------------------------- endpoints


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _obfuscation(i: int) -> str:
    return VOCAB[i % len(VOCAB)][: 1 + i % 4]


def _completion_usage(plan: Plan) -> JSON:
    """CompletionUsage, as chat and legacy completions report it."""
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.total_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _message_tokens(messages: list[Any]) -> int:
    return sum(
        TOKENS_PER_MESSAGE + words(m.get("content")) for m in messages if isinstance(m, dict)
    )


def chat_completions(ctx: Ctx) -> JSON | StreamReply:
    model = ctx.model()
    messages = ctx.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    include_usage = ctx.stream_option("include_usage") is True
    obfuscate = ctx.stream_option("include_obfuscation") is not False
    plan = ctx.plan(_message_tokens(messages), ("max_tokens", "max_completion_tokens"))
    usage = _completion_usage(plan)
    base = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
    }
    if not ctx.stream:
        message: JSON = {
            "role": "assistant",
            "content": plan.text,
            "refusal": None,
            "annotations": [],
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": plan.finish_reason,
        }
        return {
            **base,
            "choices": [choice],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    base |= {
        "object": "chat.completion.chunk",
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    counter = itertools.count()

    def chunk(choices: list[JSON], usage: JSON | None = None) -> JSON:
        out = {**base, "choices": choices}
        if include_usage:
            out["usage"] = usage
        if obfuscate:
            out["obfuscation"] = _obfuscation(next(counter))
        return out

    def delta(d: JSON, finish_reason: str | None = None) -> list[JSON]:
        return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}]

    def events() -> Iterator[SSEEvent]:
        yield SSEEvent(chunk(delta({"role": "assistant", "content": "", "refusal": None})))
        for piece in plan.pieces:
            yield SSEEvent(chunk(delta({"content": piece})), tokens=1)
        yield SSEEvent(chunk(delta({}, plan.finish_reason)))
        if include_usage:
            yield SSEEvent(chunk([], usage), usage=usage)
        yield DONE

    return StreamReply(events(), _openai_stream_error)


def completions(ctx: Ctx) -> JSON | StreamReply:
    model = ctx.model()
    prompt = ctx.body.get("prompt")
    if prompt is None:
        raise ApiError(
            400,
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    include_usage = ctx.stream_option("include_usage") is True
    plan = ctx.plan(words(prompt), ("max_tokens",))
    usage = _completion_usage(plan)
    base = {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def choice(text: str, finish_reason: str | None) -> JSON:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    if not ctx.stream:
        return {
            **base,
            "choices": [choice(plan.text, plan.finish_reason)],
            "usage": usage,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def chunk(choices: list[JSON], usage: JSON | None = None) -> JSON:
        out = {**base, "choices": choices, "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            out["usage"] = usage
        return out

    def events() -> Iterator[SSEEvent]:
        for piece in plan.pieces:
            yield SSEEvent(chunk([choice(piece, None)]), tokens=1)
        yield SSEEvent(chunk([choice("", plan.finish_reason)]))
        if include_usage:
            yield SSEEvent(chunk([], usage), usage=usage)
        yield DONE

    return StreamReply(events(), _openai_stream_error)


def _responses_input_tokens(body: JSON) -> int:
    tokens = 0
    if isinstance(body.get("instructions"), str):
        tokens += TOKENS_PER_MESSAGE + words(body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        tokens += TOKENS_PER_MESSAGE + words(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                tokens += TOKENS_PER_MESSAGE + words(item.get("content", item.get("output")))
    return tokens


def _response_usage(plan: Plan) -> JSON:
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.total_tokens,
    }


def responses(ctx: Ctx) -> JSON | StreamReply:
    body = ctx.body
    model = ctx.model()
    obfuscate = ctx.stream_option("include_obfuscation") is not False
    plan = ctx.plan(_responses_input_tokens(body), ("max_output_tokens",), cap_minimum=16)
    usage = _response_usage(plan)
    final_status = "incomplete" if ctx.opts.incomplete else "completed"
    created_at = int(time.time())
    response_id, message_id = _new_id("resp_"), _new_id("msg_")
    reasoning_item = {"id": _new_id("rs_"), "type": "reasoning", "summary": []}
    has_reasoning = plan.reasoning_tokens > 0
    msg_index = 1 if has_reasoning else 0

    def text_part(text: str) -> JSON:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def message(status: str, content: list[JSON]) -> JSON:
        return {
            "id": message_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }

    def response(status: str, output: list[JSON], usage: JSON | None) -> JSON:
        done = status in ("completed", "incomplete")
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if done else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_logprobs": body.get("top_logprobs", 0),
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    final_output = [reasoning_item] if has_reasoning else []
    final_output.append(message(final_status, [text_part(plan.text)]))
    if not ctx.stream:
        return response(final_status, final_output, usage)

    seq = itertools.count()

    def event(kind: str, fields: JSON, tokens: int = 0, usage: JSON | None = None) -> SSEEvent:
        data = {"type": kind, "sequence_number": next(seq), **fields}
        return SSEEvent(data, event=kind, tokens=tokens, usage=usage)

    def events() -> Iterator[SSEEvent]:
        in_progress = response("in_progress", [], None)
        yield event("response.created", {"response": in_progress})
        yield event("response.in_progress", {"response": in_progress})
        if has_reasoning:
            for kind in ("response.output_item.added", "response.output_item.done"):
                yield event(kind, {"output_index": 0, "item": reasoning_item})
        yield event(
            "response.output_item.added",
            {"output_index": msg_index, "item": message("in_progress", [])},
        )
        where = {"item_id": message_id, "output_index": msg_index, "content_index": 0}
        yield event("response.content_part.added", {**where, "part": text_part("")})
        for i, piece in enumerate(plan.pieces):
            delta = {**where, "delta": piece, "logprobs": []}
            if obfuscate:
                delta["obfuscation"] = _obfuscation(i)
            yield event("response.output_text.delta", delta, tokens=1)
        yield event("response.output_text.done", {**where, "text": plan.text, "logprobs": []})
        yield event("response.content_part.done", {**where, "part": text_part(plan.text)})
        yield event(
            "response.output_item.done",
            {"output_index": msg_index, "item": final_output[msg_index]},
        )
        final = response(final_status, final_output, usage)
        yield event(f"response.{final_status}", {"response": final}, usage=usage)

    def error_event(err: ApiError) -> SSEEvent:
        fields = {"code": err.code or err.type, "message": err.message, "param": err.param}
        return event("error", fields)

    return StreamReply(events(), error_event)


def _embedding_inputs(value: Any) -> list[Any]:
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    ):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise ApiError(
        400,
        "Missing required parameter: 'input'.",
        param="input",
        code="missing_required_parameter",
    )


def _vector(index: int, dims: int) -> list[float]:
    return [((index * 31 + j * 17) % 100) / 100 - 0.5 for j in range(dims)]


def embeddings(ctx: Ctx) -> JSON:
    model = ctx.model()
    inputs = _embedding_inputs(ctx.body.get("input"))
    dims = ctx.body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    as_base64 = ctx.body.get("encoding_format") == "base64"
    prompt = ctx.opts.prompt_tokens
    if prompt is None:
        prompt = sum(words(item) for item in inputs)
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    ctx.record["planned_usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": 0,
        "total_tokens": prompt,
    }
    data = []
    for index in range(len(inputs)):
        vector = _vector(index, dims)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _model_object(model_id: str) -> JSON:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "system"}


def list_models(ctx: Ctx) -> JSON:
    return {"object": "list", "data": [_model_object(m) for m in MODEL_IDS]}


def retrieve_model(ctx: Ctx) -> JSON:
    model_id = ctx.request.match_info["model"]
    if model_id in MODEL_IDS:
        return _model_object(model_id)
    raise ApiError(
        404,
        f"The model '{model_id}' does not exist or you do not have access to it.",
        code="model_not_found",
    )


def not_found(ctx: Ctx) -> JSON:
    raise ApiError(404, f"Invalid URL ({ctx.request.method} {ctx.request.path})")


# --------------------------------------------------------------------------- Anthropic


def _anthropic_prompt_tokens(body: JSON) -> int:
    """``3 + words(system)`` if a system prompt is given, plus ``3 + words(content)`` a message."""
    tokens = 0
    if body.get("system"):
        tokens += TOKENS_PER_MESSAGE + words(body["system"])
    for message in body["messages"]:
        if isinstance(message, dict):
            tokens += TOKENS_PER_MESSAGE + words(message.get("content"))
    return tokens


def _anthropic_request(ctx: Ctx) -> str:
    """Check what /v1/messages and /v1/messages/count_tokens share; returns the model."""
    if not ctx.request.headers.get("anthropic-version"):
        raise ApiError(400, "anthropic-version: header is required")
    model = ctx.body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required")
    ctx.record["model"] = model
    messages = ctx.body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages: Field required")
    if not messages:
        raise ApiError(400, "messages: at least one message is required")
    return model


def anthropic_count_tokens(ctx: Ctx) -> JSON:
    _anthropic_request(ctx)
    tokens = ctx.opts.prompt_tokens
    if tokens is None:
        tokens = _anthropic_prompt_tokens(ctx.body)
    return {"input_tokens": tokens}


def anthropic_messages(ctx: Ctx) -> JSON | StreamReply:
    model = _anthropic_request(ctx)
    max_tokens = ctx.body.get("max_tokens")
    if max_tokens is None:
        raise ApiError(400, "max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ApiError(400, "max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise ApiError(400, "max_tokens: Input should be greater than or equal to 1")
    plan = ctx.plan_for(_anthropic_prompt_tokens(ctx.body), None, ceiling=max_tokens)
    # Anthropic's input_tokens excludes cache reads and writes: the prompt is split three ways.
    cache_read = min(ctx.opts.cache_read_tokens or ctx.opts.cached_tokens, plan.prompt_tokens)
    cache_write = min(ctx.opts.cache_creation_tokens, plan.prompt_tokens - cache_read)
    fresh = plan.prompt_tokens - cache_read - cache_write
    stop_reason = "max_tokens" if plan.finish_reason == "length" else "end_turn"

    def input_usage() -> JSON:
        return {
            "input_tokens": fresh,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
        }

    def usage(output_tokens: int) -> JSON:
        out: JSON = {
            **input_usage(),
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        if plan.reasoning_tokens:
            out["output_tokens_details"] = {"thinking_tokens": plan.reasoning_tokens}
        return out

    message: JSON = {
        "model": model,
        "id": _new_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": plan.text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage(plan.output_tokens),
    }
    if not ctx.stream:
        return message

    def event(kind: str, fields: JSON, tokens: int = 0, usage: JSON | None = None) -> SSEEvent:
        return SSEEvent({"type": kind, **fields}, event=kind, tokens=tokens, usage=usage)

    def events() -> Iterator[SSEEvent]:
        start_usage = usage(min(1, plan.output_tokens))
        start = {**message, "content": [], "stop_reason": None, "usage": start_usage}
        yield event("message_start", {"message": start}, usage=start_usage)
        block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        yield event("content_block_start", block)
        yield event("ping", {})
        for piece in plan.pieces:
            delta = {"index": 0, "delta": {"type": "text_delta", "text": piece}}
            yield event("content_block_delta", delta, tokens=1)
        yield event("content_block_stop", {"index": 0})
        delta_usage: JSON = {**input_usage(), "output_tokens": plan.output_tokens}
        if plan.reasoning_tokens:
            delta_usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning_tokens}
        fields = {"delta": {"stop_reason": stop_reason, "stop_sequence": None}}
        # The record's usage is what the client has accumulated: message_start's, updated.
        yield event(
            "message_delta", {**fields, "usage": delta_usage}, usage=start_usage | delta_usage
        )
        yield event("message_stop", {})

    def error_event(err: ApiError) -> SSEEvent:
        return SSEEvent(_anthropic_error_body(err), event="error")

    return StreamReply(events(), error_event)


# --------------------------------------------------------------------------- Gemini


def _gemini_json(value: JSON) -> str:
    """Gemini's SSE data: one line, ``": "`` after keys and a bare ``,`` between items."""
    return json.dumps(value, separators=(",", ": "), ensure_ascii=False)


def _gemini_content_tokens(content: Any) -> int:
    if not isinstance(content, dict):
        return 0
    return TOKENS_PER_MESSAGE + words(content.get("parts"))


def _gemini_prompt_tokens(body: JSON) -> int:
    """``3 + words(parts' text)`` per entry of ``contents`` and for ``systemInstruction``."""
    contents = body.get("contents")
    tokens = _gemini_content_tokens(body.get("systemInstruction"))
    if isinstance(contents, list):
        tokens += sum(_gemini_content_tokens(c) for c in contents)
    return tokens


def _gemini_streams(request: web.Request, body: Any) -> bool:
    return request.match_info.get("action") == "streamGenerateContent"


def _gemini_invalid(message: str) -> ApiError:
    return ApiError(400, message, type_="INVALID_ARGUMENT")


def _gemini_generate(ctx: Ctx, model: str, *, stream: bool) -> JSON | StreamReply:
    body = ctx.body
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _gemini_invalid("* GenerateContentRequest.contents: contents is not specified\n")
    config = body.get("generationConfig") or {}
    cap = config.get("maxOutputTokens") if isinstance(config, dict) else None
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise _gemini_invalid(
            "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), "
            f"{json.dumps(cap)}"
        )
    plan = ctx.plan_for(_gemini_prompt_tokens(body), cap)
    prompt, thoughts, cached = plan.prompt_tokens, plan.reasoning_tokens, plan.cached_tokens
    finish = "MAX_TOKENS" if plan.finish_reason == "length" else "STOP"
    response_id = uuid.uuid4().hex[:22]

    def usage(candidates: int) -> JSON:
        # Like the real API (proto3 JSON), zero counts other than the prompt/total are omitted.
        out: JSON = {"promptTokenCount": prompt}
        if candidates:
            out["candidatesTokenCount"] = candidates
        out["totalTokenCount"] = prompt + candidates + thoughts
        if cached:
            out["cachedContentTokenCount"] = cached
        out["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
        if cached:
            out["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
        if thoughts:
            out["thoughtsTokenCount"] = thoughts
        return out

    def response(text: str, finish_reason: str | None, candidates: int) -> JSON:
        candidate: JSON = {"content": {"parts": [{"text": text}], "role": "model"}}
        if finish_reason is not None:
            candidate["finishReason"] = finish_reason
        candidate["index"] = 0
        return {
            "candidates": [candidate],
            "usageMetadata": usage(candidates),
            "modelVersion": model,
            "responseId": response_id,
        }

    visible = plan.output_tokens - plan.reasoning_tokens
    if not stream:
        return response(plan.text, finish, visible)

    sse = ctx.request.query.get("alt") == "sse"
    encode: Callable[[JSON], str] = _gemini_json if sse else partial(json.dumps, indent=2)

    def events() -> Iterator[SSEEvent]:
        pieces = plan.pieces or [""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            chunk = response(piece, finish if last else None, i + 1 if piece else 0)
            yield SSEEvent(encode(chunk), tokens=1 if piece else 0, usage=chunk["usageMetadata"])

    def error_event(err: ApiError) -> SSEEvent:
        return SSEEvent(encode(_google_error_body(err)))

    if sse:
        return StreamReply(
            events(),
            error_event,
            framing="sse-crlf",
            content_type="text/event-stream",
            headers={"Content-Disposition": "attachment"},
        )
    return StreamReply(
        events(), error_event, framing="json-array", content_type="application/json; charset=UTF-8"
    )


def _gemini_count_tokens(ctx: Ctx) -> JSON:
    request = ctx.body.get("generateContentRequest")
    tokens = ctx.opts.prompt_tokens
    if tokens is None:
        tokens = _gemini_prompt_tokens(request if isinstance(request, dict) else ctx.body)
    return {
        "totalTokens": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }


def _gemini_embedding(content: Any, dimensions: Any, what: str, index: int = 0) -> tuple[JSON, int]:
    if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
        raise _gemini_invalid(f"* {what}.content: content is not specified\n")
    dims = dimensions if isinstance(dimensions, int) and dimensions > 0 else 0
    values = _vector(index, dims or DEFAULT_EMBEDDING_DIMENSIONS)
    return {"values": values}, words(content["parts"])


def _gemini_embed_content(ctx: Ctx) -> JSON:
    embedding, tokens = _gemini_embedding(
        ctx.body.get("content"), ctx.body.get("outputDimensionality"), "EmbedContentRequest"
    )
    _plan_embedding(ctx, tokens)
    return {"embedding": embedding}


def _gemini_batch_embed_contents(ctx: Ctx) -> JSON:
    requests = ctx.body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise _gemini_invalid("* BatchEmbedContentsRequest.requests: requests is not specified\n")
    embeddings, tokens = [], 0
    for index, item in enumerate(requests):
        item = item if isinstance(item, dict) else {}
        embedding, count = _gemini_embedding(
            item.get("content"),
            item.get("outputDimensionality"),
            f"BatchEmbedContentsRequest.requests[{index}]",
            index,
        )
        embeddings.append(embedding)
        tokens += count
    _plan_embedding(ctx, tokens)
    return {"embeddings": embeddings}


def _plan_embedding(ctx: Ctx, tokens: int) -> None:
    """Gemini reports no usage for embeddings: the count goes in planned_usage only."""
    if ctx.opts.prompt_tokens is not None:
        tokens = ctx.opts.prompt_tokens
    ctx.record["planned_usage"] = {
        "prompt_tokens": tokens,
        "completion_tokens": 0,
        "total_tokens": tokens,
    }


def gemini_models(ctx: Ctx) -> JSON | StreamReply:
    """``POST /{v1beta,v1}/models/{model}:{action}``."""
    model, action = ctx.request.match_info["model"], ctx.request.match_info["action"]
    ctx.record["model"] = model
    if action in ("generateContent", "streamGenerateContent"):
        return _gemini_generate(ctx, model, stream=action == "streamGenerateContent")
    if action == "countTokens":
        return _gemini_count_tokens(ctx)
    if action == "embedContent":
        return _gemini_embed_content(ctx)
    if action == "batchEmbedContents":
        return _gemini_batch_embed_contents(ctx)
    raise ApiError(404, f"Method models.{action} not found.", type_="NOT_FOUND")


def google_not_found(ctx: Ctx) -> JSON:
    raise ApiError(404, f"Requested entity was not found: {ctx.request.path}", type_="NOT_FOUND")


# --------------------------------------------------------------------------- routes


Handler = Callable[[Ctx], "JSON | StreamReply"]


def _body_streams(request: web.Request, body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    provider: Provider = OPENAI  # authentication, error shape, response headers
    json_body: bool = True  # the request must carry a JSON object
    auth: bool = True
    tag: str | None = None  # the record's provider; None: decided by the key (provider_for_key)
    usage_format: str = "openai"  # how the reply reports usage: openai, anthropic or gemini
    streams: Callable[[web.Request, Any], bool] = _body_streams  # is this a streamed request?


_ANTHROPIC = {"provider": ANTHROPIC, "tag": "anthropic", "usage_format": "anthropic"}
_GEMINI = {
    "provider": GOOGLE,
    "tag": "google",
    "usage_format": "gemini",
    "streams": _gemini_streams,
}
_GEMINI_PATH = "/models/{model:[^/:]+}:{action:[A-Za-z]+}"

# Paths with a literal prefix win over shorter ones in aiohttp's router, whatever the order
# here; a catch-all must still come after the routes sharing its prefix.
ROUTES: tuple[Route, ...] = (
    # OpenAI; also Anthropic's and Google's OpenAI-compatible chat when their key is used.
    Route("POST", "/v1/chat/completions", chat_completions),
    Route("POST", "/v1/completions", completions),
    Route("POST", "/v1/responses", responses),
    Route("POST", "/v1/embeddings", embeddings),
    Route("GET", "/v1/models", list_models, json_body=False),
    Route("GET", "/v1/models/{model}", retrieve_model, json_body=False),
    # Anthropic Messages.
    Route("POST", "/v1/messages", anthropic_messages, **_ANTHROPIC),
    Route("POST", "/v1/messages/count_tokens", anthropic_count_tokens, **_ANTHROPIC),
    # Gemini (both API versions), and Google's OpenAI-compatible endpoints.
    Route("POST", "/v1beta" + _GEMINI_PATH, gemini_models, **_GEMINI),
    Route("POST", "/v1" + _GEMINI_PATH, gemini_models, **_GEMINI),
    Route("POST", "/v1beta/openai/chat/completions", chat_completions, tag="google"),
    Route("POST", "/v1beta/openai/embeddings", embeddings, tag="google"),
    Route(
        "*",
        "/v1beta/{tail:.*}",
        google_not_found,
        GOOGLE,
        json_body=False,
        auth=False,
        tag="google",
    ),
    Route("*", "/v1/{tail:.*}", not_found, json_body=False, auth=False),
)


# --------------------------------------------------------------------------- usage


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def normalize_usage(usage_format: str, usage: JSON | None) -> JSON | None:
    """``usage`` (as reported, in ``usage_format``) as {input_tokens (all input, cache reads
    and writes included), output_tokens (reasoning/thoughts included), cache_read_tokens,
    cache_write_tokens}; None when nothing was reported."""
    if not usage:
        return None
    if usage_format == "anthropic":
        read = _int(usage.get("cache_read_input_tokens"))
        write = _int(usage.get("cache_creation_input_tokens"))
        return {
            "input_tokens": _int(usage.get("input_tokens")) + read + write,
            "output_tokens": _int(usage.get("output_tokens")),
            "cache_read_tokens": read,
            "cache_write_tokens": write,
        }
    if usage_format == "gemini":
        return {
            "input_tokens": _int(usage.get("promptTokenCount"))
            + _int(usage.get("toolUsePromptTokenCount")),
            "output_tokens": _int(usage.get("candidatesTokenCount"))
            + _int(usage.get("thoughtsTokenCount")),
            "cache_read_tokens": _int(usage.get("cachedContentTokenCount")),
            "cache_write_tokens": 0,
        }
    if "prompt_tokens" in usage:  # chat, completions, embeddings
        details = usage.get("prompt_tokens_details") or {}
        return {
            "input_tokens": _int(usage.get("prompt_tokens")),
            "output_tokens": _int(usage.get("completion_tokens")),
            "cache_read_tokens": _int(details.get("cached_tokens")),
            "cache_write_tokens": 0,
        }
    details = usage.get("input_tokens_details") or {}  # responses
    return {
        "input_tokens": _int(usage.get("input_tokens")),
        "output_tokens": _int(usage.get("output_tokens")),
        "cache_read_tokens": _int(details.get("cached_tokens")),
        "cache_write_tokens": _int(details.get("cache_write_tokens")),
    }


def _reasoning_tokens(usage_format: str, usage: JSON | None) -> int:
    if not usage:
        return 0
    if usage_format == "gemini":
        return _int(usage.get("thoughtsTokenCount"))
    if usage_format == "anthropic":
        return _int((usage.get("output_tokens_details") or {}).get("thinking_tokens"))
    details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return _int(details.get("reasoning_tokens"))


# --------------------------------------------------------------------------- server


@dataclass
class MockUpstream:
    """The mock server, in-process: ``port = await mock.start()`` ... ``await mock.stop()``."""

    host: str = "127.0.0.1"
    port: int = 0
    api_keys: frozenset[str] = frozenset()  # empty: any bearer key is accepted
    default_output_tokens: int = DEFAULT_OUTPUT_TOKENS
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    records: list[JSON] = field(default_factory=list)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _ids: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_mock/requests", self._control_requests)
        app.router.add_post("/_mock/reset", self._control_reset)
        app.router.add_get("/_mock/totals", self._control_totals)
        app.router.add_route("*", "/_mock/redirect-target", self._redirect_target)
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._endpoint(route))
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- records

    def reset(self) -> None:
        self.records.clear()

    def totals(self, by_provider: bool = False) -> JSON:
        """Token totals over every record's ``usage_normalized`` (see the module docstring);
        ``by_provider`` adds the per-provider breakdown."""
        totals = _zero_totals()
        providers = {name: _zero_totals(name) for name in PROVIDER_NAMES}
        for record in self.records:
            for bucket in (totals, providers.setdefault(record["provider"], _zero_totals())):
                _add_to_totals(bucket, record)
        if by_provider:
            totals["by_provider"] = providers
        return totals

    def _new_record(self, request: web.Request, provider: str = "openai") -> JSON:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        record: JSON = {
            "id": next(self._ids),
            "request_id": "req_" + uuid.uuid4().hex,
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": headers,
            "body": None,
            "body_text": None,
            "api_key": None,
            "provider": provider,
            "anthropic_version": request.headers.get("anthropic-version"),
            "anthropic_beta": request.headers.get("anthropic-beta"),
            "model": None,
            "stream": False,
            "status": None,
            "error": None,
            "redirected_to": None,
            "usage": None,
            "usage_format": None,
            "usage_normalized": None,
            "planned_usage": None,
            "events_sent": 0,
            "output_tokens_sent": 0,
            "completed": False,
            "cut": False,
            "stalled": False,
            "disconnected": False,
            "started_at": time.time(),
            "ended_at": None,
            "disconnected_at": None,
        }
        self.records.append(record)
        return record

    # ---- control endpoints

    async def _control_requests(self, request: web.Request) -> web.Response:
        path = request.query.get("path")
        records = [r for r in self.records if path is None or r["path"] == path]
        return web.Response(body=_encode(records), content_type="application/json")

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=_encode({"ok": True}), content_type="application/json")

    async def _control_totals(self, request: web.Request) -> web.Response:
        by_provider = request.query.get("by_provider", "") not in ("", "0", "false")
        totals = self.totals(by_provider=by_provider)
        return web.Response(body=_encode(totals), content_type="application/json")

    async def _redirect_target(self, request: web.Request) -> web.StreamResponse:
        api_key = _any_api_key(request)
        record = self._new_record(request, provider_for_key(api_key))
        record["api_key"] = api_key
        with contextlib.suppress(ConnectionError):
            _record_body(record, await request.read())
        payload = {
            "object": "mock.redirect_target",
            "method": request.method,
            "from": request.query.get("from"),
        }
        return await self._send_json(request, record, 200, payload)

    # ---- model endpoints

    def _endpoint(self, route: Route) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._dispatch(route, request)

        return handle

    async def _dispatch(self, route: Route, request: web.Request) -> web.StreamResponse:
        """Record, authenticate, apply the x-mock-* faults, then run the endpoint function."""
        provider = route.provider
        key = provider.api_key(request)
        record = self._new_record(request, route.tag or provider_for_key(key))
        record["usage_format"] = route.usage_format
        opts = MockOptions()
        try:
            body = _record_body(record, await request.read())
            record["stream"] = route.streams(request, body)
            if route.auth:
                record["api_key"] = key
                provider.check_key(key, self.api_keys)
            body = _require_object(body, required=route.json_body, message=provider.invalid_json)
            opts = MockOptions.from_headers(request.headers)
            if opts.redirect is not None:
                return await self._send_redirect(request, record, opts.redirect, provider)
            if opts.delay_ms and (opts.status is not None or not record["stream"]):
                await _pause(request, opts.delay_ms)
            if opts.status is not None:
                raise provider.injected(opts.status)
            reply = route.handler(Ctx(request, body, opts, record, self))
        except ApiError as err:
            record["error"] = provider.error_body(err)
            if provider is ANTHROPIC:
                record["error"]["request_id"] = record["request_id"]
            return await self._send_json(
                request, record, err.status, record["error"], provider=provider
            )
        except ConnectionError:
            return self._gone(record)
        if isinstance(reply, StreamReply):
            return await self._send_stream(request, record, opts, reply, route)
        return await self._send_json(
            request,
            record,
            200,
            reply,
            cut_after=opts.cut_after,
            stall_after=opts.stall_after,
            provider=provider,
            usage_format=route.usage_format,
        )

    def _response_headers(self, record: JSON, provider: Provider = OPENAI) -> dict[str, str]:
        return provider.headers(record)

    def _gone(self, record: JSON) -> web.StreamResponse:
        now = time.time()
        record.update(disconnected=True, disconnected_at=now, ended_at=now)
        return web.Response(status=499)  # never reaches the client: it is gone

    async def _send_redirect(
        self, request: web.Request, record: JSON, target: str, provider: Provider = OPENAI
    ) -> web.StreamResponse:
        if not target.startswith(("http://", "https://")):
            query = urllib.parse.urlencode({"from": request.path})
            target = f"{request.scheme}://{request.host}/_mock/redirect-target?{query}"
        record["redirected_to"] = target
        headers = self._response_headers(record, provider) | {"Location": target}
        return await self._send_json(request, record, 302, None, headers=headers)

    async def _send_json(
        self,
        request: web.Request,
        record: JSON,
        status: int,
        payload: JSON | None,
        *,
        headers: dict[str, str] | None = None,
        cut_after: int | None = None,
        stall_after: int | None = None,
        provider: Provider = OPENAI,
        usage_format: str = "openai",
    ) -> web.StreamResponse:
        """Send a whole JSON reply (or just its first ``cut_after`` bytes, then hang up; or its
        first ``stall_after`` bytes, then STALL_SECONDS of silence, then the rest)."""
        data = b"" if payload is None else _encode(payload)
        headers = headers or self._response_headers(record, provider)
        resp = web.StreamResponse(status=status, headers=headers)
        if payload is not None:
            resp.content_type = "application/json"
        resp.content_length = len(data)
        record["status"] = status
        try:
            await resp.prepare(request)
            if cut_after is not None and cut_after < len(data):
                await resp.write(data[:cut_after])
                record["cut"] = True
                _hang_up(request)
            else:
                if stall_after is not None and stall_after < len(data):
                    await resp.write(data[:stall_after])
                    data = data[stall_after:]
                    await _stall(request, record)
                await resp.write(data)
                await resp.write_eof()
                record["completed"] = True
                if status == 200 and payload is not None:
                    key = "usageMetadata" if usage_format == "gemini" else "usage"
                    _set_usage(record, payload.get(key), usage_format)
        except ConnectionError:
            return self._gone(record)
        record["ended_at"] = time.time()
        return resp

    async def _send_stream(
        self,
        request: web.Request,
        record: JSON,
        opts: MockOptions,
        reply: StreamReply,
        route: Route,
    ) -> web.StreamResponse:
        """Write ``reply``'s events, honouring delay/cut/error-after, watching the client."""
        headers = self._response_headers(record, route.provider)
        headers |= {"Content-Type": reply.content_type, "Cache-Control": "no-cache"}
        headers |= reply.headers
        resp = web.StreamResponse(status=200, headers=headers)
        record["status"] = 200
        array = reply.framing == "json-array"
        newline = b"\r\n" if reply.framing == "sse-crlf" else b"\n"
        closing = b"\n]" if array else b""

        def frame(event: SSEEvent, first: bool) -> bytes:
            if array:
                return (b"[" if first else b"\n,\r\n") + event.payload()
            return event.encode(newline)

        try:
            await resp.prepare(request)
            for event in reply.events:
                first = record["events_sent"] == 0
                if opts.cut_after is not None and record["events_sent"] >= opts.cut_after:
                    record["cut"] = True
                    _hang_up(request)
                    break
                if opts.stall_after is not None and record["events_sent"] == opts.stall_after:
                    await _stall(request, record)
                if opts.error_after is not None and record["events_sent"] >= opts.error_after:
                    err = route.provider.stream_failure()
                    record["error"] = route.provider.error_body(err)
                    await resp.write(frame(reply.error_event(err), first) + closing)
                    await resp.write_eof()
                    break
                if opts.delay_ms:
                    await _pause(request, opts.delay_ms)
                elif not _alive(request):
                    raise ConnectionResetError("client went away")
                await resp.write(frame(event, first))
                record["events_sent"] += 1
                record["output_tokens_sent"] += event.tokens
                if event.usage is not None:
                    _set_usage(record, event.usage, route.usage_format)
            else:
                if closing:
                    await resp.write(closing)
                await resp.write_eof()
                record["completed"] = True
        except ConnectionError:
            return self._gone(record)
        record["ended_at"] = time.time()
        return resp


def _record_body(record: JSON, raw: bytes) -> Any:
    """Parse the request body into the record: JSON in ``body``, anything else in ``body_text``."""
    if not raw:
        return None
    try:
        record["body"] = json.loads(raw)
    except ValueError:
        record["body_text"] = raw.decode("utf-8", "replace")
        return _UNPARSABLE
    return record["body"]


_UNPARSABLE = object()


def _require_object(body: Any, *, required: bool, message: str = OPENAI_INVALID_JSON) -> JSON:
    if body is _UNPARSABLE or (required and body is None):
        raise ApiError(400, message)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "The JSON body of your request must be an object.")
    return body


def _set_usage(record: JSON, usage: JSON | None, usage_format: str) -> None:
    record["usage"] = usage
    record["usage_format"] = usage_format
    record["usage_normalized"] = normalize_usage(usage_format, usage)


def _zero_totals(provider: str | None = None) -> JSON:
    totals: JSON = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if provider is not None:
        totals |= {"cache_read_tokens": 0, "cache_write_tokens": 0}
    if provider == "anthropic":
        totals["cache_creation_tokens"] = 0
    elif provider == "google":
        totals |= {"cached_tokens": 0, "thoughts_tokens": 0}
    return totals


def _add_to_totals(totals: JSON, record: JSON) -> None:
    totals["requests"] += 1
    usage = record.get("usage_normalized")
    if not usage:
        return
    totals["prompt_tokens"] += usage["input_tokens"]
    totals["completion_tokens"] += usage["output_tokens"]
    totals["total_tokens"] += usage["input_tokens"] + usage["output_tokens"]
    if "cache_read_tokens" in totals:
        totals["cache_read_tokens"] += usage["cache_read_tokens"]
        totals["cache_write_tokens"] += usage["cache_write_tokens"]
    if "cache_creation_tokens" in totals:
        totals["cache_creation_tokens"] += usage["cache_write_tokens"]
    if "cached_tokens" in totals:
        totals["cached_tokens"] += usage["cache_read_tokens"]
        totals["thoughts_tokens"] += _reasoning_tokens(record["usage_format"], record["usage"])


def _hang_up(request: web.Request) -> None:
    """Close the connection mid-body: what the client sees is an incomplete response."""
    transport = request.transport
    if transport is not None:
        transport.close()


# --------------------------------------------------------------------------- subprocess use


class MockUpstreamProcess:
    """Run the mock as a child process::

    with MockUpstreamProcess() as mock:
        client = OpenAI(base_url=mock.base_url, api_key="sk-test-upstream")
        ...
        mock.requests(), mock.totals(), mock.reset()

    Extra ``args`` go to the command line (e.g. ``"--api-key", "sk-real"``). The child's stderr
    goes to a temporary file; ``stderr_text()`` returns it (tests check it has no tracebacks).
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", python: str = sys.executable) -> None:
        self.args = args
        self.host = host
        self.python = python
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> int:
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in stop()
        cmd = [self.python, os.path.abspath(__file__), "--port", "0", "--host", self.host]
        self._proc = subprocess.Popen(
            [*cmd, *self.args], stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # the child prints it as soon as it listens
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"mock upstream failed to start: {line!r}\n{self.stderr_text()}")
        self.port = int(line.split()[1])
        return self.port

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> MockUpstreamProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str) -> Any:
        """One control-API call (stdlib only, so any test can use it)."""
        data = b"" if method == "POST" else None
        request = urllib.request.Request(self.url + path, method=method, data=data)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    def requests(self, path: str | None = None) -> list[JSON]:
        query = "?" + urllib.parse.urlencode({"path": path}) if path else ""
        records: list[JSON] = self._call("GET", "/_mock/requests" + query)
        return records

    def reset(self) -> None:
        self._call("POST", "/_mock/reset")

    def totals(self, by_provider: bool = False) -> JSON:
        totals: JSON = self._call(
            "GET", "/_mock/totals" + ("?by_provider=1" if by_provider else "")
        )
        return totals


# --------------------------------------------------------------------------- main


async def _serve(args: argparse.Namespace) -> None:
    mock = MockUpstream(
        host=args.host,
        port=args.port,
        api_keys=frozenset(args.api_key),
        default_output_tokens=args.default_output_tokens,
        max_output_tokens=args.max_output_tokens,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await mock.start()
    print(f"LISTENING {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await mock.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mock OpenAI upstream for Till's tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--api-key", action="append", default=[], help="accept only these keys (repeatable)"
    )
    parser.add_argument("--default-output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS)
    parser.add_argument("--max-output-tokens", type=int, default=DEFAULT_MAX_OUTPUT_TOKENS)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
