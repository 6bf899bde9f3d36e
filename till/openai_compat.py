"""OpenAI SDK clients pointed at Till: the scoped key goes where the OpenAI key would.

    from till.openai_compat import patched_openai

    client = patched_openai("till_sk_...")
    client.chat.completions.create(model="gpt-4o", messages=[...])

The base URL is ``base_url`` if given, else ``$TILL_URL/v1``, else https://api.till.ac/v1.
``openai`` is an optional dependency: ``pip install till-ac[openai]``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import openai

__all__ = ["TILL_BASE_URL", "patched_async_openai", "patched_openai"]

TILL_BASE_URL: Final = "https://api.till.ac/v1"
_MISSING = "patched_openai needs the openai package: pip install till-ac[openai]"


def _base_url(base_url: str | None) -> str:
    if base_url:
        return base_url
    till_url = os.environ.get("TILL_URL", "").strip().rstrip("/")
    if not till_url:
        return TILL_BASE_URL
    return till_url if till_url.endswith("/v1") else f"{till_url}/v1"


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ImportError(_MISSING, name="openai") from None
    return openai


def patched_openai(scoped_key: str, base_url: str | None = None, **kwargs: Any) -> openai.OpenAI:
    """An ``openai.OpenAI`` using ``scoped_key`` through Till; ``kwargs`` go to the client."""
    client: openai.OpenAI = _openai().OpenAI(
        api_key=scoped_key, base_url=_base_url(base_url), **kwargs
    )
    return client


def patched_async_openai(
    scoped_key: str, base_url: str | None = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` using ``scoped_key`` through Till; ``kwargs`` go to the client."""
    client: openai.AsyncOpenAI = _openai().AsyncOpenAI(
        api_key=scoped_key, base_url=_base_url(base_url), **kwargs
    )
    return client
