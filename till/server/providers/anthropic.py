"""Anthropic's Messages format, and Anthropic as a provider.

Native routes: ``POST /v1/messages`` (metered) and ``POST /v1/messages/count_tokens`` (free at
Anthropic: no usage to bill, but it still takes an activation). The OpenAI SDK used with an
Anthropic key reaches Anthropic's OpenAI-compatible ``/v1/chat/completions``, read as OpenAI's
format. Everything else (files, batches, models, organization and admin endpoints of the
upstream key) is never forwarded.

Headers: the client's ``anthropic-version`` and ``anthropic-beta`` pass through as sent (the
proxy forwards request headers by deny-list). Till adds no ``anthropic-version``: it cannot see
the client's headers here, and a second copy would conflict with the client's. Anthropic's SDKs
always send it; a hand-made request without it gets Anthropic's own 400.

Output cap: ``max_tokens`` bounds every output token, extended thinking included, so lowering it
to the grant bounds the answer. Anthropic requires ``1024 <= thinking.budget_tokens <
max_tokens``: when the lowered cap is at or below the budget, the budget is lowered to
``max_tokens - 1``; when that would fall under 1024 the budget is left as sent and Anthropic
answers 400 (nothing billed; the activation counts), since no thinking request fits what the
key can still pay for.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from till.server.pricing import Usage
from till.server.providers.base import (
    DECODE_ERRORS,
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
from till.server.providers.openai import OPENAI_FORMAT

MESSAGES_PATH: Final = "/v1/messages"
COUNT_TOKENS_PATH: Final = "/v1/messages/count_tokens"
# Anthropic's floor for an extended-thinking budget.
MIN_THINKING_BUDGET: Final = 1024

# Anthropic's error type by HTTP status (its SDK reads error.type; the status picks the class).
ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
}


class _Usage(msgspec.Struct):
    # Null or absent: not reported in this event (message_delta repeats only some counts).
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _MessageView(msgspec.Struct):
    model: str = ""
    usage: _Usage | None = None


class _EventView(msgspec.Struct):
    type: str = ""
    message: _MessageView | None = None  # message_start
    usage: _Usage | None = None  # message_delta


_message_view: Final = msgspec.json.Decoder(_MessageView)
_event_view: Final = msgspec.json.Decoder(_EventView)


def _counts(u: _Usage) -> Usage:
    """Anthropic's input_tokens excludes cache reads and writes; Till's input includes them."""
    fresh = max(u.input_tokens or 0, 0)
    write = max(u.cache_creation_input_tokens or 0, 0)
    read = max(u.cache_read_input_tokens or 0, 0)
    return Usage(
        input_tokens=fresh + write + read,
        output_tokens=max(u.output_tokens or 0, 0),
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def _is_usage_event(event: bytes) -> bool:
    # A cheap byte test first: only message_start and message_delta carry usage. The quoted
    # name can only be a JSON string token of the event itself (text inside a string would be
    # escaped, \"message_delta\"); the decoded type is checked anyway.
    return b'"message_start"' in event or b'"message_delta"' in event


class MessagesMeter:
    """Messages streams: message_start has the model and input counts, message_delta the
    cumulative output (and may repeat input counts). Usage is known once message_delta came;
    a stream cut before it leaves usage unknown: a limited key is charged its hold, a key
    without limits what message_start counted. Nothing is withheld.
    """

    sse = True
    trailer = b""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.partial: Usage | None = None
        self.model = ""
        self._latest = _Usage()

    def keep(self, event: bytes) -> bool:
        if not _is_usage_event(event):
            return True
        try:
            view = _event_view.decode(sse_data(event))
        except DECODE_ERRORS:
            return True
        if view.type == "message_start" and view.message is not None:
            self.model = view.message.model or self.model
            if view.message.usage is not None:
                self._merge(view.message.usage)
                self.partial = _counts(self._latest)
        elif view.type == "message_delta" and view.usage is not None:
            self._merge(view.usage)
            self.partial = _counts(self._latest)
            if view.usage.output_tokens is not None:
                self.usage = self.partial
        return True

    def _merge(self, u: _Usage) -> None:
        latest = self._latest
        for name in _Usage.__struct_fields__:
            value = getattr(u, name)
            if value is not None:
                setattr(latest, name, value)

    def observe(self, chunk: bytes) -> None:  # pragma: no cover - SSE only
        raise NotImplementedError


class AnthropicFormat:
    name = "anthropic"

    def speaks(self, path: str) -> bool:
        return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")

    def inspect(self, route: Route, body: Body) -> RequestInfo:
        info = RequestInfo(model=field_str(body, "model"), stream=field_bool(body, "stream"))
        if route.kind == "messages":
            # Required by Anthropic; absent (or not a plain integer): -1, the request sets no cap.
            asked = field_int(body, "max_tokens")
            info.asked_output = -1 if asked is None else asked
        else:  # count_tokens produces no output
            info.asked_output = 0
        return info

    def rewrite(self, route: Route, body: Body, info: RequestInfo, grant: int) -> bool:
        # A body that named a field twice is forwarded re-encoded: the copies Till read.
        if route.kind != "messages" or grant < 0:
            return repeats_fields(body)
        if 0 <= info.asked_output <= grant:
            return repeats_fields(body)
        # Also when max_tokens is absent or unreadable to us: whatever the upstream would make
        # of it, what it forwards is a cap the key can pay for.
        body["max_tokens"] = msgspec.Raw(str(grant).encode())
        thinking = field_obj(body, "thinking")
        budget = thinking.get("budget_tokens")
        if (
            thinking.get("type") == "enabled"
            and isinstance(budget, int)
            and not isinstance(budget, bool)
            and budget >= grant
            and grant - 1 >= MIN_THINKING_BUDGET
        ):
            thinking["budget_tokens"] = grant - 1
            body["thinking"] = msgspec.Raw(encode(thinking))
        return True

    def usage(self, route: Route, data: bytes) -> tuple[Usage | None, str]:
        if route.kind != "messages":
            return None, ""
        try:
            view = _message_view.decode(data)
        except DECODE_ERRORS:
            return None, ""
        if view.usage is None or view.usage.output_tokens is None:
            return None, view.model
        return _counts(view.usage), view.model

    def meter(self, route: Route, info: RequestInfo) -> MessagesMeter:
        return MessagesMeter()

    def error_body(self, status: int, code: str, message: str, extra: dict[str, Any]) -> bytes:
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        error: dict[str, Any] = {"type": kind, "message": message, "code": code}
        for name, value in extra.items():
            error.setdefault(name, value)
        return encode({"type": "error", "error": error})

    def stream_error(self, route: Route, body: bytes) -> bytes:
        """A terminating in-stream error: Anthropic's SDKs act only on events named ``error``
        (an unnamed ``data:`` event is skipped, and the stream would just end short)."""
        return b"event: error\ndata: " + body + b"\n\n"


ANTHROPIC_FORMAT: Final = AnthropicFormat()

_ROUTES: Final[dict[tuple[str, str], Route]] = {
    ("POST", MESSAGES_PATH): Route(ANTHROPIC_FORMAT, "messages", MESSAGES_PATH),
    ("POST", COUNT_TOKENS_PATH): Route(
        ANTHROPIC_FORMAT, "count_tokens", COUNT_TOKENS_PATH, metered=False
    ),
    # The OpenAI SDK with an Anthropic key: Anthropic's OpenAI-compatible endpoint.
    ("POST", "/v1/chat/completions"): Route(OPENAI_FORMAT, "chat", "/v1/chat/completions"),
}


class AnthropicProvider:
    name = "anthropic"

    def route(self, method: str, path: str, query: bytes) -> Route | None:
        return _ROUTES.get((method, path))

    def auth_headers(self, upstream_key: str, route: Route) -> list[tuple[str, str]]:
        if route.format is OPENAI_FORMAT:
            return [("authorization", f"Bearer {upstream_key}")]
        return [("x-api-key", upstream_key)]
