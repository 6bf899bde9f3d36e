"""A key's model allow-list: exact names and ``prefix*`` patterns, sealed into its token.

No I/O: the proxy asks before reserving anything, and trims the model list it relays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

# Gemini names models "models/<id>" in bodies and answers, and "<id>" in paths.
_GEMINI_PREFIX = "models/"


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
