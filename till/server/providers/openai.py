"""OpenAI's wire format, and OpenAI as a provider.

The format is also what the OpenAI SDK speaks to the other providers' OpenAI-compatible
endpoints, so Anthropic and Google keys reuse it for ``/v1/chat/completions``.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from till.server.pricing import Usage
from till.server.providers.base import (
    DECODE_ERRORS,
    MAX_ASKED_OUTPUT,
    Body,
    RequestInfo,
    Route,
    encode,
    field_bool,
    field_int,
    field_obj,
    field_str,
    repeats_fields,
    sse_data,
)

# Inference paths only. Files, fine-tuning, batches, assistants, organization and admin
# endpoints of the upstream key are never reachable through a scoped token.
KINDS: Final[dict[tuple[str, str], str]] = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings",
    ("GET", "/v1/models"): "models",
}
_MODEL_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,200}")

# The legacy completions endpoint writes 16 tokens when max_tokens is absent.
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16
# Where each kind keeps its per-generation output cap (the first is set when none is), and
# its count of generations.
CAP_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    # Reasoning models accept only max_completion_tokens.
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
GENERATION_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "chat": ("n",),
    "completions": ("n", "best_of"),
}


class _Details(msgspec.Struct):
    cached_tokens: int = 0


class _ChatUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _ResponsesUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    input_tokens_details: _Details | None = None


class _ChatView(msgspec.Struct):
    model: str = ""
    usage: _ChatUsage | None = None
    choices: list[msgspec.Raw] | None = None


class _ResponsesView(msgspec.Struct):
    model: str = ""
    usage: _ResponsesUsage | None = None


class _ResponsesEvent(msgspec.Struct):
    response: _ResponsesView | None = None


_chat_view = msgspec.json.Decoder(_ChatView)
_responses_view = msgspec.json.Decoder(_ResponsesView)
_responses_event = msgspec.json.Decoder(_ResponsesEvent)


def _has_usage(event: bytes) -> bool:
    # A cheap byte test first: most events carry no usage, or "usage":null.
    return b'"usage":{' in event or b'"usage": {' in event


def _chat_usage(u: _ChatUsage) -> Usage:
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
    return Usage(
        input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, cache_read_tokens=cached
    )


def _responses_usage(u: _ResponsesUsage) -> Usage:
    cached = u.input_tokens_details.cached_tokens if u.input_tokens_details else 0
    return Usage(
        input_tokens=u.input_tokens, output_tokens=u.output_tokens, cache_read_tokens=cached
    )


class ChatMeter:
    """Chat and legacy completions streams: usage rides on a last chunk with no choices."""

    sse = True

    partial = None

    def __init__(self, wants_usage: bool) -> None:
        self.usage: Usage | None = None
        self.model = ""
        self.trailer = b""
        self._wants_usage = wants_usage

    def keep(self, event: bytes) -> bool:
        if b"[DONE]" in event and sse_data(event).strip() == b"[DONE]":
            self.trailer = event
            return False
        if not _has_usage(event):
            return True
        try:
            view = _chat_view.decode(sse_data(event))
        except DECODE_ERRORS:
            return True
        if view.usage is None:
            return True
        self.usage = _chat_usage(view.usage)
        self.model = view.model or self.model
        # We added include_usage ourselves: the client never asked for this chunk.
        return self._wants_usage or bool(view.choices)

    def observe(self, chunk: bytes) -> None:  # pragma: no cover - SSE only
        raise NotImplementedError


class ResponsesMeter:
    """Responses streams: the terminal event (completed, incomplete, failed) carries usage."""

    sse = True

    partial = None
    trailer = b""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.model = ""

    def keep(self, event: bytes) -> bool:
        if _has_usage(event):
            try:
                view = _responses_event.decode(sse_data(event))
            except DECODE_ERRORS:
                return True
            if view.response is not None and view.response.usage is not None:
                self.usage = _responses_usage(view.response.usage)
                self.model = view.response.model or self.model
        return True

    def observe(self, chunk: bytes) -> None:  # pragma: no cover - SSE only
        raise NotImplementedError


class OpenAIFormat:
    name = "openai"

    def speaks(self, path: str) -> bool:
        return path.startswith("/v1/")

    def kind(self, method: str, path: str) -> str | None:
        kind = KINDS.get((method, path))
        if kind is None and method == "GET" and path.startswith("/v1/models/"):
            model = path[len("/v1/models/") :]
            if _MODEL_ID.fullmatch(model) and model.strip(".") and ".." not in model:
                return "models"
        return kind

    def inspect(self, route: Route, body: Body) -> RequestInfo:
        info = RequestInfo(model=field_str(body, "model"), stream=field_bool(body, "stream"))
        if route.kind == "chat":
            info.generations = max(1, field_int(body, "n") or 1)
            per = _min_set(field_int(body, "max_completion_tokens"), field_int(body, "max_tokens"))
        elif route.kind == "completions":
            info.generations = max(1, field_int(body, "n") or 1, field_int(body, "best_of") or 1)
            per = field_int(body, "max_tokens")
            if per is None:
                per = COMPLETIONS_DEFAULT_MAX_TOKENS
        elif route.kind == "responses":
            per = field_int(body, "max_output_tokens")
            info.hidden_input = "previous_response_id" in body or "conversation" in body
        else:  # embeddings produce no output tokens
            per = 0
        info.asked_output = -1 if per is None else min(per * info.generations, MAX_ASKED_OUTPUT)
        if info.stream and route.kind in ("chat", "completions"):
            options = field_obj(body, "stream_options")
            info.wants_stream_usage = options.get("include_usage") is True
        return info

    def rewrite(self, route: Route, body: Body, info: RequestInfo, grant: int) -> bool:
        """Every cap field the request has, and every count of generations, is brought within
        what was budgeted: a readable one above it is lowered, an unreadable one (a string, a
        float, a negative or huge number, which a lenient upstream might still read as a
        number) is written over; a request without a cap gets one. A field the request set
        lower is kept: with both chat caps, the client's smaller one stays, the other is lowered.
        """
        changed = repeats_fields(body)
        if info.stream and not info.wants_stream_usage:
            options = field_obj(body, "stream_options")
            options["include_usage"] = True
            body["stream_options"] = msgspec.Raw(encode(options))
            changed = True
        fields = CAP_FIELDS.get(route.kind)
        if grant < 0 or fields is None:
            return changed  # no limit, or no output (embeddings)
        for name in GENERATION_FIELDS.get(route.kind, ()):
            if name in body and not _within(field_int(body, name), info.generations):
                body[name] = msgspec.Raw(str(info.generations).encode())
                changed = True
        per = grant // info.generations
        cap = msgspec.Raw(str(per).encode())
        present = [f for f in fields if f in body]
        for name in present:
            if not _within(field_int(body, name), per):
                body[name] = cap
                changed = True
        if not present and not (
            route.kind == "completions" and per >= COMPLETIONS_DEFAULT_MAX_TOKENS
        ):
            body[fields[0]] = cap
            changed = True
        return changed

    def usage(self, route: Route, data: bytes) -> tuple[Usage | None, str]:
        try:
            if route.kind == "responses":
                rv = _responses_view.decode(data)
                return (_responses_usage(rv.usage) if rv.usage else None), rv.model
            cv = _chat_view.decode(data)
            return (_chat_usage(cv.usage) if cv.usage else None), cv.model
        except DECODE_ERRORS:
            return None, ""

    def meter(self, route: Route, info: RequestInfo) -> ChatMeter | ResponsesMeter:
        if route.kind == "responses":
            return ResponsesMeter()
        return ChatMeter(info.wants_stream_usage)

    def stream_error(self, route: Route, body: bytes) -> bytes:
        # The openai SDK raises on a data event that carries an "error" object.
        return b"data: " + body + b"\n\n"

    def error_body(self, status: int, code: str, message: str, extra: dict[str, Any]) -> bytes:
        kind = {
            401: "invalid_request_error",
            402: "insufficient_quota",
            403: "permission_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return encode(
            {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}
        )


def _within(value: int | None, bound: int) -> bool:
    return value is not None and value <= bound


def _min_set(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


OPENAI_FORMAT: Final = OpenAIFormat()


class OpenAIProvider:
    name = "openai"

    def route(self, method: str, path: str, query: bytes) -> Route | None:
        kind = OPENAI_FORMAT.kind(method, path)
        if kind is None:
            return None
        # A model's own page names it in the path; the list names none.
        model = path.removeprefix("/v1/models/") if path.startswith("/v1/models/") else ""
        return Route(OPENAI_FORMAT, kind, path, metered=kind != "models", model=model)

    def auth_headers(self, upstream_key: str, route: Route) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {upstream_key}")]
