"""Error codes shared by the server and the SDK.

Errors are data: a stable machine ``code``, the HTTP status it travels with, and a human
message. One table maps codes to statuses so the server, the SDK and the docs agree.
"""

from __future__ import annotations

from typing import Final

# code -> HTTP status. Codes are part of the wire contract: add, never rename.
STATUS: Final[dict[str, int]] = {
    # request shape
    "invalid_json": 400,
    "validation_error": 422,
    "payload_too_large": 413,
    "not_found": 404,
    "method_not_allowed": 405,
    # admin authentication and plan
    "unauthorized": 401,
    "max_keys_reached": 403,
    "tenant_suspended": 403,
    # scoped token
    "invalid_api_key": 401,
    "key_revoked": 401,
    "key_expired": 401,
    "ip_not_allowed": 403,
    "model_not_allowed": 403,
    "unknown_model_price": 400,
    # budgets: the SDKs of every provider treat 402 as final (no retry loop)
    "activation_limit_reached": 402,
    "token_limit_reached": 402,
    "spend_limit_reached": 402,
    "monthly_quota_reached": 402,
    # infrastructure
    "store_unavailable": 503,
    "upstream_unavailable": 502,
    "upstream_timeout": 504,
    "internal_error": 500,
}

LIMIT_CODES: Final[frozenset[str]] = frozenset(
    {
        "activation_limit_reached",
        "token_limit_reached",
        "spend_limit_reached",
        "monthly_quota_reached",
    }
)


def status_for(code: str) -> int:
    return STATUS.get(code, 500)
