"""Till's Python SDK: disposable, scoped stand-ins for LLM provider keys.

    from till import TillClient

    with TillClient(admin_key="till_admin_...") as client:
        key = client.create_key(provider="openai", upstream_key="sk-...", max_activations=50)
        print(key.scoped_key)  # shown once

The server (``till serve``) is the ``till-ac[server]`` extra and is not imported here.
"""

from importlib import metadata as _metadata

from till.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncTillClient,
    AuthenticationError,
    LimitError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TillClient,
    TillError,
    ValidationError,
)
from till.models import AccountSummary, ScopedKey, ScopedKeyCreate, Tenant

try:
    __version__ = _metadata.version("till-ac")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AccountSummary",
    "AsyncTillClient",
    "AuthenticationError",
    "LimitError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ScopedKey",
    "ScopedKeyCreate",
    "ServerError",
    "Tenant",
    "TillClient",
    "TillError",
    "ValidationError",
]
