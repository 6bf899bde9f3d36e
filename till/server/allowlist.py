"""A key's model allow-list: exact names and ``prefix*`` patterns, sealed into its token.

No I/O: the proxy asks before reserving anything, and trims the model list it relays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from till.server.access import ProxyError
from till.server.providers.base import (
    BadRequest,
    RequestInfo,
    Route,
    decode_body,
    encode,
    field_str,
    repeats_fields,
)

# Gemini names models "models/<id>" in bodies and answers, and "<id>" in paths.
_GEMINI_PREFIX = "models/"
# Model names quoted back in a refusal are cut to this length.
MAX_QUOTED_MODEL: Final = 200


def model_allowed(model: str, patterns: Sequence[str]) -> bool:
    """Whether ``model`` matches an entry: the same name, or one starting with an entry's text
    before its final ``*``. An empty model matches nothing."""
    if not model:
        return False
    names = {model, model.removeprefix(_GEMINI_PREFIX)}
    for pattern in patterns:
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            if any(name.startswith(prefix) for name in names):
                return True
        elif pattern in names:
            return True
    return False


_list_decoder = msgspec.json.Decoder(dict[str, Any])


def filter_model_list(data: bytes, patterns: Sequence[str]) -> bytes:
    """An OpenAI model list (``{"object": "list", "data": [{"id": ...}, ...]}``) with only the
    models the key may use; anything else is returned as it is (the list is no secret, and a
    request for a model off the list is refused anyway)."""
    try:
        body = _list_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return data
    models = body.get("data")
    if not isinstance(models, list):
        return data
    body["data"] = [
        m
        for m in models
        if isinstance(m, dict) and isinstance(m.get("id"), str) and model_allowed(m["id"], patterns)
    ]
    return msgspec.json.encode(body)


def check_model(
    allowed: tuple[str, ...], route: Route, method: str, raw: bytes, info: RequestInfo
) -> bytes:
    """Refuse a request for a model the key may not use, or naming none, before anything is
    reserved; else the body to forward. The model list names no model: it is trimmed to the
    allowed ones instead."""
    if route.model:
        model = route.model  # in the path (Gemini, a model's own page)
    elif route.metered:
        model = info.model  # a body naming it twice is forwarded with the copy read here
    elif method == "POST":
        # count_tokens, whose body is forwarded unread otherwise.
        try:
            body = decode_body(raw)
        except BadRequest as exc:
            raise ProxyError("invalid_json", str(exc)) from None
        model = field_str(body, "model")
        if repeats_fields(body):
            # The provider must not read another copy of "model" than the one checked.
            raw = encode(body)
    else:
        return raw
    if model_allowed(model, allowed):
        return raw
    if not model:
        raise ProxyError(
            "model_not_allowed", "This key may use only certain models, and the request names none."
        )
    raise ProxyError(
        "model_not_allowed",
        f"This key may not use model {model[:MAX_QUOTED_MODEL]!r}.",
        model=model[:MAX_QUOTED_MODEL],
    )
