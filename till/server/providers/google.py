"""Gemini's wire format, and Google as a provider.

Gemini names the model and the method in the path (``/v1beta/models/{model}:{method}``), puts
the output cap in ``generationConfig.maxOutputTokens`` and reports usage in ``usageMetadata``.
It streams two ways: ``?alt=sse`` gives SSE events (CRLF framed), each carrying the cumulative
``usageMetadata`` so far; without it the answer is one JSON array whose elements arrive as the
model writes them. Google keys used with the OpenAI SDK reach Google's OpenAI-compatible
endpoint, in the OpenAI format.

Accounting rules:

* input = ``promptTokenCount`` (it already includes ``cachedContentTokenCount``) +
  ``toolUsePromptTokenCount``; cache reads = ``cachedContentTokenCount``; output =
  ``candidatesTokenCount`` + ``thoughtsTokenCount`` (thinking is billed as output). When
  ``totalTokenCount`` says more than those parts add up to, the difference is charged as
  output; a ``usageMetadata`` without ``totalTokenCount`` (the real API always sends it) is
  not trusted, so a response trimmed by a field mask charges the hold, not a partial count.
* ``countTokens`` is free and unmetered (an activation, no tokens).
* ``embedContent`` / ``batchEmbedContents``: Gemini reports no usage for embeddings, so the
  hold is charged, which for an embedding is the input estimate (request bytes / 3, an
  over-count) and no output; a key without limits holds nothing, so it is charged nothing.
  A ``usageMetadata`` in the answer, when Google adds one, wins.
* Input the body does not show: a ``cachedContent`` reference, a part naming a file by URI
  (``fileData``: uploads, YouTube, Cloud Storage) and server-side tools (search, URL context,
  code execution, ...) make Google add input tokens Till cannot estimate; such a request sets
  ``hidden_input`` and the proxy holds TILL_HIDDEN_INPUT_TOKENS more for it.
* Query parameters: only ``alt`` (``sse`` on streams, ``json``) and ``key`` (the Till token,
  never forwarded). Google's system parameters such as ``fields`` (a response field mask that
  could drop ``usageMetadata``), ``callback``, ``prettyPrint`` or ``access_token`` get 404.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final
from urllib.parse import parse_qsl

import msgspec

from till.server.pricing import Usage
from till.server.providers.base import (
    DECODE_ERRORS,
    Body,
    RequestInfo,
    Route,
    encode,
    field_obj,
    repeats_fields,
    sse_data,
)
from till.server.providers.openai import OPENAI_FORMAT

# Route kinds. The streamed kinds say which framing the client asked for (``alt=sse``).
GENERATE: Final = "generate"
GENERATE_SSE: Final = "generate_sse"
GENERATE_JSON: Final = "generate_json"
COUNT_TOKENS: Final = "count_tokens"
EMBED: Final = "embed"
GENERATE_KINDS: Final = frozenset({GENERATE, GENERATE_SSE, GENERATE_JSON})

# The inference methods forwarded (Gemini method -> route kind). Everything else under
# /v1beta is not: files, cachedContents, tunedModels, corpora, batches (batchGenerateContent),
# operations, the model list, long-running predictions.
METHODS: Final[dict[str, str]] = {
    "generateContent": GENERATE,
    "streamGenerateContent": GENERATE_JSON,  # GENERATE_SSE with alt=sse
    "countTokens": COUNT_TOKENS,
    "embedContent": EMBED,
    # What google-genai's embed_content() calls on the Gemini API: synchronous, like
    # embedContent (not the asynchronous Batch API).
    "batchEmbedContents": EMBED,
}
_PATH: Final = re.compile(r"/(v1beta|v1)/models/([^/:]+):([A-Za-z]+)")
# Gemini model ids ("gemini-2.5-flash", "gemini-embedding-001"); no dot segment, no slash.
_MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A Gemini method call on /v1 (camelCase after the colon); OpenAI's /v1/models/{id} has none.
_V1_METHOD_CALL: Final = re.compile(r"/v1/models/[^/:]+:[a-z]+[A-Z][A-Za-z]*")

OPENAI_COMPAT_PATH: Final = "/v1beta/openai/chat/completions"

# Google's canonical status names (google.rpc.Code) by HTTP status. google-genai raises
# ClientError for every 4xx and retries, when retries are configured at all (its default is
# one attempt), only 408, 429 and 5xx: an exhausted key answers 402 with PERMISSION_DENIED,
# a status no client treats as transient (RESOURCE_EXHAUSTED is the one libraries retry).
STATUS_NAMES: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "PERMISSION_DENIED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    431: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# Proto field names are accepted beside their lowerCamelCase JSON names, so both spellings
# are read and both are clamped.
_GEN_CONFIG: Final[tuple[str, ...]] = ("generationConfig", "generation_config")
_MAX_OUTPUT: Final[tuple[str, ...]] = ("maxOutputTokens", "max_output_tokens")
_CANDIDATES: Final[tuple[str, ...]] = ("candidateCount", "candidate_count")
_THINKING: Final[tuple[str, ...]] = ("thinkingConfig", "thinking_config")
_BUDGET: Final[tuple[str, ...]] = ("thinkingBudget", "thinking_budget")
_INT32_MAX: Final = 2**31 - 1
MAX_CANDIDATES: Final = 8


# --- usage ---


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    cached_content_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    total_token_count: int | None = None


class _ResponseView(msgspec.Struct, rename="camel"):
    usage_metadata: _UsageMetadata | None = None
    model_version: str = ""


_response_view = msgspec.json.Decoder(_ResponseView)
_usage_metadata = msgspec.json.Decoder(_UsageMetadata)


def _usage(meta: _UsageMetadata) -> Usage | None:
    if meta.total_token_count is None:
        return None
    counts = (
        meta.prompt_token_count,
        meta.cached_content_token_count,
        meta.candidates_token_count,
        meta.thoughts_token_count,
        meta.tool_use_prompt_token_count,
        meta.total_token_count,
    )
    if any(c < 0 for c in counts):
        return None
    input_tokens = meta.prompt_token_count + meta.tool_use_prompt_token_count
    output_tokens = meta.candidates_token_count + meta.thoughts_token_count
    # Tokens the total counts and the parts do not (a newer counter, a trimmed response):
    # charged at the dearer, output rate.
    output_tokens = max(output_tokens, meta.total_token_count - input_tokens)
    cached = min(meta.cached_content_token_count, input_tokens)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached)


def _model_name(model_version: str) -> str:
    name = model_version.removeprefix("models/")
    return name if _MODEL.fullmatch(name) else ""


class GeminiSSEMeter:
    """``alt=sse`` streams: every event carries the usage so far; the latest one counts."""

    sse = True
    trailer = b""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.model = ""

    @property
    def partial(self) -> Usage | None:
        return self.usage  # every event carries the usage so far

    def keep(self, event: bytes) -> bool:
        if b'"usageMetadata"' not in event:
            return True
        try:
            view = _response_view.decode(sse_data(event))
        except DECODE_ERRORS:
            return True
        if view.usage_metadata is not None:
            usage = _usage(view.usage_metadata)
            if usage is not None:
                self.usage = usage
                self.model = _model_name(view.model_version) or self.model
        return True

    def observe(self, chunk: bytes) -> None:  # pragma: no cover - SSE only
        raise NotImplementedError


# One structural JSON character, a string's remaining body, the text after a key.
_STRUCTURAL: Final = re.compile(rb'["{}\[\]:,]')
_STRING_BODY: Final = re.compile(rb'(?:[^"\\]|\\.)*', re.DOTALL)
# Longest string kept while it spans chunks (keys we look for are short), and the largest
# usageMetadata object captured (real ones are a few hundred bytes).
_MAX_KEPT_STRING: Final = 64
_MAX_CAPTURE: Final = 64 * 1024
# Depth of the fields of one response inside the array: [ { "usageMetadata": ...
_ELEMENT_DEPTH: Final = 2


class GeminiJSONArrayMeter:
    """The JSON-array stream (no ``alt=sse``): ``[{...}\\n,\\r\\n{...}]``, relayed as raw bytes.

    A small incremental tokenizer follows the JSON structure across chunks without parsing the
    array: strings are skipped with one regex (their content is kept only while short, for
    keys), and only the ``usageMetadata`` object and the ``modelVersion`` string found directly
    in a response element (depth 2) are decoded. Keys inside candidates (a function call's
    arguments are the model's own JSON) are deeper, so they never count. Memory stays bounded:
    a string in progress keeps at most 64 bytes, a captured usage object at most 64 KiB.
    """

    sse = False
    trailer = b""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.model = ""
        self._depth = 0
        self._in_string = False
        self._escape = False  # the chunk ended inside a string, right after a backslash
        self._string: bytearray | None = bytearray()  # None: too long to be a key we want
        self._pending_key = b""  # the last string read at element depth
        self._key = b""  # the key whose value comes next (after ':')
        self._capture: bytearray | None = None  # the usageMetadata object being read

    @property
    def partial(self) -> Usage | None:
        return self.usage  # every response element carries the usage so far

    def keep(self, event: bytes) -> bool:  # pragma: no cover - not SSE
        raise NotImplementedError

    def observe(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        capture_from = 0
        while pos < end:
            if self._in_string:
                pos = self._string_rest(chunk, pos)
                continue
            m = _STRUCTURAL.search(chunk, pos)
            if m is None:
                break
            pos = m.end()
            c = chunk[m.start()]
            if c == 0x22:  # "
                self._in_string = True
                self._escape = False
                self._string = bytearray()
            elif c in (0x7B, 0x5B):  # { [
                if (
                    c == 0x7B
                    and self._depth == _ELEMENT_DEPTH
                    and self._key == b"usageMetadata"
                    and self._capture is None
                ):
                    self._capture = bytearray()
                    capture_from = m.start()
                self._depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth == _ELEMENT_DEPTH and self._capture is not None:
                    self._capture += chunk[capture_from:pos]
                    self._usage_object(bytes(self._capture))
                    self._capture = None
                if self._depth <= _ELEMENT_DEPTH:
                    self._key = self._pending_key = b""
            elif c == 0x3A:  # :
                if self._depth == _ELEMENT_DEPTH:
                    self._key, self._pending_key = self._pending_key, b""
            elif self._depth == _ELEMENT_DEPTH:  # , between fields
                self._key = self._pending_key = b""
        if self._capture is not None:
            self._capture += chunk[capture_from:]
            if len(self._capture) > _MAX_CAPTURE:
                self._capture = None  # not a usage object we can read: the hold is charged

    def _string_rest(self, chunk: bytes, pos: int) -> int:
        """Consume string content from ``pos``; returns where scanning goes on."""
        start = pos
        if self._escape:
            pos += 1  # the escaped character left over from the previous chunk
            self._escape = False
        m = _STRING_BODY.match(chunk, pos)
        assert m is not None  # the pattern matches the empty string
        stop = m.end()
        self._keep_string(chunk[start:stop])
        if stop >= len(chunk):
            return stop  # the string goes on in the next chunk
        if chunk[stop] == 0x5C:  # a backslash, the chunk's last byte: escapes the next one
            self._escape = True
            self._keep_string(chunk[stop:])
            return len(chunk)
        self._in_string = False  # the closing quote
        if self._depth == _ELEMENT_DEPTH and self._string is not None:
            value = bytes(self._string)
            if self._key == b"modelVersion":
                self.model = _model_name(value.decode("utf-8", "replace")) or self.model
            else:
                self._pending_key = value
        return stop + 1

    def _keep_string(self, part: bytes) -> None:
        if self._string is None:
            return
        if len(self._string) + len(part) > _MAX_KEPT_STRING:
            self._string = None
        else:
            self._string += part

    def _usage_object(self, data: bytes) -> None:
        try:
            meta = _usage_metadata.decode(data)
        except DECODE_ERRORS:
            return
        usage = _usage(meta)
        if usage is not None:
            self.usage = usage


# --- request fields, read as Google's JSON parser reads them ---


def _as_int(value: Any) -> int | None:
    """An int32 as proto3 JSON accepts it: a number or a numeric string, integral."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            return None
        value = int(value)
    if isinstance(value, int) and -_INT32_MAX - 1 <= value <= _INT32_MAX:
        return value
    return None  # not an int32: Google refuses it, and Till does not budget for it


def _first_int(obj: dict[str, Any], names: tuple[str, ...]) -> int | None:
    """The first spelling present, as an int; the largest when both spellings are set."""
    values = [_as_int(obj[n]) for n in names if n in obj]
    ints = [v for v in values if v is not None]
    if len(ints) != len(values):
        return None  # present but unreadable
    return max(ints) if ints else None


def _objects(body: Body, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {n: field_obj(body, n) for n in names if n in body}


def _generations(config: dict[str, Any]) -> int:
    present = [n for n in _CANDIDATES if n in config]
    if not present:
        return 1
    count = _first_int(config, _CANDIDATES)
    # Google allows 1 to 8. Whatever was sent, the rewrite (when the key has limits) writes
    # back the count budgeted here, so the upstream never makes more candidates than that.
    return min(max(1, count), MAX_CANDIDATES) if count is not None else 1


# --- input the body does not show ---

# A stored context cache: its tokens are input (priced as cache reads), not in the body.
_CACHE_FIELDS: Final = frozenset({"cachedContent", "cached_content"})
# A part naming a file by URI (Files API upload, YouTube, Cloud Storage): an hour of video is
# about a million input tokens, and the body holds only the URI.
_FILE_KEYS: Final = frozenset({"fileData", "file_data", "fileUri", "file_uri"})
_FILE_MARKERS: Final = tuple(b'"%s"' % k.encode() for k in sorted(_FILE_KEYS))
# The only tool whose results are not added by Google itself: function calls are answered by
# the client, in the next request's body. Search, URL context, code execution, file search and
# maps feed the model input the body does not show (toolUsePromptTokenCount).
_CLIENT_TOOLS: Final = frozenset({"functionDeclarations", "function_declarations"})
_TOOL_FIELDS: Final = ("tools",)
_tools_decoder = msgspec.json.Decoder(list[dict[str, Any]] | None)
_any_decoder = msgspec.json.Decoder()


def _has_key(value: Any, keys: frozenset[str]) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not keys.isdisjoint(item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _names_a_file(raw: bytes) -> bool:
    if any(marker in raw for marker in _FILE_MARKERS):
        return True
    if b"\\u" not in raw:
        return False  # a key can only hide from the byte test behind a \u escape
    try:
        return _has_key(_any_decoder.decode(raw), _FILE_KEYS)
    except DECODE_ERRORS:
        return True  # unreadable: assume the worst (Google will most likely refuse it)


def _server_tools(raw: msgspec.Raw) -> bool:
    try:
        tools = _tools_decoder.decode(raw)
    except DECODE_ERRORS:
        return True
    return any(not _CLIENT_TOOLS.issuperset(tool) for tool in tools or ())


def _hides_input(body: Body) -> bool:
    """Whether Google will add input the body cannot show (the proxy then holds more)."""
    if not _CACHE_FIELDS.isdisjoint(body):
        return True
    if any(_server_tools(body[name]) for name in _TOOL_FIELDS if name in body):
        return True
    return any(_names_a_file(bytes(raw)) for raw in body.values())


class GeminiFormat:
    name = "gemini"

    def speaks(self, path: str) -> bool:
        return path.startswith("/v1beta/") or _V1_METHOD_CALL.fullmatch(path) is not None

    def parse(self, method: str, path: str) -> tuple[str, str] | None:
        """(kind, model) for an allowed path, else None. Streams are GENERATE_JSON here."""
        if method != "POST":
            return None
        m = _PATH.fullmatch(path)
        if m is None:
            return None
        model, call = m.group(2), m.group(3)
        kind = METHODS.get(call)
        if kind is None or not _MODEL.fullmatch(model) or ".." in model:
            return None
        return kind, model

    def inspect(self, route: Route, body: Body) -> RequestInfo:
        info = RequestInfo(model=route.model, stream=route.stream)
        info.hidden_input = _hides_input(body)
        if route.kind not in GENERATE_KINDS:
            info.asked_output = 0  # embeddings write no tokens
            return info
        configs = _objects(body, _GEN_CONFIG)
        info.generations = max((_generations(c) for c in configs.values()), default=1)
        caps = [_first_int(c, _MAX_OUTPUT) for c in configs.values()]
        if caps and all(cap is not None and cap >= 0 for cap in caps):
            # maxOutputTokens bounds each candidate; thinking is counted within it.
            info.asked_output = max(c for c in caps if c is not None) * info.generations
        return info

    def rewrite(self, route: Route, body: Body, info: RequestInfo, grant: int) -> bool:
        if grant < 0 or route.kind not in GENERATE_KINDS:
            # A body that named a field twice is forwarded re-encoded: the copies Till read.
            return repeats_fields(body)
        per = max(1, grant // info.generations)
        configs = _objects(body, _GEN_CONFIG) or {"generationConfig": {}}
        for name, config in configs.items():
            cap = _first_int(config, _MAX_OUTPUT)
            if cap is None or cap < 0 or cap > per:
                for field in [f for f in _MAX_OUTPUT if f in config] or ["maxOutputTokens"]:
                    config[field] = per
            for field in _CANDIDATES:
                if field in config:
                    config[field] = info.generations  # exactly what was budgeted
            for t in _THINKING:
                thinking = config.get(t)
                if not isinstance(thinking, dict):
                    continue
                for b in _BUDGET:
                    budget = _as_int(thinking.get(b)) if b in thinking else None
                    # -1 (dynamic) stays: the model keeps its thinking within maxOutputTokens.
                    if b in thinking and (budget is None or budget > per):
                        thinking[b] = per
            body[name] = msgspec.Raw(encode(config))
        # Always re-encoded when the key has limits: the upstream then reads exactly the
        # fields read here (no duplicate keys whose other copy Google might pick).
        return True

    def usage(self, route: Route, data: bytes) -> tuple[Usage | None, str]:
        try:
            view = _response_view.decode(data)
        except DECODE_ERRORS:
            return None, ""
        if view.usage_metadata is None:
            return None, ""  # embeddings: the hold (the input estimate) is charged
        return _usage(view.usage_metadata), _model_name(view.model_version)

    def meter(self, route: Route, info: RequestInfo) -> GeminiSSEMeter | GeminiJSONArrayMeter:
        if route.kind == GENERATE_SSE:
            return GeminiSSEMeter()
        return GeminiJSONArrayMeter()

    def stream_error(self, route: Route, body: bytes) -> bytes:
        if route.kind == GENERATE_JSON:
            # One more element, then the array's end: a reader of the array meets the error.
            return b",\r\n" + body + b"\n]"
        return b"data: " + body + b"\r\n\r\n"

    def error_body(self, status: int, code: str, message: str, extra: dict[str, Any]) -> bytes:
        name = STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
        info = {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": code.upper(),
            "domain": "till",
            # ErrorInfo metadata is a map of strings.
            "metadata": {"till_code": code, **{k: str(v) for k, v in extra.items()}},
        }
        error = {
            "code": status,
            "message": message,
            "status": name,
            "details": [info],
            "till_code": code,
            **extra,
        }
        return encode({"error": error})


GEMINI_FORMAT: Final = GeminiFormat()


def _query(query: bytes) -> list[tuple[str, str]] | None:
    """The query's parameters, or None when it holds one Till does not forward."""
    if not query:
        return []
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    names = [k for k, _ in pairs]
    if any(k not in ("alt", "key") for k in names) or names.count("alt") > 1:
        return None
    return pairs


class GoogleProvider:
    name = "google"

    def route(self, method: str, path: str, query: bytes) -> Route | None:
        params = _query(query)
        if params is None:
            return None
        alt = next((v for k, v in params if k == "alt"), None)
        if method == "POST" and path == "/v1/chat/completions":
            if alt is not None:
                return None
            return Route(OPENAI_FORMAT, "chat", OPENAI_COMPAT_PATH)
        parsed = GEMINI_FORMAT.parse(method, path)
        if parsed is None:
            return None
        kind, model = parsed
        if kind == GENERATE_JSON:
            if alt not in (None, "json", "sse"):
                return None
            kind = GENERATE_SSE if alt == "sse" else GENERATE_JSON
            return Route(GEMINI_FORMAT, kind, path, model=model, stream=True)
        if alt not in (None, "json"):
            return None
        return Route(GEMINI_FORMAT, kind, path, metered=kind != COUNT_TOKENS, model=model)

    def auth_headers(self, upstream_key: str, route: Route) -> list[tuple[str, str]]:
        if route.format is OPENAI_FORMAT:
            return [("authorization", f"Bearer {upstream_key}")]
        # Never in the URL: query strings end up in logs along the way.
        return [("x-goog-api-key", upstream_key)]
