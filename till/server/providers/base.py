"""What the proxy needs from a provider: its paths, its auth, its usage, its error dialect."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from till.server.pricing import Usage

Body = dict[str, msgspec.Raw]

_body_decoder = msgspec.json.Decoder(Body)
_int_decoder = msgspec.json.Decoder(int | None)
_bool_decoder = msgspec.json.Decoder(bool | None)
_str_decoder = msgspec.json.Decoder(str | None)
_obj_decoder = msgspec.json.Decoder(dict[str, Any] | None)
_key_decoder = msgspec.json.Decoder(str)
encode = msgspec.json.encode

# What reading untrusted JSON (a client's body, a provider's answer) may raise: msgspec's errors
# (ValidationError is a DecodeError), invalid UTF-8 in a string it decodes, and nesting deeper
# than its limit. Every reader here catches all three: a hostile body is a 400, never a 500.
DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
# Counts and caps above this (int32, what every provider takes) are not read as numbers: a limited
# key's request then gets its cap written over them. It also keeps what the reservation computes
# from them (cap x generations, default x generations) exact in the store's scripts (2**53).
MAX_FIELD_INT: Final = 2**31 - 1
# The most output a request is taken to ask for in total (a cap times its generations).
MAX_ASKED_OUTPUT: Final = 2**40
# Top-level fields a body may have (no provider's request has a hundred): keeps the check for
# repeated names cheap.
MAX_FIELDS: Final = 4096
_SPACE: Final = re.compile(rb"[ \t\n\r]*")
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class BadRequest(Exception):
    """The client's body cannot be read; answered 400 in the provider's dialect."""


class RepeatedFields(dict[str, msgspec.Raw]):
    """A body whose JSON named a top-level field more than once. The decoder kept the last copy,
    the one Till reads; a provider reading the first would see another model, cap or stream
    flag than the one budgeted for. So ``rewrite`` reports such a body changed whatever else it
    does, and the proxy forwards it re-encoded: one copy of each field, the one Till read."""


def decode_body(data: bytes) -> Body:
    """Top-level fields only: everything below stays raw bytes and is forwarded untouched.

    Refused: anything but one JSON object in UTF-8 (msgspec checks the UTF-8 of the strings it
    decodes, not of the values it keeps raw) and more than MAX_FIELDS fields. A body naming a
    field twice comes back as ``RepeatedFields``.
    """
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not valid UTF-8") from None
    try:
        body = _body_decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise BadRequest(f"request body is not a JSON object: {exc}") from None
    if len(body) > MAX_FIELDS:
        raise BadRequest(f"request body has more than {MAX_FIELDS} top-level fields")
    if _names_a_field_twice(data, body):
        return RepeatedFields(body)
    return body


def repeats_fields(body: Body) -> bool:
    """Whether ``body`` must be re-encoded to forward only the copies Till read."""
    return isinstance(body, RepeatedFields)


def _names_a_field_twice(data: bytes, body: Body) -> bool:
    """Whether the object in ``data`` (valid JSON, decoded as ``body``) repeats a field name.

    The decoder keeps each name's last value. Walking the fields in order, each name must be new
    and be followed by exactly the value kept for it (``Raw`` holds its bytes); a repeated name
    fails one or the other. A JSON value cannot be extended (a string ends at its quote, an
    array at its bracket, a number before the comma), so a walk that goes through is the
    object's only reading. Linear: one memcmp per value, a regex per key.
    """
    seen: set[str] = set()
    pos = _skip_space(data, _skip_space(data, 0) + 1)  # past "{"
    while True:
        if data.startswith(b"}", pos):
            return False  # {}
        token = _STRING.match(data, pos)
        if token is None:
            return True  # not where a name must be: the walk went wrong, so a field repeats
        name = _key_decoder.decode(token.group())
        if name in seen or name not in body:
            return True
        seen.add(name)
        pos = _skip_space(data, _skip_space(data, token.end()) + 1)  # past ":"
        value = body[name]
        if not data.startswith(value, pos):
            return True  # the kept value is a later copy's
        pos = _skip_space(data, pos + len(value))
        if data.startswith(b"}", pos):
            return False
        if not data.startswith(b",", pos):
            return True
        pos = _skip_space(data, pos + 1)


def _skip_space(data: bytes, pos: int) -> int:
    match = _SPACE.match(data, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def field_int(body: Body, name: str) -> int | None:
    """A non-negative integer field, or None when absent, null, not a plain integer, or above
    MAX_FIELD_INT."""
    raw = body.get(name)
    if raw is None:
        return None
    try:
        value = _int_decoder.decode(raw)
    except DECODE_ERRORS:
        return None
    return value if value is not None and 0 <= value <= MAX_FIELD_INT else None


def field_bool(body: Body, name: str) -> bool:
    raw = body.get(name)
    if raw is None:
        return False
    try:
        return bool(_bool_decoder.decode(raw))
    except DECODE_ERRORS:
        return False


def field_str(body: Body, name: str) -> str:
    raw = body.get(name)
    if raw is None:
        return ""
    try:
        return _str_decoder.decode(raw) or ""
    except DECODE_ERRORS:
        return ""


def field_obj(body: Body, name: str) -> dict[str, Any]:
    raw = body.get(name)
    if raw is None:
        return {}
    try:
        return _obj_decoder.decode(raw) or {}
    except DECODE_ERRORS:
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

    # The stream's usage once known in full; None until then.
    usage: Usage | None
    model: str
    sse: bool

    @property
    def partial(self) -> Usage | None:
        """Usage seen so far, for a stream cut before ``usage`` (charged to a key without
        limits); None when the stream reports usage only at its end."""

    @property
    def trailer(self) -> bytes:
        """An ending event ``keep`` withheld, sent after settlement: a client may stop reading
        at it, and a read of the key after the call must see the call's cost."""

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
    model: str = ""  # when the path names it (Gemini; OpenAI's /v1/models/{id})
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
