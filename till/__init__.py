"""Till's Python SDK: disposable, scoped stand-ins for LLM provider keys.

    from till import TillClient

    with TillClient(admin_key="till_admin_...") as client:
        key = client.create_key(provider="openai", upstream_key="sk-...", max_activations=50)
        print(key.scoped_key)  # shown once

The key's holder, with the scoped key alone (``TILL_SCOPED_KEY``):

    from till import KeyClient

    with KeyClient() as mine:
        print(mine.info().remaining_activations)
        child = mine.create_child(max_activations=5, ttl_seconds=600)

The server (``till serve``) is the ``till-ac[server]`` extra and is not imported here.
"""

from importlib import metadata as _metadata

from till.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncKeyClient,
    AsyncTillClient,
    AuthenticationError,
    ConflictError,
    KeyClient,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TillClient,
    TillError,
    ValidationError,
)
from till.models import (
    AccountSummary,
    ChildKeyCreate,
    ScopedKey,
    ScopedKeyCreate,
    ScopedKeyUpdate,
    Tenant,
)

try:
    __version__ = _metadata.version("till-ac")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AccountSummary",
    "AsyncKeyClient",
    "AsyncTillClient",
    "AuthenticationError",
    "ChildKeyCreate",
    "ConflictError",
    "KeyClient",
    "LimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ScopedKey",
    "ScopedKeyCreate",
    "ScopedKeyUpdate",
    "ServerError",
    "Tenant",
    "TillClient",
    "TillError",
    "ValidationError",
]
