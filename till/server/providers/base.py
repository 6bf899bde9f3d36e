"""What the proxy needs from a provider: its paths, its auth, its usage, its error dialect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from till.server.pricing import Usage

Body = dict[str, msgspec.Raw]

_body_decoder = msgspec.json.Decoder(Body)
_int_decoder = msgspec.json.Decoder(int | None)
_bool_decoder = msgspec.json.Decoder(bool | None)
_str_decoder = msgspec.json.Decoder(str | None)
_obj_decoder = msgspec.json.Decoder(dict[str, Any] | None)
encode = msgspec.json.encode


class BadRequest(Exception):
    """The client's body cannot be read; answered 400 in the provider's dialect."""


def decode_body(data: bytes) -> Body:
    """Top-level fields only: everything below stays raw bytes and is forwarded untouched."""
    try:
        return _body_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise BadRequest(f"request body is not a JSON object: {exc}") from None


def field_int(body: Body, name: str) -> int | None:
    """A non-negative integer field, or None when absent, null or not a plain integer."""
    raw = body.get(name)
    if raw is None:
        return None
    try:
        value = _int_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return value if value is not None and value >= 0 else None


def field_bool(body: Body, name: str) -> bool:
    raw = body.get(name)
    if raw is None:
        return False
    try:
        return bool(_bool_decoder.decode(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def field_str(body: Body, name: str) -> str:
    raw = body.get(name)
    if raw is None:
        return ""
    try:
        return _str_decoder.decode(raw) or ""
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def field_obj(body: Body, name: str) -> dict[str, Any]:
    raw = body.get(name)
    if raw is None:
        return {}
    try:
        return _obj_decoder.decode(raw) or {}
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return {}


@dataclass(slots=True)
class RequestInfo:
    """What the proxy learns from a request body before forwarding it."""

    model: str = ""
    stream: bool = False
    # Output tokens the request may produce in total (-1: the request sets no cap).
    asked_output: int = -1
    # Parallel generations (n, best_of): a per-generation cap is the grant divided by this.
    generations: int = 1
    # The client asked for usage in the stream itself (else it is added and withheld).
    wants_stream_usage: bool = True
    # The provider adds input the body does not show (a stored conversation): the body alone
    # cannot bound the input, so the proxy reserves TILL_HIDDEN_INPUT_TOKENS more.
    hidden_input: bool = False


class StreamMeter(Protocol):
    """Reads usage from a streamed response on the side of the relay.

    SSE meters (``sse`` true) see each complete event and may withhold one; others see the raw
    chunks as they pass (``observe``), for streams that are not cut into events.
    """

    usage: Usage | None
    model: str
    sse: bool

    def keep(self, event: bytes) -> bool:
        """Whether to pass this complete SSE event to the client (False: withhold it)."""

    def observe(self, chunk: bytes) -> None:
        """See a raw chunk of a stream that is not SSE."""


class Format(Protocol):
    """A wire format (OpenAI, Anthropic Messages, Gemini): how to read and adjust its traffic."""

    name: str

    def speaks(self, path: str) -> bool:
        """Whether a client calling this path expects this format's error shape."""

    def inspect(self, route: Route, body: Body) -> RequestInfo: ...

    def rewrite(self, route: Route, body: Body, info: RequestInfo, grant: int) -> bool:
        """Lower the output cap to ``grant`` (-1: none) and ask for stream usage, in place.
        Returns whether the body changed."""

    def usage(self, route: Route, data: bytes) -> tuple[Usage | None, str]:
        """Usage and model from a complete (non-streamed) response body."""

    def meter(self, route: Route, info: RequestInfo) -> StreamMeter: ...

    def error_body(self, status: int, code: str, message: str, extra: dict[str, Any]) -> bytes:
        """An error in this format's own shape, so its SDK reacts as it would to the real one."""

    def stream_error(self, route: Route, body: bytes) -> bytes:
        """What ends a stream that broke, carrying ``error_body``'s bytes, framed so that this
        format's SDK raises instead of taking a short answer for a whole one."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where one allowed request goes, and how to read it.

    ``kind`` names the endpoint within its format (chat, responses, messages, generate, ...);
    ``upstream_path`` is the provider's path, which can differ from the client's (an Anthropic
    key used with the OpenAI SDK reaches Anthropic's OpenAI-compatible endpoint).
    """

    format: Format
    kind: str
    upstream_path: str
    metered: bool = True  # has a JSON body with a model, answers with usage
    model: str = ""  # when the path names it (Gemini)
    stream: bool = False  # when the path says so (Gemini's streamGenerateContent)


class Provider(Protocol):
    """An upstream: its fixed host (from settings), its auth, and the paths it serves."""

    name: str

    def route(self, method: str, path: str, query: bytes) -> Route | None: ...

    def auth_headers(self, upstream_key: str, route: Route) -> list[tuple[str, str]]: ...


def sse_data(event: bytes) -> bytes:
    """The payload of an SSE event's data lines (joined with newlines, per the SSE spec)."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)
