"""A mock LLM upstream that speaks OpenAI's wire format, for Till's tests.

Run it as a process (the primary use)::

    python tests/mock_upstream.py --port 0 [--host 127.0.0.1] [--api-key KEY ...]
        [--default-output-tokens 20] [--max-output-tokens 10000]

It prints exactly one line, ``LISTENING <port>``, to stdout and then serves until SIGTERM or
SIGINT. ``MockUpstreamProcess`` wraps that for tests; ``MockUpstream`` runs it in-process.

Endpoints (OpenAI-shaped, authenticated with ``Authorization: Bearer <key>``; any key unless
``--api-key`` lists the accepted ones; a missing/wrong key gets OpenAI's 401 ``invalid_api_key``):

    POST /v1/chat/completions   POST /v1/completions   POST /v1/responses
    POST /v1/embeddings         GET  /v1/models        GET  /v1/models/{model}

Like OpenAI, the mock rejects (400) ``stream_options`` without ``stream: true``, a cap below 1
(``max_output_tokens`` below 16), a missing model/messages/prompt/input, and unparsable JSON;
other /v1 paths get 404. It always returns one choice (``n`` is ignored). Embeddings have
``dimensions`` (default 16) deterministic floats, base64-packed when asked (the SDK's default).

Control endpoints (no auth)::

    GET  /_mock/requests[?path=/v1/...]  every recorded request, oldest first (JSON list)
    POST /_mock/reset                    forget all records
    GET  /_mock/totals                   {requests, prompt_tokens, completion_tokens, total_tokens}:
                                         requests = number of records; tokens summed over the
                                         usage the mock *reported* to clients
    *    /_mock/redirect-target          where ``x-mock-redirect: 1`` points (recorded too)

Token rule (deterministic, so a test can compute what the mock will report):

* words(text) = ``len(text.split())``; a message's text is its ``content`` string, or the
  ``text`` of each part when ``content`` is a list (non-text parts count 0).
* chat prompt_tokens = sum over ``messages`` of ``3 + words(content)``.
* responses input_tokens = ``3 + words(instructions)`` if given, plus ``3 + words(input)`` for a
  string input, or ``3 + words(item content or output)`` per item of a list input.
* completions prompt_tokens = words(prompt) (token-id arrays count their length).
* embeddings prompt_tokens = words of every input (token-id arrays count their length).
* ``x-mock-prompt-tokens: N`` overrides prompt_tokens; ``x-mock-cached-tokens: N`` reports N
  (at most prompt_tokens) as cached.
* output tokens = ``min(request cap or x-mock-output-tokens or 20, --max-output-tokens)``, where
  the request cap is the smallest of ``max_tokens`` / ``max_completion_tokens`` (chat),
  ``max_tokens`` (completions) or ``max_output_tokens`` (responses). A request cap is always
  reached exactly (finish_reason ``length``); otherwise finish_reason is ``stop``.
* Every output token is one streamed content delta of one word ("alpha", " bravo", ...), so
  ``len(text.split()) == completion_tokens``. ``x-mock-reasoning-tokens: N`` spends the first
  min(N, output) tokens on (invisible) reasoning: they count in completion_tokens and
  reasoning_tokens but produce no delta.

Streams: chat and completions send ``data: {json}\\n\\n`` chunks and ``data: [DONE]``; usage is
sent in a final ``"choices": []`` chunk only when ``stream_options.include_usage`` is true, and
then every earlier chunk carries ``"usage": null``. Responses streams send typed
``event: X\\ndata: {json}\\n\\n`` events ending with ``response.completed`` (which carries usage)
and no ``[DONE]``, as OpenAI does.

Request headers that steer the mock (all optional; applied after authentication)::

    x-mock-output-tokens: N     output length when the request sets no cap
    x-mock-delay-ms: N          stream: sleep before every event; otherwise once before replying
    x-mock-status: CODE         reply CODE (>= 400) with an OpenAI-shaped error body
    x-mock-cut-after: N         stream: close the connection after N events (no [DONE]);
                                non-stream: send the headers and N bytes of the body, then close
    x-mock-error-after: N       stream: after N events send OpenAI's in-stream error event, end
    x-mock-redirect: 1|URL      reply 302 to /_mock/redirect-target on this server (or to URL)
    x-mock-prompt-tokens: N     force prompt_tokens
    x-mock-cached-tokens: N     report N cached prompt tokens
    x-mock-reasoning-tokens: N  spend N of the output tokens on reasoning
    x-mock-incomplete: 1        responses: finish as status "incomplete" (response.incomplete)

Each record holds: id, request_id, method, path, query, headers (lower-case names), body (parsed
JSON) or body_text (when not JSON), api_key, model, stream, status, error (the error body sent),
redirected_to, usage (exactly as reported to the client, or null), planned_usage (normalised
{prompt_tokens, completion_tokens, total_tokens} the mock computed, reported or not),
events_sent, output_tokens_sent, completed, cut, disconnected, started_at, ended_at,
disconnected_at (``time.time()`` floats; ended_at is null while the request is in flight).

Other providers (Anthropic, Google) slot in as another ``Provider`` plus rows in ``ROUTES``.
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
from typing import IO, Any

import msgspec
from aiohttp import web

JSON = dict[str, Any]

DEFAULT_OUTPUT_TOKENS = 20
DEFAULT_MAX_OUTPUT_TOKENS = 10_000
DEFAULT_EMBEDDING_DIMENSIONS = 16
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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

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


@dataclass(frozen=True)
class Provider:
    """How one provider authenticates and shapes its errors."""

    name: str
    api_key: Callable[[web.Request], str | None]  # the key the request presents, if any
    check_key: Callable[[str | None, frozenset[str]], None]  # raises ApiError(401)
    error_body: Callable[[ApiError], JSON]


def _openai_api_key(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


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


OPENAI = Provider("openai", _openai_api_key, _openai_check_key, _openai_error_body)


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
    error_after: int | None = None
    redirect: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    incomplete: bool = False

    @classmethod
    def from_headers(cls, headers: Any) -> MockOptions:
        status = _header_int(headers, "x-mock-status", minimum=100)
        redirect = headers.get("x-mock-redirect", "").strip()
        return cls(
            output_tokens=_header_int(headers, "x-mock-output-tokens"),
            delay_ms=_header_int(headers, "x-mock-delay-ms") or 0,
            status=status if status is not None and status >= 400 else None,
            cut_after=_header_int(headers, "x-mock-cut-after"),
            error_after=_header_int(headers, "x-mock-error-after"),
            redirect=None if redirect in ("", "0") else redirect,
            prompt_tokens=_header_int(headers, "x-mock-prompt-tokens"),
            cached_tokens=_header_int(headers, "x-mock-cached-tokens") or 0,
            reasoning_tokens=_header_int(headers, "x-mock-reasoning-tokens") or 0,
            incomplete=headers.get("x-mock-incomplete", "") not in ("", "0"),
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
        wanted = requested
        if wanted is None:
            wanted = self.opts.output_tokens
        if wanted is None:
            wanted = self.server.default_output_tokens
        output = min(wanted, self.server.max_output_tokens)
        if self.opts.prompt_tokens is not None:
            prompt_tokens = self.opts.prompt_tokens
        plan = Plan(
            prompt_tokens=prompt_tokens,
            cached_tokens=min(self.opts.cached_tokens, prompt_tokens),
            output_tokens=output,
            reasoning_tokens=min(self.opts.reasoning_tokens, output),
            finish_reason="length" if requested is not None and output == requested else "stop",
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

    def encode(self) -> bytes:
        data = self.data.encode() if isinstance(self.data, str) else _encode(self.data)
        head = f"event: {self.event}\n".encode() if self.event else b""
        return head + b"data: " + data + b"\n\n"


DONE = SSEEvent("[DONE]")


@dataclass
class StreamReply:
    events: Iterator[SSEEvent]
    error_event: Callable[[ApiError], SSEEvent]  # the provider's in-stream error event


def _openai_stream_error(err: ApiError) -> SSEEvent:
    return SSEEvent(_openai_error_body(err))


async def _sse_write(resp: web.StreamResponse, event: SSEEvent) -> None:
    await resp.write(event.encode())


def _alive(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


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
        vector = [((index * 31 + j * 17) % 100) / 100 - 0.5 for j in range(dims)]
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


Handler = Callable[[Ctx], "JSON | StreamReply"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    provider: Provider = OPENAI
    json_body: bool = True  # the request must carry a JSON object
    auth: bool = True


# Add other providers' routes before the /v1 catch-all, which must stay last.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", chat_completions),
    Route("POST", "/v1/completions", completions),
    Route("POST", "/v1/responses", responses),
    Route("POST", "/v1/embeddings", embeddings),
    Route("GET", "/v1/models", list_models, json_body=False),
    Route("GET", "/v1/models/{model}", retrieve_model, json_body=False),
    Route("*", "/v1/{tail:.*}", not_found, json_body=False, auth=False),
)


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

    def totals(self) -> JSON:
        totals = {
            "requests": len(self.records),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        }
        for record in self.records:
            usage = record.get("usage")
            if not usage:
                continue
            totals["prompt_tokens"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
            totals["completion_tokens"] += usage.get(
                "completion_tokens", usage.get("output_tokens", 0)
            )
            totals["total_tokens"] += usage.get("total_tokens", 0)
        return totals

    def _new_record(self, request: web.Request) -> JSON:
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
            "model": None,
            "stream": False,
            "status": None,
            "error": None,
            "redirected_to": None,
            "usage": None,
            "planned_usage": None,
            "events_sent": 0,
            "output_tokens_sent": 0,
            "completed": False,
            "cut": False,
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
        return web.Response(body=_encode(self.totals()), content_type="application/json")

    async def _redirect_target(self, request: web.Request) -> web.StreamResponse:
        record = self._new_record(request)
        record["api_key"] = OPENAI.api_key(request)
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
        record = self._new_record(request)
        opts = MockOptions()
        try:
            body = _record_body(record, await request.read())
            record["stream"] = isinstance(body, dict) and body.get("stream") is True
            if route.auth:
                record["api_key"] = route.provider.api_key(request)
                route.provider.check_key(record["api_key"], self.api_keys)
            body = _require_object(body, required=route.json_body)
            opts = MockOptions.from_headers(request.headers)
            if opts.redirect is not None:
                return await self._send_redirect(request, record, opts.redirect)
            if opts.delay_ms and (opts.status is not None or not record["stream"]):
                await _pause(request, opts.delay_ms)
            if opts.status is not None:
                raise ApiError.injected(opts.status)
            reply = route.handler(Ctx(request, body, opts, record, self))
        except ApiError as err:
            record["error"] = route.provider.error_body(err)
            return await self._send_json(request, record, err.status, record["error"])
        except ConnectionError:
            return self._gone(record)
        if isinstance(reply, StreamReply):
            return await self._send_stream(request, record, opts, reply)
        return await self._send_json(request, record, 200, reply, cut_after=opts.cut_after)

    def _response_headers(self, record: JSON) -> dict[str, str]:
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

    def _gone(self, record: JSON) -> web.StreamResponse:
        now = time.time()
        record.update(disconnected=True, disconnected_at=now, ended_at=now)
        return web.Response(status=499)  # never reaches the client: it is gone

    async def _send_redirect(
        self, request: web.Request, record: JSON, target: str
    ) -> web.StreamResponse:
        if not target.startswith(("http://", "https://")):
            query = urllib.parse.urlencode({"from": request.path})
            target = f"{request.scheme}://{request.host}/_mock/redirect-target?{query}"
        record["redirected_to"] = target
        headers = self._response_headers(record) | {"Location": target}
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
    ) -> web.StreamResponse:
        """Send a whole JSON reply (or just its first ``cut_after`` bytes, then hang up)."""
        data = b"" if payload is None else _encode(payload)
        resp = web.StreamResponse(status=status, headers=headers or self._response_headers(record))
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
                await resp.write(data)
                await resp.write_eof()
                record["completed"] = True
                if status == 200 and payload is not None:
                    record["usage"] = payload.get("usage")
        except ConnectionError:
            return self._gone(record)
        record["ended_at"] = time.time()
        return resp

    async def _send_stream(
        self, request: web.Request, record: JSON, opts: MockOptions, reply: StreamReply
    ) -> web.StreamResponse:
        """Write ``reply``'s events as SSE, honouring delay/cut/error-after, watching the client."""
        headers = self._response_headers(record)
        headers |= {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        resp = web.StreamResponse(status=200, headers=headers)
        record["status"] = 200
        try:
            await resp.prepare(request)
            for event in reply.events:
                if opts.cut_after is not None and record["events_sent"] >= opts.cut_after:
                    record["cut"] = True
                    _hang_up(request)
                    break
                if opts.error_after is not None and record["events_sent"] >= opts.error_after:
                    err = ApiError.injected(500)
                    record["error"] = _openai_error_body(err)
                    await _sse_write(resp, reply.error_event(err))
                    await resp.write_eof()
                    break
                if opts.delay_ms:
                    await _pause(request, opts.delay_ms)
                elif not _alive(request):
                    raise ConnectionResetError("client went away")
                await _sse_write(resp, event)
                record["events_sent"] += 1
                record["output_tokens_sent"] += event.tokens
                if event.usage is not None:
                    record["usage"] = event.usage
            else:
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


def _require_object(body: Any, *, required: bool) -> JSON:
    if body is _UNPARSABLE or (required and body is None):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON.)",
        )
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ApiError(400, "The JSON body of your request must be an object.")
    return body


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

    def totals(self) -> JSON:
        totals: JSON = self._call("GET", "/_mock/totals")
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
